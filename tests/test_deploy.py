"""compose/: compose files validate with docker compose v2; the Kubernetes manifests agree with them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from shared import keys, sentinel
from shared.replication import Acks
from shared.settings import Settings
from tests.deploy import (
    CENTRAL,
    COMPOSE,
    CPU,
    GPTOSS_SERVICES,
    K8S,
    K8S_WORKLOADS,
    MAIN,
    REDIS_NODES,
    REDIS_PASSWORD,
    REDIS_SECRET,
    ROOT,
    SENTINELS,
    SERVICES,
    compose,
    config,
    container_env,
    containers,
    manifests,
    of_kind,
    only_container,
    workloads,
)

START = "/etc/gptoss-redis/start.sh"
"""Where compose mounts compose/redis/start.sh, which every Redis and Sentinel runs."""


def redis_address(env: dict[str, Any]) -> tuple[sentinel.SentinelAddress, Acks]:
    """Where a process with environment `env` finds Redis, and the replicas its writes wait for,
    as its settings read them."""
    gptoss = {k: str(v) for k, v in env.items() if k.startswith("GPTOSS_") and v is not None}
    with mock.patch.dict(os.environ, gptoss, clear=True):
        settings = Settings()
    return sentinel.parse(settings.redis_url_or_default()), settings.redis_acks()


@pytest.mark.parametrize("files", [(MAIN,), (MAIN, CPU), (MAIN, CENTRAL)], ids=["gpu", "cpu", "central"])
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
        assert "GPTOSS_REDIS_URL" not in env, "the Sentinels say where the primary is"
        assert env["GPTOSS_MODEL"] == "gpt-oss-20b"
        assert env["GPTOSS_METRICS_HOST"] == "0.0.0.0"
    assert services["api"]["environment"]["GPTOSS_API_HOST"] == "0.0.0.0"
    assert (
        "4318" in services["jaeger"]["expose"] and services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"]
    )
    # The API and the scheduler read the tokenizer the workers prepare: they share the model cache,
    # mounted where GPTOSS_CACHE_DIR says; the API only reads it.
    for name in GPTOSS_SERVICES:
        (cache,) = [v for v in services[name]["volumes"] if v["source"] == "model-cache"]
        assert cache["target"] == services[name]["environment"]["GPTOSS_CACHE_DIR"]
        assert cache.get("read_only", False) == (name == "api"), name
    # Every process and Prometheus (its external labels) say which cluster and region they are in.
    for name in (*GPTOSS_SERVICES, "prometheus"):
        env = services[name]["environment"]
        assert (env["GPTOSS_CLUSTER"], env["GPTOSS_REGION"]) == ("local", "local"), name
    assert "--enable-feature=exemplar-storage,expand-external-labels" in services["prometheus"]["command"]


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
def test_compose_processes_find_redis_through_three_sentinels(files: tuple[Path, ...]) -> None:
    services = config(*files)["services"]
    for name in GPTOSS_SERVICES:
        address, acks = redis_address(services[name]["environment"])
        assert address.sentinels == tuple((s, 26379) for s in SENTINELS), name
        assert address.service == "gptoss" and address.db == 0
        assert address.password == address.sentinel_password == REDIS_PASSWORD
        assert acks.replicas == 1, "an accepted job waits for a replica's copy"
        # Started once every Sentinel is healthy: enough of them see each other to fail over.
        healthy = {s for s, d in services[name]["depends_on"].items() if d["condition"] == "service_healthy"}
        assert set(SENTINELS) <= healthy, name
    for name in SENTINELS:
        assert services[name]["environment"]["REDIS_SELF"] == f"{name}:26379"


@pytest.mark.parametrize("files", [(MAIN,), (MAIN, CPU)], ids=["gpu", "cpu"])
def test_compose_redis_and_sentinels_require_the_password_every_process_sends(
    files: tuple[Path, ...],
) -> None:
    services = config(*files)["services"]
    for name in (*REDIS_NODES, *SENTINELS):
        service, role = services[name], "redis" if name in REDIS_NODES else "sentinel"
        # Every node runs compose/redis/start.sh (tests/test_deploy_redis.py runs it), which writes the
        # password (REDISCLI_AUTH) into the node's config file: it is not on the command line.
        assert service["command"][:3] == ["sh", START, role]
        (script,) = [v for v in service["volumes"] if v["target"] == START]
        assert script["source"] == str(COMPOSE / "redis" / "start.sh") and script["read_only"]
        assert not any(REDIS_PASSWORD in arg for arg in service["command"])
        env = service["environment"]
        assert env["REDISCLI_AUTH"] == REDIS_PASSWORD
        # redis-0 first: the primary on a cold start.
        assert env["REDIS_NODES"].split() == [f"{n}:6379" for n in REDIS_NODES]
        assert env["SENTINEL_NODES"].split() == [f"{s}:26379" for s in SENTINELS]
        assert env["SENTINEL_MASTER"] == "gptoss"
        assert service["user"] == "redis"
    for name in REDIS_NODES:
        command = services[name]["command"]
        options = dict(zip(command[3::2], command[4::2], strict=True))
        assert (options["--appendonly"], options["--appendfsync"]) == ("yes", "everysec")
        assert options["--min-replicas-to-write"] == "1", "a primary cut off from its replicas refuses writes"
        assert services[name]["environment"]["REDIS_SELF"] == f"{name}:6379"
        # The healthcheck authenticates (REDISCLI_AUTH) and needs PONG: NOAUTH would count as healthy.
        assert services[name]["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]
    data = {n: v["source"] for n in REDIS_NODES for v in services[n]["volumes"] if v["target"] == "/data"}
    assert data["redis-0"] == "redis-data", "the single Redis's volume: its AOF carries over"
    assert len(set(data.values())) == len(REDIS_NODES)
    for name in SENTINELS:
        env = services[name]["environment"]
        assert env["SENTINEL_QUORUM"] == "2", "2 of the 3 Sentinels must agree the primary is down"
        assert services[name]["healthcheck"]["test"] == [
            "CMD-SHELL",
            "redis-cli -p 26379 sentinel ckquorum gptoss | grep -q ^OK",
        ]


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


def test_manifests_parse_and_kustomization_lists_them() -> None:
    assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in manifests())
    assert all(d["metadata"].get("namespace") == "gptoss" for d in manifests() if d["kind"] != "Namespace")
    kustomization = yaml.safe_load((COMPOSE / "kustomization.yaml").read_text())
    assert {COMPOSE / r for r in kustomization["resources"]} == set(K8S.glob("*.yaml"))
    for generator in kustomization["configMapGenerator"]:
        for entry in generator["files"]:
            assert (COMPOSE / entry.split("=")[-1]).is_file(), entry
    names = {w["metadata"]["name"] for w in workloads()}
    assert names == K8S_WORKLOADS


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
        for container in workload["spec"]["template"]["spec"]["containers"]:
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
            ports = [p for c in workload["spec"]["template"]["spec"]["containers"] for p in c["ports"]]
            open_ports = {p["name"] for p in ports} | {p["containerPort"] for p in ports}
            assert all(p["targetPort"] in open_ports for p in service["spec"]["ports"]), service["metadata"]


def test_workers_request_gpus_and_scale_on_every_queue_they_serve() -> None:
    workers = {w["metadata"]["name"]: w for w in workloads() if w["metadata"]["name"].startswith("worker-")}
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in of_kind("ScaledObject")}
    assert set(scaled) == set(workers)
    for name, queue, gpus in (("worker-single", keys.SINGLE_QUEUE, 1), ("worker-multi", keys.MULTI_QUEUE, 2)):
        (container,) = workers[name]["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["gptoss", "worker", "--queue", queue]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        # One trigger, on the recording rule that sums every queue of the base (tests/
        # test_prometheus.py: the dashboard reads it too; alerts_test.yml: what it sums). A redis
        # trigger would read one list of the four or more a worker serves.
        (trigger,) = scaled[name]["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        assert trigger["metadata"]["query"] == f'gptoss:requests_waiting_by_base:sum{{base="{queue}"}}'
        assert trigger["metadata"]["serverAddress"] == "http://prometheus.gptoss.svc.cluster.local:9090"


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


def k8s_redis_pods() -> list[str]:
    """The stable DNS names of the Redis StatefulSet's pods, through its headless Service."""
    (redis,) = [w for w in workloads() if w["metadata"]["name"] == "redis"]
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == redis["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None", "headless: one name per pod"
    assert service["spec"]["publishNotReadyAddresses"], "a replica reaches its primary before it is ready"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"redis": 6379, "sentinel": 26379}
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    return [f"redis-{i}.{name}" for i in range(redis["spec"]["replicas"])]


def test_k8s_gptoss_processes_find_redis_through_three_sentinels() -> None:
    configmap = next(d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "gptoss-env")["data"]
    assert "GPTOSS_REDIS_URL" not in configmap, "the Sentinels say where the primary is"
    pods = k8s_redis_pods()
    assert len(pods) == 3
    for name in GPTOSS_SERVICES:
        container = only_container(name)
        assert container["envFrom"] == [{"configMapRef": {"name": "gptoss-env"}}]
        # The container's own env wins over the ConfigMap's, as on the kubelet.
        address, acks = redis_address({**configmap, **container_env(container, REDIS_SECRET)})
        assert address.sentinels == tuple((pod, 26379) for pod in pods), name
        assert address.service == "gptoss"
        assert address.password == address.sentinel_password == REDIS_PASSWORD
        assert acks.replicas == 1
        with pytest.raises(LookupError, match="gptoss-redis/password"):
            container_env(container, {})


def test_k8s_redis_and_sentinels_run_the_compose_script_with_the_secret_password() -> None:
    redis = containers("redis")
    assert set(redis) == {"redis", "sentinel"}, "each Redis with its Sentinel"
    (workload,) = [w for w in workloads() if w["metadata"]["name"] == "redis"]
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    kustomization = yaml.safe_load((COMPOSE / "kustomization.yaml").read_text())
    generated = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    assert generated["redis-scripts"] == ["redis/start.sh"], "the script compose runs"
    pods = k8s_redis_pods()
    for role, container in redis.items():
        (mount,) = [m for m in container["volumeMounts"] if volumes.get(m["name"], {}).get("configMap")]
        assert volumes[mount["name"]]["configMap"]["name"] == "redis-scripts"
        assert container["command"] == ["sh", f"{mount['mountPath']}/start.sh", role]
        assert not any(REDIS_PASSWORD in arg for arg in container["command"] + container.get("args", []))
        env = container_env(container, REDIS_SECRET, {"metadata.name": "redis-1"})
        port = 6379 if role == "redis" else 26379
        assert env["REDISCLI_AUTH"] == REDIS_PASSWORD  # the password start.sh writes; redis-cli's
        assert env["REDIS_SELF"] == f"{pods[1]}:{port}"
        assert env["REDIS_NODES"].split() == [f"{pod}:6379" for pod in pods]
        assert env["SENTINEL_NODES"].split() == [f"{pod}:26379" for pod in pods]
        assert env["SENTINEL_MASTER"] == "gptoss"
        with pytest.raises(LookupError):
            container_env(container, {}, {"metadata.name": "redis-1"})
    # The options compose's Redis runs with (AOF, min-replicas-to-write 1), and the same quorum.
    assert redis["redis"]["args"] == config(MAIN)["services"]["redis-0"]["command"][3:]
    sentinel_env = container_env(redis["sentinel"], REDIS_SECRET, {"metadata.name": "redis-0"})
    assert sentinel_env["SENTINEL_QUORUM"] == "2"
    # The probes authenticate (REDISCLI_AUTH) and need PONG, or OK from the Sentinel's quorum check.
    assert redis["redis"]["readinessProbe"]["exec"]["command"] == [
        "sh",
        "-c",
        "redis-cli ping | grep -q PONG",
    ]
    assert redis["sentinel"]["readinessProbe"]["exec"]["command"] == [
        "sh",
        "-c",
        "redis-cli -p 26379 sentinel ckquorum gptoss | grep -q ^OK",
    ]


def test_keda_needs_no_redis_password() -> None:
    """KEDA reads Prometheus, not Redis: no trigger holds the Redis password."""
    assert not of_kind("TriggerAuthentication")
    assert all("authenticationRef" not in t for s in of_kind("ScaledObject") for t in s["spec"]["triggers"])
