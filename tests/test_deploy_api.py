"""The API as deployed counts prompt tokens: compose's `api` service and the Kubernetes API Deployment
mount the model cache (read-only) where GPTOSS_CACHE_DIR says, and the API started with compose's
own environment answers an over-long prompt with 413 before anything is queued."""

from __future__ import annotations

from pathlib import Path

import requests
from redis import Redis

from cli.up import free_port
from shared.apikeys import create_key
from tests.conftest import Processes, http_ok, wait_for
from tests.deploy import CPU, MAIN, config, of_kind, only_container, workloads

LONG_PROMPT = "hello " * 9000
"""Over SmolLM2's 8192-token context (what the CPU variant serves) once counted."""


def test_compose_api_mounts_the_model_cache_read_only() -> None:
    for files in ((MAIN,), (MAIN, CPU)):
        api = config(*files)["services"]["api"]
        (cache,) = [v for v in api["volumes"] if v["source"] == "model-cache"]
        assert cache["type"] == "volume" and cache["read_only"] is True
        assert cache["target"] == api["environment"]["GPTOSS_CACHE_DIR"]


def test_k8s_api_mounts_the_model_cache_read_only() -> None:
    env = next(d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "gptoss-env")["data"]
    (api,) = [w for w in workloads() if w["metadata"]["name"] == "api"]
    volumes = {v["name"]: v for v in api["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in only_container("api")["volumeMounts"] if m["mountPath"] == env["GPTOSS_CACHE_DIR"]]
    assert mount["readOnly"] is True
    claim = volumes[mount["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": "gptoss-model-cache", "readOnly": True}
    # The same claim the workers prepare the tokenizers in.
    for worker in ("worker-single", "worker-multi"):
        (theirs,) = [
            m for m in only_container(worker)["volumeMounts"] if m["mountPath"] == env["GPTOSS_CACHE_DIR"]
        ]
        (w,) = [w for w in workloads() if w["metadata"]["name"] == worker]
        claims = {v["name"]: v.get("persistentVolumeClaim") for v in w["spec"]["template"]["spec"]["volumes"]}
        assert claims[theirs["name"]]["claimName"] == "gptoss-model-cache"


def test_the_composed_api_counts_prompt_tokens(redis_url: str, prepared_models, processes: Processes) -> None:
    """The API with the CPU variant's environment, the model cache volume being the tests' prepared
    cache: an over-long prompt is refused as too long (counted), not queued."""
    api = config(MAIN, CPU)["services"]["api"]
    (cache,) = [v for v in api["volumes"] if v["source"] == "model-cache"]
    port = free_port()
    env = {
        # The tests' Redis instead of compose's Sentinels (tests/test_deploy_redis.py runs those).
        **{k: str(v) for k, v in api["environment"].items()
           if v is not None and not k.startswith(("OTEL_", "GPTOSS_REDIS_"))},
        "GPTOSS_REDIS_URL": redis_url, "GPTOSS_API_HOST": "127.0.0.1", "GPTOSS_API_PORT": str(port),
        # The volume's mount point, here: the cache the tests prepared (where a worker would have).
        "GPTOSS_CACHE_DIR": str(Path(prepared_models.cache_dir)), "HF_HOME": str(processes.logs / "hf"),
        "PATH": "/usr/bin:/bin",
    }  # fmt: skip
    assert api["environment"]["GPTOSS_CACHE_DIR"] == cache["target"]
    processes.start("api", ["api"], env)
    base = f"http://127.0.0.1:{port}"
    dead = lambda: processes.children[0].poll() is not None  # noqa: E731
    wait_for(lambda: http_ok(f"{base}/healthz") or dead(), 60, "the composed API to answer")
    assert not dead(), (processes.logs / "api.log").read_text()[-2000:]
    key, _ = create_key(Redis.from_url(redis_url), "acme")  # compose keeps API keys on
    answer = requests.post(
        f"{base}/v1/jobs",
        json={"prompt": LONG_PROMPT, "max_tokens": 4},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"]["code"] == "prompt_too_long"
    assert "prompt_not_counted" not in (processes.logs / "api.log").read_text()
