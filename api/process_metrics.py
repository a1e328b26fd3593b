"""Several API processes on one host, scraped as one.

Each process holds a stable slot (0..N-1) and serves its own series, as OpenMetrics text, on a Unix
socket named after its slot. `/metrics` in whichever process a scrape reaches reads its siblings'
texts and merges them with its own by family, each sample labelled `api_process="<slot>"`, so a
counter stays one series per process and the exemplars survive (prometheus_client's multiprocess
mode drops them). A slot is an flock on `slot-<i>.lock`, released by the kernel when its process
dies, so gunicorn's replacement of a dead worker takes the dead one's slot: its counters restart
from zero in the same series, which `rate()` reads as an ordinary counter reset.
"""

from __future__ import annotations

import fcntl
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog
from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = structlog.get_logger()

SLOT_LABEL = "api_process"
"""Label naming the API process (its slot) on each of its series when there are several."""

EXTENSION = "gptoss_processes"
"""Key of the app's `ProcessGroup` in `app.extensions`; absent with one API process."""

SIBLING_TIMEOUT = 2.0
"""Seconds a scrape waits for one sibling's series (a process busy longer is left out of that scrape)."""

SLOT_POLL = 0.05
"""Seconds between looks for a free slot while every slot is held (a reload starting new workers
before the old ones have gone)."""

EOF_LINE = "# EOF\n"


class ProcessSlot:
    """This process's slot among the host's API processes, held by an flock that dies with it."""

    def __init__(self, folder: Path, index: int, count: int, lock: int):
        self.folder, self.index, self.count = folder, index, count
        self._lock = lock

    @classmethod
    def claim(cls, folder: Path, count: int) -> ProcessSlot:
        """The first free slot of `count` in `folder`, waiting while none is free."""
        waiting = False
        while True:
            for index in range(count):
                lock = os.open(folder / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(lock)
                    continue
                return cls(folder, index, count, lock)
            if not waiting:
                log.info("api_slot_waiting", processes=count)
                waiting = True
            time.sleep(SLOT_POLL)

    def release(self) -> None:
        """Give the slot up (a process that exits releases it anyway)."""
        os.close(self._lock)

    def socket_path(self, index: int) -> Path:
        """Where the process of slot `index` serves its series."""
        return self.folder / f"metrics-{index}.sock"

    def siblings(self) -> list[int]:
        """The other slots."""
        return [i for i in range(self.count) if i != self.index]


class _OwnSeriesServer(socketserver.ThreadingUnixStreamServer):
    """Answers each connection with the process's series in OpenMetrics text, then closes it."""

    daemon_threads = True

    def __init__(self, path: Path, registry: CollectorRegistry):
        self.registry = registry
        super().__init__(str(path), _OwnSeriesHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("api_process_series_unsent", exc_info=True)  # the reader gave up: its scrape skips us


class _OwnSeriesHandler(socketserver.BaseRequestHandler):
    server: _OwnSeriesServer

    def handle(self) -> None:
        self.request.sendall(generate_latest(self.server.registry))


def serve_own_series(registry: CollectorRegistry, path: Path) -> socketserver.BaseServer:
    """Serve `registry` on the Unix socket `path` from a daemon thread (a greenlet under gevent)."""
    path.unlink(missing_ok=True)  # a dead predecessor's, in the slot this process now holds
    server = _OwnSeriesServer(path, registry)
    threading.Thread(target=server.serve_forever, name="gptoss-process-metrics", daemon=True).start()
    return server


def read_series(path: Path, timeout: float = SIBLING_TIMEOUT) -> str | None:
    """A sibling's OpenMetrics text, or None when it does not answer in full within `timeout`."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sock.settimeout(left)
    except OSError:  # gone (no socket, refused), or too slow
        return None
    text = b"".join(chunks).decode("utf-8", errors="replace")
    return text if text.endswith(EOF_LINE) else None


def merge(texts: Mapping[str, str]) -> tuple[list[Metric], list[str]]:
    """Families of several processes' OpenMetrics texts merged by name, each sample labelled
    `api_process` with its process's slot (exemplars kept); and the slots whose text was merged
    (a malformed text is left out whole)."""
    families: dict[str, Metric] = {}
    merged: list[str] = []
    for slot, text in texts.items():
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:
            log.warning("api_process_series_malformed", api_process=slot)
            continue
        merged.append(slot)
        for family in parsed:
            into = families.get(family.name)
            if into is None:
                into = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = into
            if into.type != family.type:
                continue  # cannot be one family; the first process's kind wins
            into.samples.extend(s._replace(labels={**s.labels, SLOT_LABEL: slot}) for s in family.samples)
    return list(families.values()), merged


class ProcessGroup(Collector):
    """This API process among its siblings: serves its own series, and collects everyone's."""

    def __init__(self, slot: ProcessSlot, timeout: float = SIBLING_TIMEOUT):
        self.slot, self._timeout = slot, timeout
        self._own = CollectorRegistry()
        self._server: socketserver.BaseServer | None = None

    def init_app(self, app: Flask) -> None:
        """Serve `app`'s own metrics to the siblings, and make its `/metrics` serve every process's."""
        self._own = app.extensions["gptoss"].metrics.registry
        app.extensions[EXTENSION] = self

    def serve(self) -> None:
        """Start answering siblings' scrapes on this slot's socket."""
        self._server = serve_own_series(self._own, self.slot.socket_path(self.slot.index))
        log.info("api_process_serving", api_process=self.slot.index, processes=self.slot.count)

    def collect(self) -> Iterator[Metric]:
        texts = self._read_siblings()
        texts[self.slot.index] = generate_latest(self._own).decode()
        families, merged = merge({str(index): texts[index] for index in sorted(texts)})
        yield from families
        yield GaugeMetricFamily(
            "gptoss_api_processes_scraped", "API processes whose series this scrape holds", value=len(merged)
        )
        yield GaugeMetricFamily(
            "gptoss_api_processes", "API processes configured on this host", value=self.slot.count
        )

    def _read_siblings(self) -> dict[int, str]:
        """Each answering sibling's text, read all at once, so a hung one costs one timeout in all."""
        texts: dict[int, str] = {}

        def read(index: int) -> None:
            if (text := read_series(self.slot.socket_path(index), self._timeout)) is not None:
                texts[index] = text

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in self.slot.siblings()]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        return texts
