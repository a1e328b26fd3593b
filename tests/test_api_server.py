"""The API process as `gptoss up` starts it: it loads the default model's tokenizer as it starts,
so the first request does not wait for it."""

from __future__ import annotations

import json
from pathlib import Path

import requests

from cli.up import free_port
from tests.conftest import Processes, process_env, wait_for


def events(log: Path) -> list[dict]:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_the_api_loads_the_prompt_tokenizer_before_the_first_request(
    redis_url: str, prepared_models, processes: Processes
) -> None:
    port = free_port()
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_CACHE_DIR=prepared_models.cache_dir, GPTOSS_API_PORT=port,
        GPTOSS_MODEL="smollm2-135m",
    )  # fmt: skip
    processes.start("api", ["api"], env)
    log = processes.logs / "api.log"

    def loaded() -> list[dict]:
        return [e for e in events(log) if e.get("event") == "prompt_tokenizer_loaded"]

    wait_for(lambda: bool(loaded()), 120, "the API to load the tokenizer on its own")
    assert loaded()[0]["on"] == "start" and loaded()[0]["model"] == "smollm2-135m"
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    answer = requests.post(f"http://127.0.0.1:{port}/v1/jobs", json=body, timeout=30)
    assert answer.status_code == 202, answer.text
    assert len(loaded()) == 1  # the request used the loaded tokenizer
    assert not any("Control socket" in str(e.get("event")) for e in events(log))
