"""SSE over a real HTTP server, followed while the worker generates (not replayed afterwards)."""

from __future__ import annotations

import json
import threading

import requests
from redis import Redis
from werkzeug.serving import make_server

from cli.up import free_port
from shared import keys
from tests.conftest import schedule_all, wait_for, work
from workers.tiny_model import CONVERSATIONS


def test_events_arrive_while_the_job_runs(streaming_stack, redis: Redis, runtime) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    config, client, scheduler = streaming_stack
    app = client.application
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        question, analysis, final = CONVERSATIONS[2]
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 60, "temperature": 0}
        job_id = requests.post(f"{base}/v1/jobs", json=body, timeout=10).json()["id"]
        schedule_all(scheduler, redis)
        events: list[tuple[str, dict]] = []
        connected = threading.Event()

        def listen() -> None:
            with requests.get(f"{base}/v1/jobs/{job_id}/events", stream=True, timeout=30) as response:
                connected.set()
                kind = None
                for line in response.iter_lines(decode_unicode=True):
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind:
                        events.append((kind, json.loads(line[6:])))

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        wait_for(connected.is_set, 10, "the event stream to open")
        assert not redis.exists(keys.job_stream(job_id))  # nothing generated yet: what follows is live
        work(config, redis, runtime, keys.SINGLE_QUEUE)
        listener.join(30)
        kinds = [k for k, _ in events]
        assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("token") >= 2, kinds
        assert "".join(d["text"] for k, d in events if k == "token" and d["channel"] == "final") == final
        assert events[-1][1]["reasoning"] == analysis
    finally:
        server.shutdown()
