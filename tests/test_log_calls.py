"""structlog's first parameter is named `event`: a call that also passes `event=` raises TypeError
instead of logging (a Redis error then killed a busy worker). This scans the code for such calls,
and checks that a stream write failing on Redis only logs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from redis import Redis

from shared.jobstore.events import EventBuffer, JobStream

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "scheduler", "workers", "shared", "cli", "bench")
LEVELS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "msg", "log"}


def _logger_names(tree: ast.AST) -> set[str]:
    """Names bound anywhere in a module to `structlog.get_logger(...)` or to a logger's `bind(...)`."""
    names = {"log", "logger"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            if isinstance(func, ast.Attribute) and func.attr in ("get_logger", "bind", "new"):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _calls_with_event_keyword(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = _logger_names(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in LEVELS:
            continue
        target = node.func.value
        is_logger = (isinstance(target, ast.Name) and target.id in names) or (
            isinstance(target, ast.Call)
            and isinstance(target.func, ast.Attribute)
            and target.func.attr == "get_logger"
        )
        if is_logger and any(k.arg == "event" for k in node.keywords):
            found.append(f"{path}:{node.lineno}")
    return found


def test_no_structlog_call_passes_event_as_a_field() -> None:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 50
    offenders = [hit for path in files for hit in _calls_with_event_keyword(path)]
    assert offenders == []


def test_the_scan_finds_such_a_call(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    keyword = "event"  # a call that passes it, written out only in the probe file
    bad.write_text(f'import structlog\nlog = structlog.get_logger()\nlog.warning("x", {keyword}="token")\n')
    assert _calls_with_event_keyword(bad) == [f"{bad}:3"]


@pytest.fixture
def dead_redis() -> Redis:
    """A client of a port nothing listens on: every command raises ConnectionError."""
    from cli.up import free_port

    return Redis(port=free_port(), socket_connect_timeout=0.2)


def test_stream_writes_on_a_dead_redis_only_log(dead_redis: Redis) -> None:
    buffer = EventBuffer(dead_redis)
    stream = JobStream(dead_redis, "job-1", buffer=buffer)
    stream.start(worker="w")
    stream.text("final", "hello")
    buffer.flush()
    stream.done({"text": "hello"}, {})
    stream.error("x", "y")
    unbuffered = JobStream(dead_redis, "job-2")
    unbuffered.text("final", "hi")
    unbuffered.done({"text": "hi"}, {})
