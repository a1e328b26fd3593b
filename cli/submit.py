"""`gptoss submit`: a small client that submits one chat job, polls it and prints the answer."""

from __future__ import annotations

import time

import click
import requests

from shared.settings import Settings

POLL_INTERVAL = 0.25
"""Seconds between polls."""

TERMINAL = {"finished", "failed", "rejected"}


def submit_and_wait(
    settings: Settings, question: str, max_tokens: int | None, temperature: float, timeout: float
) -> int:
    """Submit, poll until the job ends or `timeout` passes; print the text. Returns an exit code."""
    body: dict = {"messages": [{"role": "user", "content": question}], "temperature": temperature}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    base = settings.api_url.rstrip("/")
    headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
    answer = requests.post(f"{base}/v1/jobs", json=body, headers=headers, timeout=30)
    if answer.status_code not in (200, 202):  # 200: answered at once, from the response cache
        click.echo(f"submit refused ({answer.status_code}): {answer.text}", err=True)
        return 1
    job = answer.json()
    click.echo(f"job {job['id']} {job['status']}", err=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = requests.get(f"{base}{job['url']}", headers=headers, timeout=30).json()
        if view["status"] in TERMINAL:
            if view["status"] == "finished":
                click.echo(view["result"]["text"])
                route = (
                    "cache" if view["result"].get("cache") == "hit" else view.get("route", {}).get("queue")
                )
                usage = view["result"]["usage"]
                click.echo(
                    f"[{route}; {usage['prompt_tokens']}+{usage['completion_tokens']} tokens]", err=True
                )
                return 0
            click.echo(f"job {view['status']}: {view.get('error')}", err=True)
            return 1
        time.sleep(POLL_INTERVAL)
    click.echo(f"job {job['id']} did not finish in {timeout} s", err=True)
    return 2
