"""Faults against real processes on loopback, at the default heartbeat settings (shared/settings.py):
each scenario runs jobs through the whole stack while one process is killed or paused, then checks,
as a client sees it, that every job ended exactly once.

Scenarios (`--scenarios`, all by default, in this order):
- worker_kills: `--jobs` jobs while the busy gpu-single worker is SIGKILLed `--kills` times (each
  replaced at once), `--runs` times over.
- worker_pause: the busy gpu-single worker SIGSTOPped 10 s, then SIGCONT.
- redis_kill: Redis SIGKILLed for 10 s while a worker is busy, restarted on the same data dir (AOF,
  appendfsync always).
- redis_stall_10, redis_stall_30: Redis SIGSTOPped 10 s / 30 s while a worker is busy.
- scheduler_kill: the scheduler SIGKILLed with a job in flight, restarted.
- stream_kill: `--streams` streamed OpenAI chat completions (greedy) across a SIGKILL of their
  worker, `--kills` times.

Each prints and records: lost (accepted jobs that never ended), results per job (RQ results
stored), terminal events per job (`done` + `error` on its event stream), webhook ids per job
(distinct `webhook-id`s a local receiver got), streams whose text differs from the stored result
without an error event (every finished job's SSE replayed; the live OpenAI streams), 5xx answers,
and during a Redis outage the longest answer of the API. Every wait has a limit. Writes
bench/results/faults.json; exits 1 when a check fails.

    .venv/bin/python bench/faults.py [--scenarios worker_kills,redis_stall_10] [--runs 10] [--jobs 100]
"""

from __future__ import annotations

import base64
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from redis.exceptions import RedisError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.checks import (  # noqa: E402
    Client,
    Probe,
    _quiet,
    _ready_after,
    _view,
    compare_stream,
    distribution,
    key_scan,
    merge,
    off_by_one,
    openai_stream,
    replay_stream,
    retries,
    show,
    terminal_events,
    verdict,
)
from bench.stack import Cluster, WebhookReceiver, wait_ready, write_results  # noqa: E402
from shared import keys  # noqa: E402
from shared.heartbeat import WorkerBeat, read_live  # noqa: E402
from shared.jobstore import ledger, lifecycle, rqstore  # noqa: E402
from shared.settings import Settings  # noqa: E402

SCENARIOS = (
    "worker_kills", "worker_pause", "redis_kill", "redis_stall_10", "redis_stall_30", "scheduler_kill",
    "stream_kill",
)  # fmt: skip
BODY = {
    "messages": [{"role": "user", "content": "Count from one to twenty in words."}],
    "max_tokens": 12,
    "temperature": 0,
}
STREAM_PROMPTS = ("Name the days of the week.", "Count from one to twenty in words.",
                  "List five colours.", "Name the months of the year.")  # fmt: skip
ENDED = ("finished", "failed", "rejected", "cancelled", "expired")
PAUSE = 10.0
"""Seconds a worker stays SIGSTOPped, and Redis stays killed."""
BUSY_LIMIT = 60.0
"""Seconds to wait for a worker to be busy before a fault (given up when no job waits or runs)."""
HAND_BACK_LIMIT = 60.0
"""Seconds to wait for the reaper to hand back a killed worker's jobs."""
WEBHOOK_LIMIT, WEBHOOK_GRACE = 30.0, 3.0
"""Seconds to wait for every ended job's webhook, then for any second one."""


class Bench:
    """What every scenario uses: the cluster, the webhook receiver and the limits."""

    def __init__(self, cluster: Cluster, receiver: WebhookReceiver, wait_limit: float):
        self.cluster, self.receiver, self.wait_limit = cluster, receiver, wait_limit

    def submit(self, client: Client, count: int, what: str = "submit") -> list[str]:
        """Submit `count` jobs with a webhook; the ids accepted."""
        ids = []
        for _ in range(count):
            answer = client.call("POST", "/v1/jobs", what, json={**BODY, "webhook": self.receiver.url})
            if answer is not None and answer.status_code == 202:
                ids.append(answer.json()["id"])
        return ids

    def busy_worker(self, limit: float = BUSY_LIMIT) -> tuple[str, WorkerBeat] | None:
        """A busy gpu-single worker of ours (child name, heartbeat); None when none gets busy in
        `limit` s, or no job waits or runs any more."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            redis = self.cluster.redis
            try:
                beats = read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)
                idle = not ledger.running(redis) and not lifecycle.waiting_count(redis)
            except RedisError:
                beats, idle = [], False
            for beat in beats:
                name = self.cluster.name_of(beat.pid)  # a heartbeat outlives its worker by its TTL
                if beat.queue == keys.SINGLE_QUEUE and beat.state == "busy" and self.cluster.running(name):
                    assert name is not None
                    return name, beat
            if idle:
                return None
            time.sleep(0.05)
        return None

    def kill_busy_worker(self) -> float | None:
        """SIGKILL the busy gpu-single worker and start another at once; seconds until the reaper
        handed back its jobs (None: no worker got busy, or not handed back in the limit)."""
        found = self.busy_worker()
        if found is None:
            return None
        name, beat = found
        killed = time.monotonic()
        self.cluster.signal(name, signal.SIGKILL)
        self.cluster.start_worker(keys.SINGLE_QUEUE)
        while time.monotonic() - killed < HAND_BACK_LIMIT:
            entries = _quiet(lambda: ledger.running(self.cluster.redis), {})
            if not any(entry.worker == beat.name for entry in entries.values()):
                return round(time.monotonic() - killed, 2)
            time.sleep(0.1)
        return None

    def wait_ended(self, client: Client, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The view of each job of `ids` that ended within the wait limit. Jobs end roughly in the
        order they came, so each round polls them in order up to the first still going (a poll of
        every job every second would take the workers' CPU); a last round polls all that remain."""
        deadline, views = time.monotonic() + self.wait_limit, {}
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            while pending and (view := _view(client, pending[0])) is not None and view.get("status") in ENDED:
                views[pending.pop(0)] = view
            if pending:
                time.sleep(1.0)
        for job_id in pending:
            view = _view(client, job_id)
            if view is not None and view.get("status") in ENDED:
                views[job_id] = view
        return views

    def settle(self, client: Client, ids: list[str], webhooks: bool = True) -> dict[str, Any]:
        """Wait for `ids` to end, then count what each left: results, terminal events, webhook ids,
        and whether its replayed event stream tells the stored result."""
        views = self.wait_ended(client, ids)
        if webhooks:
            self._wait_webhooks(list(views))
        redis = self.cluster.redis
        replays = Counter(replay_stream(client, job_id, view) for job_id, view in views.items())
        figures: dict[str, Any] = {
            "jobs": len(ids),
            "ended": dict(Counter(view["status"] for view in views.values())),
            "lost": len(ids) - len(views),
            "lost_jobs": {j: (_view(client, j) or {}).get("status") for j in ids if j not in views},
            "results_per_job": distribution(rqstore.result_count(job_id, redis) for job_id in ids),
            "terminal_events_per_job": distribution(terminal_events(redis, job_id) for job_id in ids),
            "webhook_ids_per_job": distribution(self.receiver.ids_of(j) for j in ids) if webhooks else None,
            "webhook_deliveries": sum(self.receiver.deliveries[j] for j in ids) if webhooks else None,
            "retried_jobs": sum(1 for job_id in ids if retries(redis, job_id) > 0),
            "retries_per_job": distribution(retries(redis, job_id) for job_id in ids),
            "streams_replayed": dict(replays),
            "streams_differing_silently": replays["differs"],
        }
        return figures | client.figures()

    def _wait_webhooks(self, ended: list[str]) -> None:
        deadline = time.monotonic() + WEBHOOK_LIMIT
        while time.monotonic() < deadline and any(self.receiver.ids_of(j) == 0 for j in ended):
            time.sleep(0.2)
        time.sleep(WEBHOOK_GRACE)  # a second delivery (a zombie's) comes after the first


# --- the scenarios ------------------------------------------------------------------------------


def worker_kills(bench: Bench, jobs: int, kills: int, runs: int) -> dict[str, Any]:
    """`jobs` jobs while the busy worker is SIGKILLed `kills` times, `runs` times over."""
    per_run = []
    for run in range(runs):
        client = Client(bench.cluster.base)
        ids = bench.submit(client, jobs)
        detections = [bench.kill_busy_worker() for _ in range(kills)]
        figures = bench.settle(client, ids) | {"hand_back_seconds": detections}
        per_run.append(figures)
        print(f"  run {run + 1}/{runs}: ended {figures['ended']}, lost {figures['lost']}, hand-back s "
              f"{detections}, results/job {figures['results_per_job']}", flush=True)  # fmt: skip
    total = merge(per_run)
    finished = sum(r["ended"].get("finished", 0) for r in per_run)
    return total | {"runs": runs, "finished": f"{finished}/{total['jobs']}", "per_run": per_run}


def worker_pause(bench: Bench, burst: int) -> dict[str, Any]:
    """The busy worker SIGSTOPped for PAUSE seconds, then continued."""
    client = Client(bench.cluster.base)
    ids = bench.submit(client, burst)
    found = bench.busy_worker()
    if found is not None:
        bench.cluster.signal(found[0], signal.SIGSTOP)
        try:
            time.sleep(PAUSE)
        finally:
            bench.cluster.signal(found[0], signal.SIGCONT)
    return bench.settle(client, ids) | {"paused": found is not None}


def redis_outage(bench: Bench, burst: int, seconds: float, kill: bool) -> dict[str, Any]:
    """Redis SIGKILLed (restarted on its AOF) or SIGSTOPped for `seconds` while a worker is busy,
    while clients submit, poll and check /healthz; the API's longest answer meanwhile."""
    cluster, client = bench.cluster, Client(bench.cluster.base)
    ids = bench.submit(client, burst)
    busy = bench.busy_worker() is not None
    probe = Probe(bench, client, ids[0] if ids else None)
    probe.start()
    time.sleep(1.0)  # the probe's answers before the outage
    began = time.time()
    if kill:
        cluster.signal("redis", signal.SIGKILL)
        time.sleep(seconds)
        cluster.start_redis()
    else:
        cluster.signal("redis", signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            cluster.signal("redis", signal.SIGCONT)
    back = time.time()
    ready_after = _ready_after(cluster.base, 120)
    time.sleep(2.0)
    probe.stop()
    slowest = client.slowest(began, back)
    figures = bench.settle(client, ids + probe.accepted)
    return figures | {
        "worker_busy_at_outage": busy,
        "accepted_during_outage": len(probe.accepted),
        "api_seconds_during_outage": slowest,
        "api_max_seconds": max(slowest.values(), default=None),
        "ready_after_seconds": ready_after,
    }


def scheduler_kill(bench: Bench, burst: int) -> dict[str, Any]:
    """The scheduler SIGKILLed while it holds a job in flight (caught stopped with one), restarted."""
    cluster, client = bench.cluster, Client(bench.cluster.base)
    ids: list[str] = []
    submitter = threading.Thread(target=lambda: ids.extend(bench.submit(client, burst)), daemon=True)
    submitter.start()
    in_flight: list[bytes] = []
    while submitter.is_alive() and not in_flight:
        cluster.signal("scheduler", signal.SIGSTOP)  # a still picture: is a job in its hands?
        try:
            in_flight = cluster.redis.lrange(keys.SCHEDULER_INFLIGHT, 0, -1)
        finally:
            if not in_flight:
                cluster.signal("scheduler", signal.SIGCONT)
        time.sleep(0.002)
    cluster.signal("scheduler", signal.SIGKILL)  # with a job in flight, or (none caught) after the burst
    submitter.join(60)
    time.sleep(1.0)
    cluster.start("scheduler", "scheduler")
    return bench.settle(client, ids) | {"in_flight_at_kill": len(in_flight)}


def stream_kill(bench: Bench, streams: int, rounds: int) -> dict[str, Any]:
    """`streams` greedy OpenAI chat streams at once, their worker SIGKILLed once they flow; each
    stream's text compared with its job's stored result, `rounds` times."""
    per_round, outcomes = [], Counter[str]()
    for _ in range(rounds):
        client = Client(bench.cluster.base)
        outs: list[dict[str, Any]] = [{"pieces": 0} for _ in range(streams)]
        readers = [
            threading.Thread(
                target=openai_stream, args=(client, STREAM_PROMPTS[i % len(STREAM_PROMPTS)], out)
            )
            for i, out in enumerate(outs)
        ]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + BUSY_LIMIT
        while time.monotonic() < deadline and not any(out["pieces"] >= 3 for out in outs):
            time.sleep(0.02)
        flowing = sum(1 for out in outs if out["pieces"])  # streams the kill cuts mid-answer
        detection = bench.kill_busy_worker()
        deadline = time.monotonic() + bench.wait_limit
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        ids = [out["job_id"] for out in outs if out.get("job_id")]
        figures = bench.settle(client, ids, webhooks=False)
        views = {job_id: _view(client, job_id) for job_id in ids}
        for out in outs:
            outcomes[compare_stream(out, views.get(out.get("job_id", "")))] += 1
        per_round.append(figures | {"hand_back_seconds": [detection], "streams_with_tokens_at_kill": flowing})
    total = merge(per_round)
    return total | {
        "openai_streams": dict(outcomes),
        "streams_differing_silently": total["streams_differing_silently"] + outcomes["differs"],
        "streams_over_max_tokens": outcomes["over_max_tokens"],
        "per_round": per_round,
    }


@click.command()
@click.option("--scenarios", default=",".join(SCENARIOS), show_default=True, help="Comma-separated subset")
@click.option("--runs", default=10, show_default=True, help="Runs of worker_kills")
@click.option("--jobs", default=100, show_default=True, help="Jobs of each worker_kills run")
@click.option("--kills", default=3, show_default=True, help="Worker kills per run (and stream_kill rounds)")
@click.option("--burst", default=20, show_default=True, help="Jobs in flight in the other scenarios")
@click.option("--streams", default=8, show_default=True, help="Concurrent streams of stream_kill")
@click.option("--wait-limit", default=300.0, show_default=True, help="Seconds jobs may take to end")
def main(
    scenarios: str, runs: int, jobs: int, kills: int, burst: int, streams: int, wait_limit: float
) -> None:
    """Run the chosen scenarios on one cluster, print each, write the JSON, exit 1 on a failed check."""
    chosen = [s.strip() for s in scenarios.split(",") if s.strip()]
    if unknown := sorted(set(chosen) - set(SCENARIOS)):
        raise click.BadParameter(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    defaults = {name: Settings.model_fields[name].default
                for name in ("heartbeat_interval", "heartbeat_ttl", "job_max_retries")}  # fmt: skip
    secret = "whsec_" + base64.b64encode(b"faults-bench-secret-0123456789ab").decode()
    env = {"GPTOSS_AUTH": "false", "GPTOSS_RESPONSE_CACHE": "false",  # repeats must run, not hit the cache
           "GPTOSS_WEBHOOK_SECRET": secret, "GPTOSS_WEBHOOK_ALLOW_PRIVATE": "true"}  # fmt: skip
    runners: dict[str, Callable[[Bench], dict[str, Any]]] = {
        "worker_kills": lambda b: worker_kills(b, jobs, kills, runs),
        "worker_pause": lambda b: worker_pause(b, burst),
        "redis_kill": lambda b: redis_outage(b, burst, PAUSE, kill=True),
        "redis_stall_10": lambda b: redis_outage(b, burst, 10.0, kill=False),
        "redis_stall_30": lambda b: redis_outage(b, burst, 30.0, kill=False),
        "scheduler_kill": lambda b: scheduler_kill(b, burst),
        "stream_kill": lambda b: stream_kill(b, streams, kills),
    }
    print(f"faults: {', '.join(chosen)}; default settings {defaults}", flush=True)
    record: dict[str, Any] = {"benchmark": "faults", "settings": defaults, "scenarios": {}}
    began = time.monotonic()
    receiver = WebhookReceiver()
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gptoss-faults-")), env)
    try:
        cluster.start_all(240)
        for name in chosen:
            healed = cluster.heal()
            if healed:
                wait_ready(cluster.base, 240)
            exited_before, started = set(cluster.exited()), time.monotonic()
            figures = runners[name](Bench(cluster, receiver, wait_limit))
            figures["exited_by_themselves"] = sorted(set(cluster.exited()) - exited_before)
            figures["restarted_before"] = healed
            figures["seconds"] = round(time.monotonic() - started, 1)
            figures["failed_checks"] = verdict(figures)
            record["scenarios"][name] = figures
            show(name, figures)
        record["keys_without_ttl"] = _quiet(lambda: key_scan(cluster.redis), None)
    finally:
        cluster.stop()
        receiver.close()
    record["seconds"] = round(time.monotonic() - began, 1)
    record["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"\n{'scenario':<16}{'lost':>6}{'results≠1':>11}{'terminal≠1':>12}{'webhooks≠1':>12}"
          f"{'differing':>11}{'5xx':>6}{'api max s':>11}  verdict")  # fmt: skip
    for name, f in record["scenarios"].items():
        print(f"{name:<16}{f['lost']:>6}{off_by_one(f['results_per_job']):>11}{off_by_one(f['terminal_events_per_job']):>12}"
              f"{off_by_one(f['webhook_ids_per_job']):>12}{f['streams_differing_silently']:>11}"
              f"{f['http_5xx_not_503_retry_after']:>6}{str(f.get('api_max_seconds', '-')):>11}  "
              f"{'ok' if not f['failed_checks'] else ','.join(f['failed_checks'])}")  # fmt: skip
    print("5xx: answers 5xx other than 503 with Retry-After (every status is in the JSON's `answers`)")
    print(f"keys without a TTL at the end: {record['keys_without_ttl']}")
    print(f"took {record['seconds']} s")
    write_results("faults", record)
    raise SystemExit(0 if all(not f["failed_checks"] for f in record["scenarios"].values()) else 1)


if __name__ == "__main__":
    main()
