"""Run the API under gunicorn.

The default worker is gevent's: every connection is a greenlet, so the SSE streams and the
synchronous completions that wait for their job cost a few kilobytes each instead of a thread, and
thousands can be open while `/healthz` and submissions stay fast. A request's head (and the idle
time between two requests on a kept-alive connection) is bounded by `api_head_timeout`; each socket
read or write after it by `api_idle_timeout`, so slow or vanished clients cannot pile up. The app is
built in each worker, after gevent has patched the standard library (sockets, threads, queues), so
every Redis connection and lock it creates is cooperative.

Errors gunicorn answers itself (a request line or headers over its limits, a malformed request) are
JSON with a stable code, like every other error of this API.

With `api_processes` > 1 each worker takes a slot in a private folder the master creates, and its
`/metrics` serves every worker's series (`api/process_metrics.py`).
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import structlog
from flask import Flask
from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from gunicorn.http import errors as http_errors
from gunicorn.workers.ggevent import GeventWorker
from gunicorn.workers.gthread import ThreadWorker

from api.process_metrics import ProcessGroup, ProcessSlot
from shared.settings import Settings

log = structlog.get_logger()

GUNICORN_ERRORS: tuple[tuple[type[BaseException], int, str, str, str], ...] = (
    (http_errors.LimitRequestLine, 414, "URI Too Long", "uri_too_long", "The request line is too long."),
    (
        http_errors.LimitRequestHeaders,
        431,
        "Request Header Fields Too Large",
        "headers_too_large",
        "The request's headers are too many or too large.",
    ),
    (http_errors.ParseException, 400, "Bad Request", "bad_request", "The request is not valid HTTP/1.1."),
)
"""Errors of gunicorn's HTTP parser: (exception, status, reason, code, message), first match wins."""


class JsonLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger without its own handlers: records reach the root logger, rendered as JSON.

    Access lines are dropped because the app logs each request itself, with its request id.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            logger.handlers[:] = []
            logger.propagate = True

    def access(self, *args: Any, **kwargs: Any) -> None:
        pass


def error_response(exc: BaseException) -> tuple[bytes, int, str]:
    """The JSON answer to an error gunicorn met before the app saw the request: (bytes, status, code)."""
    status, reason, code, kind, message = 500, "Internal Server Error", "internal_error", "server_error", ""
    message = "The server failed to read the request."
    for error, error_status, error_reason, error_code, error_message in GUNICORN_ERRORS:
        if isinstance(exc, error):
            status, reason, code, kind, message = (
                error_status, error_reason, error_code, "invalid_request_error", error_message
            )  # fmt: skip
            break
    body = json.dumps({"error": {"code": code, "type": kind, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body, status, code


class JsonErrors:
    """A gunicorn worker whose own error answers are JSON."""

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.info("client_gone", error=type(exc).__name__)  # an expected ending: nothing to answer
            return
        payload, status, code = error_response(exc)
        if status >= 500:
            log.error("request_unreadable", error=type(exc).__name__, exc_info=exc)
        else:
            log.info("request_refused", status=status, code=code, error=type(exc).__name__)
        try:
            util.write_nonblock(client, payload)
        except OSError:
            pass  # the client is gone


class GeventApiWorker(JsonErrors, GeventWorker):  # type: ignore[misc]
    """gunicorn's gevent worker with JSON errors and a bound on every socket wait after the head."""

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        client.setblocking(1)
        client.settimeout(self.app.settings.api_idle_timeout)
        super(GeventWorker, self).handle(listener, client, addr)  # past GeventWorker's setblocking

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        try:
            return super().handle_request(listener_name, req, sock, addr)
        except TimeoutError:
            # The client stopped reading or sending: an expected ending, not the server's error.
            log.info("client_timed_out", path=getattr(req, "path", None))
            raise ConnectionResetError(errno.ECONNRESET, "client timed out") from None


class ThreadApiWorker(JsonErrors, ThreadWorker):  # type: ignore[misc]
    """gunicorn's thread worker with JSON errors (each open request holds one of its threads)."""


class ApiServer(BaseApplication):  # type: ignore[misc]
    """gunicorn serving the API app, built in each worker process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        gevent = settings.api_worker_class == "gevent"
        # Slots and metrics sockets of the workers, 0700 (mkdtemp), removed when the master exits.
        self._slots = Path(tempfile.mkdtemp(prefix="gptoss-api-")) if settings.api_processes > 1 else None
        self._group: ProcessGroup | None = None  # in a worker, when there are several
        self._options: dict[str, Any] = {
            "bind": f"{settings.api_host}:{settings.api_port}",
            "workers": settings.api_processes,
            "worker_class": GeventApiWorker if gevent else ThreadApiWorker,
            "worker_connections": settings.api_connections,
            "threads": settings.api_threads,
            # gevent: the bound on reading a request's head and on idling between requests.
            "keepalive": math.ceil(settings.api_head_timeout) if gevent else 2,
            "timeout": 0,  # long polls and streams are normal here
            "graceful_timeout": 10,
            "logger_class": JsonLogger,
            "post_fork": self._claim_slot,
            "post_worker_init": self._started,
            "on_exit": self._remove_slots,
            "control_socket_disable": True,  # unused, and one path per host would be shared by every API
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        from api.app import create_app

        app = create_app(self.settings)
        if self._group is not None:
            self._group.init_app(app)
        return app

    def _claim_slot(self, _server: Any, _worker: Any) -> None:
        """In a new worker, before it builds the app: take a free slot (a dead worker's, when this one
        replaces it), so its series keep their `api_process` label."""
        if self._slots is None:
            return
        slot = ProcessSlot.claim(self._slots, self.settings.api_processes)
        self._group = ProcessGroup(slot)
        log.info("api_process_started", api_process=slot.index, processes=slot.count)

    def _started(self, worker: Any) -> None:
        """In the serving process, its app built: answer siblings' scrapes, warm the tokenizer."""
        if self._group is not None:
            self._group.serve()
        self._warm(worker)

    def _remove_slots(self, _server: Any) -> None:
        if self._slots is not None:
            shutil.rmtree(self._slots, ignore_errors=True)

    def _warm(self, worker: Any) -> None:
        """In the serving process, as it starts: load the default model's tokenizer in the
        background, so the first request does not wait for it."""
        from api.submission import warm_prompt_tokenizer

        args = (worker.wsgi, self.settings.model)
        native_thread(target=warm_prompt_tokenizer, args=args, name="gptoss-warm", daemon=True).start()


def native_thread(**kwargs: Any) -> threading.Thread:
    """An operating-system thread even under gevent: loading a tokenizer is seconds of CPU work, which
    in a greenlet would hold every connection of the process until it ends."""
    from gevent import monkey

    if monkey.is_module_patched("threading"):
        thread_class: type[threading.Thread] = monkey.get_original("threading", "Thread")
        return thread_class(**kwargs)
    return threading.Thread(**kwargs)
