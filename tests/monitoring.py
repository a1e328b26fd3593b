"""Real Prometheus and Alertmanager (Debian's binaries) for the live monitoring tests, configured from
the committed files in compose/ with only the addresses and the timings changed, and a webhook
receiver that records what Alertmanager delivers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
import yaml

from cli.up import free_port
from tests.conftest import RULES, http_ok, wait_for

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = ROOT / "compose" / "prometheus" / "prometheus.yml"
CENTRAL_CONFIG = ROOT / "compose" / "prometheus" / "central.yml"
ALERTMANAGER_CONFIG = ROOT / "compose" / "alertmanager" / "alertmanager.yml"
WEBHOOK_BASE = "http://alert-webhook:9095"
"""Where the committed alertmanager.yml sends its webhooks; the tests put their receiver there."""


@dataclass(frozen=True)
class Server:
    """A Prometheus or Alertmanager the test started: its base URL and its log."""

    url: str
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` evaluates to now (Prometheus's HTTP API)."""
        body = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])


def as_promql(expr: str, cluster: str = ".*") -> str:
    """A dashboard query as Grafana sends it with All models and queues and `cluster` selected
    (`$__rate_interval` as 1m)."""
    replaced = expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$queue", ".*")
    return replaced.replace("$cluster", cluster)


def binary(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} must be on PATH (Debian's package; scripts/setup installs it)"
    return found


@contextmanager
def running(argv: list[str], log: Path, ready: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run `argv` until the block ends, once `ready` (a URL) answers 200."""
    with open(log, "wb") as out:
        child = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        wait_for(lambda: http_ok(ready) or child.poll() is not None, 60, f"{argv[0]} to be ready")
        assert child.poll() is None, log.read_text()[-3000:]
        yield
    finally:
        child.terminate()
        child.wait(30)


def fast_rules(folder: Path, hold: str | None = None) -> Path:
    """The committed rule files copied into `folder`; with `hold`, every alert's `for:` set to it (the
    live alert test waits seconds, not minutes; promtool's tests pin the real durations)."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in RULES:
        groups = yaml.safe_load(file.read_text())
        if hold is not None:
            for group in groups["groups"]:
                for rule in group["rules"]:
                    if "alert" in rule:
                        rule["for"] = hold
        (folder / file.name).write_text(yaml.safe_dump(groups, sort_keys=False))
    return folder


def cluster_config(targets: dict[str, list[str]], rules: Path, alertmanager: str | None) -> dict[str, Any]:
    """compose/prometheus/prometheus.yml with the test's targets, rules, Alertmanager and a 1 s
    scrape and evaluation interval; external labels as committed."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    config["rule_files"] = [str(rules / "*.yml")]
    config["scrape_configs"] = [
        {"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in targets.items()
    ]
    if alertmanager is None:
        config.pop("alerting", None)
    else:
        config["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    return config


def central_config(clusters: list[str]) -> dict[str, Any]:
    """compose/prometheus/central.yml federating the Prometheus at each of `clusters` (host:port)."""
    config = yaml.safe_load(CENTRAL_CONFIG.read_text())
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    (federate,) = [job for job in config["scrape_configs"] if job["job_name"] == "federate"]
    federate["static_configs"] = [{"targets": clusters}]
    federate["scrape_interval"] = "1s"
    return config


@contextmanager
def prometheus(folder: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> Iterator[Server]:
    """A real Prometheus on `config`, with the features the compose stack turns on."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    argv = [binary("prometheus"), f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=exemplar-storage,expand-external-labels"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with running(argv, folder / "prometheus.log", f"{url}/-/ready", env):
        yield Server(url, folder / "prometheus.log")


@dataclass
class Receiver:
    """A webhook receiver: every Alertmanager notification it got, by path (its receiver's route)."""

    url: str
    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alerts(self, path: str) -> list[dict[str, Any]]:
        """Every alert delivered to `path`, in the order they came."""
        with self.lock:
            return [alert for message in self.received.get(path, []) for alert in message["alerts"]]


@contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    """An HTTP server on a free port that records each POSTed notification."""
    port = free_port()
    receiver = Receiver(f"http://127.0.0.1:{port}")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with receiver.lock:
                receiver.received.setdefault(self.path, []).append(body)
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def alertmanager_config(receiver: Receiver) -> str:
    """compose/alertmanager/alertmanager.yml with its webhooks sent to `receiver` and its waits cut
    to a second (the routes, matchers and receivers as committed)."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text().replace(WEBHOOK_BASE, receiver.url))
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        for timing in ("group_wait", "group_interval"):
            if timing in route:
                route[timing] = "1s"
    return yaml.safe_dump(config, sort_keys=False)


@contextmanager
def alertmanager(folder: Path, receiver: Receiver) -> Iterator[Server]:
    """A real Alertmanager (Debian's prometheus-alertmanager) on the committed config, alone (no
    cluster peers)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alertmanager.yml").write_text(alertmanager_config(receiver))
    port = free_port()
    argv = [binary("prometheus-alertmanager"), f"--config.file={folder / 'alertmanager.yml'}",
            f"--storage.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address="]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with running(argv, folder / "alertmanager.log", f"{url}/-/ready"):
        yield Server(url, folder / "alertmanager.log")
