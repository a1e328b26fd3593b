"""Fuzz the API from its own OpenAPI document with schemathesis: at least 1000 generated cases
(valid and invalid) against the real running API. No answer may be 5xx, and every error answer
must be JSON with an error code. Loopback only; stops by itself. Writes JSON to bench/results/.

    .venv/bin/python bench/fuzz.py [--cases 1000]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import click
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stack import write_results  # noqa: E402
from cli.up import free_port  # noqa: E402

ADMIN_KEY = "fuzz-admin"
MAX_ROUNDS = 6
"""Rounds of generation at most, each with more examples per operation, until enough cases ran."""


def start_stack(folder: Path) -> tuple[list[subprocess.Popen], str, str]:
    """redis-server, API and scheduler (no worker: jobs are held, then expire); (children, base, key)."""
    port, api_port = free_port(), free_port()
    redis = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTOSS_")}
    env.update(
        {
            "GPTOSS_REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "GPTOSS_API_PORT": str(api_port),
            "GPTOSS_ADMIN_KEY": ADMIN_KEY,
            "GPTOSS_HOLD_TIMEOUT": "1",
            "GPTOSS_LOG_LEVEL": "warning",
            "GPTOSS_RATE_LIMIT_REQUESTS": "1000000",
            "GPTOSS_RATE_LIMIT_TOKENS": "1000000000",
            "GPTOSS_SCHEDULER_METRICS_PORT": "0",
            "GPTOSS_WEBHOOK_ALLOW_PRIVATE": "false",
        }
    )
    time.sleep(0.3)
    key = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "--tenant", "fuzz"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    log = open(folder / "stack.log", "wb")  # noqa: SIM115
    children = [redis] + [
        subprocess.Popen([sys.executable, "-m", m], cwd=ROOT, env=env, stdout=log, stderr=log)
        for m in ("api", "scheduler")
    ]
    base = f"http://127.0.0.1:{api_port}"
    for _ in range(300):
        try:
            if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.1)
    return children, base, key


def problems_of(response: requests.Response) -> list[str]:
    """What is wrong with one answer: a 5xx, or an error without a JSON body naming a code."""
    found = []
    if response.status_code >= 500 and response.status_code != 503:
        found.append(f"server error {response.status_code}")
    if response.status_code >= 400:
        try:
            code = response.json()["error"]["code"]
            if not isinstance(code, str) or not code:
                found.append("error without a code")
        except (ValueError, KeyError, TypeError):
            found.append(f"error {response.status_code} not JSON with error.code: {response.text[:120]!r}")
    return found


def fuzz_operation(
    operation: schemathesis.APIOperation,
    base: str,
    token: str,
    examples: int,
    statuses: Counter[int],
    failures: list[dict],
) -> int:
    """Run `examples` generated cases of one operation; how many ran."""
    ran = 0

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def exercise(case: schemathesis.Case) -> None:
        nonlocal ran
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        response = case.call(base_url=base, timeout=30)
        ran += 1
        statuses[response.status_code] += 1
        for problem in problems_of(response):
            failures.append(
                {"operation": operation.label, "problem": problem, "status": response.status_code}
            )

    try:
        exercise()
    except Unsatisfiable:
        pass
    return ran


@click.command()
@click.option("--cases", default=1000, show_default=True, help="Generated cases in all, at least.")
def main(cases: int) -> None:
    """Run the fuzzing and print/write the figures."""
    folder = Path(tempfile.mkdtemp(prefix="gptoss-fuzz-"))
    children, base, key = start_stack(folder)
    statuses: Counter[int] = Counter()
    failures: list[dict] = []
    ran = 0
    try:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        per_operation = max(20, cases // max(1, len(operations)) + 1)
        rounds = 0
        while ran < cases and rounds < MAX_ROUNDS:  # parameterless operations yield few distinct cases
            rounds += 1
            for operation in operations:
                token = ADMIN_KEY if operation.path.startswith("/admin") else key
                ran += fuzz_operation(operation, base, token, per_operation * rounds, statuses, failures)
    finally:
        for child in reversed(children):
            child.terminate()
            child.wait(30)
    record = {
        "benchmark": "fuzz",
        "cases": ran,
        "operations": len(operations),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
        "problems": failures[:50],
        "problem_count": len(failures),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(record, indent=2))
    write_results("fuzz", record)
    raise SystemExit(0 if ran >= cases and not failures else 1)


if __name__ == "__main__":
    main()
