"""rq-dashboard at /admin/rq: behind the admin key, read-only by default, readable with JSON jobs."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from redis import Redis

from api import create_app
from cli.up import free_port
from shared import keys
from shared.jobstore.rqstore import fetch_job, open_queue
from tests.conftest import Processes, http_ok, poll_job, process_env, wait_for

KEY = "test-admin-key"
BEARER = {"Authorization": f"Bearer {KEY}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def client(redis: Redis, settings):  # type: ignore[no-untyped-def]
    return create_app(settings(admin_key=KEY), redis).test_client()


@pytest.mark.parametrize(
    "path",
    [
        "/admin/rq/",
        "/admin/rq/0/data/queues.json",
        "/admin/rq/0/view/workers",
        "/admin/rq/static/css/main.css",
    ],
)
def test_refused_without_the_key(client, path: str) -> None:  # type: ignore[no-untyped-def]
    for headers in ({}, {"Authorization": "Bearer wrong"}, basic("admin", "wrong")):
        response = client.get(path, headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Basic ")  # so a browser asks for it


def test_refused_when_admin_is_off(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    response = create_app(settings(), redis).test_client().get("/admin/rq/", headers=BEARER)
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "admin_disabled"


def test_an_empty_key_opens_nothing(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    client = create_app(settings(admin_key=""), redis).test_client()
    for headers in ({"Authorization": "Bearer "}, basic("admin", "")):
        response = client.get("/admin/rq/", headers=headers)
        assert response.status_code == 403 and response.get_json()["error"]["code"] == "admin_disabled"


def test_bearer_or_basic_key_opens_it(client, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    client.post("/v1/jobs", json={"prompt": "hi"})
    for headers in (BEARER, basic("anyone", KEY)):
        assert client.get("/admin/rq/", headers=headers).status_code == 200
        queues = client.get("/admin/rq/0/data/queues.json", headers=headers).get_json()["queues"]
        assert {q["name"]: q["count"] for q in queues} == {keys.INCOMING_QUEUE: 1}


def test_read_only_by_default(client, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    job_id = client.post("/v1/jobs", json={"prompt": "hi"}).get_json()["id"]
    writes = [
        ("post", f"/admin/rq/job/{job_id}/delete"),
        ("post", f"/admin/rq/job/{job_id}/requeue"),
        ("post", f"/admin/rq/queue/{keys.INCOMING_QUEUE}/queued/empty"),
        ("post", f"/admin/rq/queue/{keys.INCOMING_QUEUE}/compact"),
        ("get", f"/admin/rq/requeue/{keys.INCOMING_QUEUE}"),  # rq-dashboard's "requeue all" takes GET
    ]
    for method, path in writes:
        response = getattr(client, method)(path, headers=BEARER)
        assert response.status_code == 403, path
        assert response.get_json()["error"]["code"] == "dashboard_read_only"
    assert open_queue(keys.INCOMING_QUEUE, redis).job_ids == [job_id]
    page = client.get(f"/admin/rq/0/view/job/{job_id}", headers=BEARER).data
    assert b'<button id="delete-job-btn"' not in page  # the button is hidden too


def run_rq_worker(redis_url: str, queue: str) -> subprocess.Popen:
    """RQ's own burst worker with the project's serializer (no model: the jobs are stdlib calls)."""
    rq = Path(sys.executable).with_name("rq")
    argv = [str(rq), "worker", "--burst", "--url", redis_url, "--serializer", "rq.serializers.JSONSerializer",
            "--worker-class", "rq.SimpleWorker", queue]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_json_jobs_and_a_busy_worker_are_readable(client, redis: Redis, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    queue = open_queue(keys.SINGLE_QUEUE, redis)
    done = queue.enqueue("json.dumps", {"a": 1}, meta={"request_id": "r1"})
    failed = queue.enqueue("json.loads", "{not json", meta={"request_id": "r2"})
    busy = queue.enqueue("time.sleep", 30, meta={"request_id": "r3"})
    worker = run_rq_worker(redis_url, keys.SINGLE_QUEUE)
    try:

        def current_job() -> object:
            workers = client.get("/admin/rq/0/data/workers.json", headers=BEARER).get_json()["workers"]
            return workers[0]["current_job"] if workers else None

        def busy_with_sleep() -> bool:
            job = current_job()  # the first two jobs pass through first: wait for the long one
            return isinstance(job, dict) and job["job_id"] == busy.id

        # RQ's Worker.all ignores rq-dashboard's serializer (no current job could be read);
        # api.dashboard fixes that.
        wait_for(busy_with_sleep, 30, "the worker to be busy with the long job")
        for job in (done, failed, busy):
            info = client.get(f"/admin/rq/0/data/job/{job.id}.json", headers=BEARER).get_json()
            assert info["id"] == job.id and "request_id" in info["metadata"]
            assert client.get(f"/admin/rq/0/view/job/{job.id}", headers=BEARER).status_code == 200
        failed_list = client.get(
            f"/admin/rq/0/data/jobs/{keys.SINGLE_QUEUE}/failed/8/asc/1.json", headers=BEARER
        )
        assert [j["id"] for j in failed_list.get_json()["jobs"]] == [failed.id]
        assert "Traceback" in failed_list.get_json()["jobs"][0]["exc_info"]
    finally:
        worker.kill()
        worker.wait()


def test_writable_requeue_keeps_json(redis: Redis, redis_url: str, settings) -> None:  # type: ignore[no-untyped-def]
    client = create_app(settings(admin_key=KEY, rq_dashboard_writable=True), redis).test_client()
    queue = open_queue(keys.SINGLE_QUEUE, redis)
    failed = queue.enqueue("json.loads", "{not json", meta={"request_id": "r2"})
    worker = run_rq_worker(redis_url, keys.SINGLE_QUEUE)
    assert worker.wait(30) == 0
    assert fetch_job(failed.id, redis).get_status() == "failed"
    response = client.post(f"/admin/rq/job/{failed.id}/requeue", headers=BEARER)
    assert response.get_json() == {"status": "OK"}
    job = fetch_job(failed.id, redis)  # still JSON: the API can read what the dashboard wrote
    assert job.get_status() == "queued" and job.meta["request_id"] == "r2"
    assert client.post(f"/admin/rq/job/{failed.id}/delete", headers=BEARER).get_json() == {"status": "OK"}
    assert queue.count == 0 or failed.id not in queue.job_ids


def any_exited(processes: Processes) -> bool:
    """Some child of the test has exited (a stack that cannot become ready)."""
    return any(child.poll() is not None for child in processes.children)


def log_tails(processes: Processes, size: int = 1500) -> str:
    """The end of each child's log, to say why a stack did not start."""
    return "\n".join(
        f"== {log.name}\n{log.read_text()[-size:]}" for log in sorted(processes.logs.glob("*.log"))
    )


# --- In a real browser -------------------------------------------------------------------------


def chromium_driver(bearer: str | None):  # type: ignore[no-untyped-def]
    """Headless Debian Chromium through its chromedriver; with `bearer`, every request carries it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and chromedriver, "chromium and chromium-driver must be installed (scripts/setup)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # with both paths given, Selenium downloads nothing
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # to read HTTP statuses
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(30)
    if bearer:
        driver.execute_cdp_cmd("Network.enable", {})
        headers = {"Authorization": f"Bearer {bearer}"}
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})
    return driver


def page_status(driver, url: str) -> int:  # type: ignore[no-untyped-def]
    """The HTTP status the browser got for `url`, from its network log."""
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.responseReceived" and message["params"]["response"]["url"] == url:
            return int(message["params"]["response"]["status"])
    raise AssertionError(f"the browser never got a response for {url}")


def test_dashboard_in_chromium(redis_url: str, redis: Redis, processes: Processes, prepared_models) -> None:  # type: ignore[no-untyped-def]
    """The real API, scheduler and workers; headless Chromium shows the queues and the workers."""
    port = free_port()
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_MODEL="tiny-gpt-oss", GPTOSS_CACHE_DIR=prepared_models.cache_dir,
        GPTOSS_API_PORT=port, GPTOSS_ADMIN_KEY=KEY, GPTOSS_SCHEDULER_METRICS_PORT=0,
        GPTOSS_WORKER_METRICS_PORT=0, GPTOSS_HEARTBEAT_INTERVAL=0.5, GPTOSS_MULTI_GPU_THRESHOLD=64,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    processes.start("api", ["api"], env)
    processes.start("scheduler", ["scheduler"], env)
    for queue in keys.WORKER_QUEUES:
        processes.start(queue, ["workers"], {**env, "GPTOSS_WORKER_QUEUE": queue})
    wait_for(lambda: http_ok(f"{base}/readyz") or any_exited(processes), 120, "the stack to be ready")
    assert not any_exited(processes), log_tails(processes)
    # A short and a long prompt, so a job has passed through every queue (RQ lists a queue once used).
    for prompt in ("hi", "The quick brown fox jumps over the lazy dog. " * 20):
        job = requests.post(f"{base}/v1/jobs", json={"prompt": prompt, "max_tokens": 3}, timeout=5).json()
        assert poll_job(base, job["id"], 60)["status"] == "finished"

    from selenium.webdriver.common.by import By

    page = f"{base}/admin/rq/"
    driver = chromium_driver(KEY)
    try:

        def text() -> str:
            return str(driver.find_element(By.TAG_NAME, "body").text)

        driver.get(page)
        assert page_status(driver, page) == 200
        # The table is filled by the page's own polling of queues.json, through the same guard.
        queues = (keys.INCOMING_QUEUE, *keys.WORKER_QUEUES)
        wait_for(lambda: all(q in text() for q in queues), 30, "the queues on the page")
        driver.get(f"{base}/admin/rq/0/view/workers")
        wait_for(lambda: all(f".{q}" in text() for q in keys.WORKER_QUEUES), 30, "both workers on the page")
        assert "idle" in text()
    finally:
        driver.quit()

    anonymous = chromium_driver(None)
    try:
        anonymous.get(page)
        assert page_status(anonymous, page) == 401
        assert all(q not in anonymous.page_source for q in keys.WORKER_QUEUES)
    finally:
        anonymous.quit()
