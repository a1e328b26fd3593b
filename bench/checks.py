"""What the faults bench counts and checks, as a client sees a job: the calls it makes (every answer
counted), a probe of the API during an outage, each job's results, terminal events and retries, its
stream replayed against its stored result, and the verdict of issue 17's checks."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import requests
from redis.exceptions import RedisError

from bench.stack import wait_ready
from shared import keys
from shared.harmony import FINAL_CHANNEL, REASONING_CHANNEL
from shared.jobstore import events, lifecycle

STREAM_MAX_TOKENS = 48
STALL_SLO = 3.0
"""Seconds the API may take to answer while Redis is away (issue 17)."""


class Client:
    """The bench's calls to the API: every answer counted by status (503 with Retry-After apart) and
    timed, one requests.Session per thread."""

    def __init__(self, base: str):
        self.base = base
        self.codes: Counter[str] = Counter()
        self.calls: list[tuple[float, float, str]] = []  # (started, seconds, what)
        self._lock, self._local = threading.Lock(), threading.local()

    def call(self, method: str, path: str, what: str = "", timeout: float = 30, **kw: Any) -> Any:
        """The response, or None when the call itself failed (counted as client_error)."""
        session = getattr(self._local, "session", None) or requests.Session()
        self._local.session = session
        started, clock = time.time(), time.perf_counter()
        try:
            response = session.request(method, self.base + path, timeout=timeout, **kw)
            status = str(response.status_code)
            if response.status_code == 503 and "Retry-After" in response.headers:
                status = "503+retry-after"
        except requests.RequestException as exc:
            response, status = None, f"client_error:{type(exc).__name__}"
        with self._lock:
            self.codes[status] += 1
            self.calls.append((started, time.perf_counter() - clock, what or method))
        return response

    def figures(self) -> dict[str, Any]:
        codes = dict(self.codes)
        return {
            "answers": codes,
            "http_5xx": sum(n for c, n in codes.items() if c.startswith("5")),
            "http_5xx_not_503_retry_after": sum(
                n for c, n in codes.items() if c.startswith("5") and c != "503+retry-after"
            ),
        }

    def slowest(self, start: float, end: float) -> dict[str, float]:
        """The longest answer by kind of call, among calls under way at some time between `start`
        and `end` (unix seconds)."""
        longest: dict[str, float] = {}
        for started, seconds, what in self.calls:
            if started <= end and started + seconds >= start:
                longest[what] = round(max(longest.get(what, 0.0), seconds), 2)
        return longest


class Probe:
    """Clients during an outage: one submits, one polls a job, one calls /healthz, each one request
    at a time; the jobs it got accepted must end like the others."""

    def __init__(self, bench: Any, client: Client, poll_id: str | None):
        self._bench, self._client, self._poll_id = bench, client, poll_id
        self.accepted: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(kind,), daemon=True)
                         for kind in ("submit", "poll", "healthz")]  # fmt: skip

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)

    def _loop(self, kind: str) -> None:
        while not self._stop.is_set():
            if kind == "submit":
                self.accepted += self._bench.submit(self._client, 1, "submit")
            elif kind == "poll" and self._poll_id is not None:
                self._client.call("GET", f"/v1/jobs/{self._poll_id}", "poll", timeout=60)
            else:
                self._client.call("GET", "/healthz", "healthz", timeout=60)
            self._stop.wait(0.2)


# --- reading what a job left ----------------------------------------------------------------------


def terminal_events(redis: Any, job_id: str) -> int:
    """`done` and `error` events on the job's stream (exactly one for a job that ended)."""
    endings = {e.encode() for e in events.ENDINGS}
    return sum(1 for _, fields in redis.xrange(keys.job_stream(job_id)) if fields[b"event"] in endings)


def retries(redis: Any, job_id: str) -> int:
    job = lifecycle.fetch(redis, job_id)
    return lifecycle.read(job).retries if job is not None else 0


def replay_stream(client: Client, job_id: str, view: dict[str, Any]) -> str:
    """Read the job's SSE stream from its start as a client would (text of a `retry`ed run dropped):
    `same` or `differs` from the stored result, `error` (an error event), or `unread`."""
    answer = client.call("GET", f"/v1/jobs/{job_id}/events", "events", timeout=30, stream=True)
    if answer is None or answer.status_code != 200:
        return "unread"
    texts: defaultdict[str, str] = defaultdict(str)
    with answer:
        for kind, data in sse_events(answer.iter_lines(decode_unicode=True)):
            if kind == events.RETRY:
                texts = defaultdict(str)
            elif kind == events.TOKEN:
                texts[data["channel"]] += data["text"]
            elif kind == events.ERROR:
                return "error"
            elif kind == events.DONE:
                result = view.get("result") or {}
                same = texts[FINAL_CHANNEL] == result.get("text", "") and texts[REASONING_CHANNEL] == (
                    result.get("reasoning") or ""
                )
                return "same" if same else "differs"
    return "unread"


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) of each Server-Sent Event of `lines`."""
    kind, data = None, []
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif not line and kind is not None:
            yield kind, json.loads("\n".join(data))
            kind, data = None, []


def openai_stream(client: Client, prompt: str, out: dict[str, Any]) -> None:
    """One streamed greedy chat completion read to its end into `out` (job id, texts, pieces seen,
    the error it ended with, whether [DONE] came)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": STREAM_MAX_TOKENS,
            "temperature": 0, "stream": True}  # fmt: skip
    answer = client.call("POST", "/v1/chat/completions", "stream", timeout=300, json=body, stream=True)
    if answer is None or answer.status_code != 200:
        out["error"] = "http" if answer is None else str(answer.status_code)
        return
    out.update(job_id=answer.headers.get("X-Job-ID"), content="", reasoning="", error=None, done=False)
    with answer:
        for line in answer.iter_lines(decode_unicode=True):
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                break
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                out["error"] = chunk["error"].get("code") or "error"
                continue
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                for field, into in (("content", "content"), ("reasoning_content", "reasoning")):
                    if delta.get(field):
                        out[into] += delta[field]
                        out["pieces"] += 1


def compare_stream(out: dict[str, Any], view: dict[str, Any] | None) -> str:
    """What a streamed answer was: `error` (it ended with one), `differs` (from the stored result,
    silently), `over_max_tokens`, `same`, or `unfinished` (no [DONE], or its job never finished)."""
    if out.get("error"):
        return "error"
    if not out.get("done") or view is None or view.get("status") != "finished":
        return "unfinished"
    result = view.get("result") or {}
    if out["content"] != result.get("text", "") or out["reasoning"] != (result.get("reasoning") or ""):
        return "differs"
    return "over_max_tokens" if out["pieces"] > STREAM_MAX_TOKENS else "same"


# --- figures --------------------------------------------------------------------------------------


def distribution(values: Iterable[int]) -> dict[str, int]:
    """How many jobs had each value, e.g. {"1": 100}."""
    return {str(k): n for k, n in sorted(Counter(values).items())}


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of several runs added up (counters and distributions summed, maxima kept)."""
    total: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if name.startswith("per_") or name == "hand_back_seconds":
                total.setdefault(name, []).extend(value if isinstance(value, list) else [value])
            elif isinstance(value, dict) and all(isinstance(n, int) for n in value.values()):
                merged = Counter(total.get(name) or {})
                merged.update(value)
                total[name] = dict(sorted(merged.items()))
            elif isinstance(value, dict):
                total[name] = {**(total.get(name) or {}), **value}
            elif isinstance(value, int | float) and not isinstance(value, bool):
                total[name] = total.get(name, 0) + value
            else:
                total.setdefault(name, value)
    return total


def verdict(figures: dict[str, Any]) -> list[str]:
    """The checks of issue 17 that `figures` fail."""
    jobs = figures["jobs"]
    exactly_one = {"1": jobs} if jobs else {}
    checks = {
        "lost": figures["lost"] == 0,
        "all_finished": figures["ended"] == ({"finished": jobs} if jobs else {}),
        "results_per_job": figures["results_per_job"] == exactly_one,
        "terminal_events_per_job": figures["terminal_events_per_job"] == exactly_one,
        "webhook_ids_per_job": figures.get("webhook_ids_per_job") in (None, exactly_one),
        "streams_differing_silently": figures["streams_differing_silently"] == 0,
        "streams_over_max_tokens": not figures.get("streams_over_max_tokens"),
        "http_5xx": figures["http_5xx_not_503_retry_after"] == 0,
        "api_max_seconds": (figures.get("api_max_seconds") or 0) <= STALL_SLO,
        "no_process_exited": not figures.get("exited_by_themselves"),
    }
    return [name for name, ok in checks.items() if not ok]


def key_scan(redis: Any) -> dict[str, dict[str, int]]:
    """Keys without a TTL at the end, by pattern, with their entries (the bounded-structure check
    of tests/test_key_lifetimes.py, on the bench's Redis)."""
    found: dict[str, dict[str, int]] = {}
    sizes = {b"list": redis.llen, b"set": redis.scard, b"zset": redis.zcard, b"hash": redis.hlen,
             b"stream": redis.xlen}  # fmt: skip
    for raw in redis.scan_iter(count=1000):
        if redis.ttl(raw) >= 0 or redis.type(raw) == b"none":
            continue
        parts = raw.decode().split(":")
        pattern = ":".join(parts[:2]) + (":*" if len(parts) > 2 else "")
        entry = found.setdefault(pattern, {"keys": 0, "entries": 0})
        entry["keys"] += 1
        entry["entries"] += int(sizes.get(redis.type(raw), lambda _: 1)(raw))
    return dict(sorted(found.items()))


def _view(client: Client, job_id: str) -> dict[str, Any] | None:
    """The job's view as `GET /v1/jobs/<id>` answers it (None: no 200 JSON answer)."""
    answer = client.call("GET", f"/v1/jobs/{job_id}", "poll", timeout=10)
    try:
        return answer.json() if answer is not None and answer.status_code == 200 else None
    except ValueError:
        return None


def _ready_after(base: str, limit: float) -> float | None:
    """Seconds until /readyz answers 200 (None: not within `limit`)."""
    began = time.monotonic()
    try:
        wait_ready(base, limit)
    except SystemExit:
        return None
    return round(time.monotonic() - began, 2)


def _quiet(read: Callable[[], Any], default: Any) -> Any:
    try:
        return read()
    except RedisError:
        return default


def show(name: str, figures: dict[str, Any]) -> None:
    """Print one scenario's verdict and figures."""
    shown = {k: v for k, v in figures.items() if not k.startswith("per_")}
    print(f"== {name}: {'ok' if not figures['failed_checks'] else 'FAILED ' + str(figures['failed_checks'])}")
    print(json.dumps(shown, indent=2), flush=True)


def off_by_one(counts: dict[str, int] | None) -> str:
    """Jobs whose count was not exactly one ('-' where it does not apply)."""
    return "-" if counts is None else str(sum(n for value, n in counts.items() if value != "1"))
