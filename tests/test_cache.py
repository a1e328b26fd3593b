"""The response cache: prompt normalisation and fingerprints (pure), the bounded Redis cache, jobs
created finished, the API's hit path in-process, and the real processes end to end."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from redis import Redis
from rq.registry import FinishedJobRegistry

from api import create_app
from shared import keys
from shared.apikeys import create_key
from shared.contract import ChatMessage, JobRequest, JobSubmission
from shared.heartbeat import WorkerBeat, read_live
from shared.jobstore.rqstore import create_finished, fetch_job, open_queue, rq_matches
from shared.normalise import canonical, canonical_json, deterministic, fingerprint
from shared.prompts import load_prompt_tokenizer, prompt_token_ids
from shared.registry import model_spec
from shared.response_cache import ResponseCache, read_stats, store_finished, store_target
from tests.conftest import FakeClock, Processes, http_ok, process_env, wait_for

CAFE_NFC = "Caf\u00e9 au lait?\r\nAnswer in one word."
CAFE_NFD = unicodedata.normalize("NFD", "Caf\u00e9 au lait?") + "\nAnswer in one word."


def chat(content: str, **params: object) -> JobRequest:
    return JobRequest(messages=[ChatMessage(role="user", content=content)], **params)  # type: ignore[arg-type]


# --- normalisation and fingerprints ------------------------------------------------------------


def test_equal_meaning_gives_one_canonical_form_and_one_fingerprint() -> None:
    a = chat(CAFE_NFC, temperature=0, max_tokens=8, stop=["\r\n\r\n", "b"])
    b = chat(CAFE_NFD, temperature=0, max_tokens=8, stop=["b", "\n\n"])
    assert canonical(a).messages == canonical(b).messages
    assert canonical(a).messages[0].content == unicodedata.normalize("NFC", CAFE_NFD)  # type: ignore[index]
    assert "\r" not in canonical_json(a)
    assert canonical_json(a) == canonical_json(b)
    assert fingerprint("m", a, "t") == fingerprint("m", b, "t")
    # A lone CR is a newline too; a raw prompt and stop sequences are normalised alike.
    assert canonical(JobRequest(prompt="a\rb", stop="x\r\ny")).model_dump(include={"prompt", "stop"}) == {
        "prompt": "a\nb",
        "stop": ["x\ny"],
    }


def test_json_key_order_and_output_neutral_fields_do_not_matter() -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 8, "top_p": 1.0}
    reordered = json.loads(json.dumps(dict(reversed(list(body.items())))))
    one, two = JobSubmission.model_validate(body), JobSubmission.model_validate(reordered)
    assert fingerprint("m", one, "t") == fingerprint("m", two, "t")
    # Whether to use the cache, the session, the profile's name and how the job is run: not the output.
    other = JobSubmission.model_validate(
        {**body, "cache": False, "session_id": "s1", "profile": "balanced", "priority": "high"}
    )
    assert fingerprint("m", other, "t") == fingerprint("m", one, "t")
    # Greedy decoding ignores top_p and the seed.
    greedy = JobSubmission.model_validate({**body, "top_p": 0.5, "seed": 9})
    assert fingerprint("m", greedy, "t") == fingerprint("m", one, "t")


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "Hi!"}]},
        {"messages": [{"role": "system", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]},
        {"max_tokens": 9},
        {"temperature": 0.5, "seed": 1},
        {"stop": ["x"]},
        {"reasoning_effort": "high"},
        {"prompt": "Hi", "messages": None},
    ],
)
def test_different_meaning_gives_another_fingerprint(change: dict) -> None:
    base = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 8}
    changed = JobRequest.model_validate({**base, **change})
    assert fingerprint("m", changed, "t") != fingerprint("m", JobRequest.model_validate(base), "t")


def test_model_and_salt_are_part_of_the_fingerprint() -> None:
    request = chat("Hi", temperature=0)
    fp = fingerprint("m", request, "tenant:a")
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp != fingerprint("other", request, "tenant:a")
    assert fp != fingerprint("m", request, "tenant:b")


def test_new_weights_never_answer_from_old_entries(settings) -> None:  # type: ignore[no-untyped-def]
    from api.caching import cache_key
    from shared.registry import weights_version

    request = chat("Hi", temperature=0)
    spec = model_spec("smollm2-135m")
    assert fingerprint("m", request, "t", "a") != fingerprint("m", request, "t", "b")
    assert weights_version(spec) != weights_version(spec.model_copy(update={"dtype": "float32"}))
    assert weights_version(spec) == weights_version(spec.model_copy(update={"ttft_sla_s": 9.0}))
    on = {"response_cache": True}
    before = cache_key(settings(**on), "smollm2-135m", request, "acme")
    assert before == cache_key(settings(**on), "smollm2-135m", request, "acme")
    assert before != cache_key(settings(**on, weights_version="2026-12"), "smollm2-135m", request, "acme")


def test_deterministic_means_greedy_or_seeded() -> None:
    assert deterministic(chat("x", temperature=0))
    assert deterministic(chat("x", temperature=0.8, seed=3))
    assert not deterministic(chat("x", temperature=0.8))
    assert not deterministic(chat("x"))  # unset: the worker's 1.0


@pytest.mark.parametrize("model", ["smollm2-135m", "tiny-gpt-oss"])
def test_equal_meaning_renders_the_same_token_ids(model: str, prepared_models) -> None:  # type: ignore[no-untyped-def]
    tokenizer = load_prompt_tokenizer(
        model_spec(model), prepared_models.cache_dir, prepared_models.vocab_dir()
    )
    ids = [prompt_token_ids(tokenizer, canonical(chat(text))) for text in (CAFE_NFC, CAFE_NFD)]
    assert ids[0] == ids[1]
    assert prompt_token_ids(tokenizer, canonical(chat(CAFE_NFC + "!"))) != ids[0]


# --- the cache in Redis ------------------------------------------------------------------------


def result(text: str) -> dict:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return {"text": text, "reasoning": None, "finish_reason": "stop", "usage": usage, "model": "m",
            "worker": "w", "queue": "gpu-single", "cache": "miss"}  # fmt: skip


def entry_size(value: dict) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def test_store_and_lookup_are_byte_identical_and_bounded_in_time(redis: Redis) -> None:
    cache = ResponseCache(redis, ttl=60, max_bytes=10_000)
    text = "Caf\u00e9 \u2014 \U0001f600 exactly"
    assert cache.lookup("a") is None
    assert cache.store("a", result(text)) == 0
    assert cache.lookup("a") == result(text)
    assert cache.lookup("a")["text"].encode() == text.encode()  # type: ignore[index]
    assert read_stats(redis).entries == 1
    assert read_stats(redis).bytes == entry_size(result(text))
    # Every key the cache writes has a TTL (tests/test_key_lifetimes.py's rule).
    for key in (keys.response_cache_entry("a"), keys.RESPONSE_CACHE_LRU, keys.RESPONSE_CACHE_SIZES,
                keys.RESPONSE_CACHE_BYTES):  # fmt: skip
        assert 0 < redis.ttl(key) <= 60


def test_entries_expire_after_their_idle_ttl(redis: Redis) -> None:
    cache = ResponseCache(redis, ttl=1, max_bytes=10_000)
    cache.store("old", result("x"))
    entry = keys.response_cache_entry("old")
    redis.pexpire(entry, 400)  # most of its idle TTL gone
    assert cache.lookup("old") is not None  # a hit renews the TTL
    assert redis.pttl(entry) > 400
    redis.pexpire(entry, 400)
    assert cache.lookup("old") is not None
    redis.pexpire(entry, 1)  # its idle TTL runs out
    wait_for(lambda: not redis.exists(entry), 5, "the entry to expire")
    assert cache.lookup("old") is None
    assert read_stats(redis).entries == 0 and read_stats(redis).bytes == 0


def test_expired_entries_leave_the_bookkeeping_at_the_next_store(redis: Redis) -> None:
    short = ResponseCache(redis, ttl=1, max_bytes=10_000)
    short.store("a", result("x"))
    written = (keys.response_cache_entry("a"), keys.RESPONSE_CACHE_LRU, keys.RESPONSE_CACHE_SIZES,
               keys.RESPONSE_CACHE_BYTES)  # fmt: skip
    for key in written:  # its one-second TTL runs out (Redis's clock, moved on)
        redis.pexpire(key, 1)
    wait_for(lambda: not redis.exists(*written), 5, "the entry and its bookkeeping to expire")
    ResponseCache(redis, ttl=60, max_bytes=10_000).store("b", result("y"))
    assert read_stats(redis).entries == 1
    assert read_stats(redis).bytes == entry_size(result("y"))


def test_eviction_under_a_small_byte_budget_is_least_recently_used(redis: Redis) -> None:
    size = entry_size(result("0"))
    clock = FakeClock()
    cache = ResponseCache(redis, ttl=60, max_bytes=3 * size, clock=clock)
    for name in ("a", "b", "c"):
        assert cache.store(name, result("0")) == 0
        clock.advance(1)  # distinct last-use times
    assert cache.lookup("a") is not None  # now "b" is the least recently used
    assert cache.store("d", result("0")) == 1
    assert cache.lookup("b") is None
    assert all(cache.lookup(n) is not None for n in ("a", "c", "d"))
    assert read_stats(redis).bytes == 3 * size <= cache.max_bytes
    # A fingerprint stored again keeps its first answer (and is counted once).
    assert cache.store("d", result("1")) == -2
    assert cache.lookup("d") == result("0")
    assert read_stats(redis) == read_stats(redis).__class__(3 * size, 3)
    # An entry over the whole budget is not cached and evicts nothing.
    assert cache.store("huge", result("x" * 4 * size)) == -1
    assert cache.lookup("huge") is None and read_stats(redis).entries == 3


def test_store_finished_marks_the_copy_as_a_hit_and_never_raises(redis: Redis) -> None:
    store_finished(redis, store_target("fp", 60, 10_000), result("x"))
    assert ResponseCache(redis, 60, 10_000).lookup("fp") == {**result("x"), "cache": "hit"}
    store_finished(redis, None, result("y"))  # not cacheable: nothing happens
    store_finished(redis, {"fingerprint": "z"}, result("y"))  # malformed: logged, not raised
    assert read_stats(redis).entries == 1


def test_a_job_created_finished_looks_like_one_a_worker_ran(redis: Redis) -> None:
    assert rq_matches()
    meta = {"request_id": "r1", "timestamps": {"received": 1.0, "finished": 1.0}}
    job = create_finished(redis, keys.GENERATE_FUNC, {"prompt": "x"}, result("hi"), queue="incoming",
                          meta=meta, ttl=100, description="generate m (cached)")  # fmt: skip
    again = fetch_job(job.id, redis)
    assert again.get_status() == "finished"
    assert again.return_value() == result("hi")
    assert again.meta == meta and again.args == [{"prompt": "x"}]
    assert job.id in FinishedJobRegistry(queue=open_queue("incoming", redis)).get_job_ids()
    assert 0 < redis.ttl(again.key) <= 100
    assert open_queue("incoming", redis).count == 0  # never queued


# --- the API's hit path, in-process (no model) ---------------------------------------------------


GREEDY = {"messages": [{"role": "user", "content": "Caf\u00e9?"}], "max_tokens": 8, "temperature": 0}


@pytest.fixture
def app(redis: Redis, settings):  # type: ignore[no-untyped-def]
    return create_app(settings(response_cache=True, auth=True), redis).test_client()


def seed_cache(app, redis: Redis, headers: dict, body: dict = GREEDY) -> str:  # type: ignore[no-untyped-def]
    """Submit `body` (a miss) and store a result for it as its worker would: the job's id."""
    miss = app.post("/v1/jobs", json=body, headers=headers)
    assert miss.status_code == 202, miss.get_json()
    job = fetch_job(miss.get_json()["id"], redis)
    store_finished(redis, job.meta["cache_key"], result("Au lait \u2615"))
    return job.id


def test_a_hit_is_a_finished_job_at_once(app, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    alice = {"Authorization": f"Bearer {create_key(redis, 'alice')[0]}"}
    seed_cache(app, redis, alice)
    incoming = open_queue(keys.INCOMING_QUEUE, redis)
    assert incoming.count == 1

    # The same request in another form: NFD, keys in another order, raw JSON.
    nfd = unicodedata.normalize("NFD", "Caf\u00e9?")
    raw = json.dumps({"temperature": 0, "max_tokens": 8, "messages": [{"content": nfd, "role": "user"}]})
    hit = app.post("/v1/jobs", data=raw, content_type="application/json", headers=alice)
    assert hit.status_code == 200
    view = hit.get_json()
    assert view["status"] == "finished" and view["result"]["cache"] == "hit"
    assert view["result"]["text"] == "Au lait \u2615"
    stamps = view["timestamps"]
    assert stamps["received"] == stamps["started"] == stamps["first_token"] == stamps["finished"]
    assert incoming.count == 1  # the hit never touched a queue

    assert app.get(view["url"], headers=alice).get_json() == view
    assert view["id"] in [j["id"] for j in app.get("/v1/jobs", headers=alice).get_json()["data"]]
    # Its event stream is complete already: followers answer without waiting on a worker.
    events = [f[b"event"].decode() for _, f in redis.xrange(keys.job_stream(view["id"]))]
    assert events == ["start", "token", "done"]
    sse = app.get(f"{view['url']}/events", headers=alice).get_data(as_text=True)
    assert "event: done" in sse and "Au lait" in sse

    chat_body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": nfd}], "max_tokens": 8,
                 "temperature": 0}  # fmt: skip
    sync = app.post("/v1/chat/completions", json=chat_body, headers=alice)
    assert sync.status_code == 200 and sync.get_json()["choices"][0]["message"]["content"] == "Au lait \u2615"
    streamed = app.post("/v1/chat/completions", json={**chat_body, "stream": True}, headers=alice)
    chunks = [json.loads(line[6:]) for line in streamed.get_data(as_text=True).splitlines()
              if line.startswith("data: {")]  # fmt: skip
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Au lait \u2615"
    assert fetch_job(streamed.headers["X-Job-ID"], redis).return_value()["cache"] == "hit"

    metrics = app.get("/metrics").get_data(as_text=True)
    assert 'gptoss_cache_hits_total{model="smollm2-135m"} 3.0' in metrics
    assert 'gptoss_cache_misses_total{model="smollm2-135m"} 1.0' in metrics
    assert "gptoss_response_cache_entries 1.0" in metrics
    assert "gptoss_response_cache_bytes " in metrics


def test_tenants_never_share_entries_unless_set(app, redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    alice = {"Authorization": f"Bearer {create_key(redis, 'alice')[0]}"}
    bob = {"Authorization": f"Bearer {create_key(redis, 'bob')[0]}"}
    seed_cache(app, redis, alice)
    assert app.post("/v1/jobs", json=GREEDY, headers=bob).status_code == 202
    assert app.post("/v1/jobs", json=GREEDY, headers=alice).status_code == 200

    shared = create_app(settings(response_cache=True, response_cache_shared=True, auth=True), redis)
    client = shared.test_client()
    seed_cache(client, redis, alice)
    assert client.post("/v1/jobs", json=GREEDY, headers=bob).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {**GREEDY, "cache": False},  # opted out
        {**GREEDY, "temperature": 0.7},  # sampled without a seed
    ],
)
def test_opted_out_and_sampled_requests_never_use_the_cache(app, redis: Redis, body: dict) -> None:  # type: ignore[no-untyped-def]
    alice = {"Authorization": f"Bearer {create_key(redis, 'alice')[0]}"}
    seed_cache(app, redis, alice, {**GREEDY, "cache": True, "temperature": body["temperature"], "seed": 1})
    for _ in range(2):
        response = app.post("/v1/jobs", json=body, headers=alice)
        assert response.status_code == 202
        assert "cache_key" not in fetch_job(response.get_json()["id"], redis).meta  # never stored


def test_a_seeded_request_is_cached(app, redis: Redis) -> None:  # type: ignore[no-untyped-def]
    alice = {"Authorization": f"Bearer {create_key(redis, 'alice')[0]}"}
    seeded = {**GREEDY, "temperature": 0.7, "seed": 5}
    seed_cache(app, redis, alice, seeded)
    assert app.post("/v1/jobs", json=seeded, headers=alice).status_code == 200
    assert app.post("/v1/jobs", json={**seeded, "seed": 6}, headers=alice).status_code == 202


def test_the_cache_can_be_turned_off(redis: Redis, settings) -> None:  # type: ignore[no-untyped-def]
    client = create_app(settings(response_cache=False), redis).test_client()
    response = client.post("/v1/jobs", json=GREEDY)
    assert "cache_key" not in fetch_job(response.get_json()["id"], redis).meta


# --- end to end: API, scheduler and worker as processes ------------------------------------------


@dataclass(frozen=True)
class Stack:
    base: str
    alice: dict[str, str]
    bob: dict[str, str]
    logs: Path


@pytest.fixture(scope="module")
def stack(redis_url: str, prepared_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from cli.up import free_port

    redis = Redis.from_url(redis_url)
    redis.flushall()
    alice, bob = create_key(redis, "alice")[0], create_key(redis, "bob")[0]
    folder = tmp_path_factory.mktemp("cache")
    procs, port = Processes(folder), free_port()
    env = process_env(
        GPTOSS_REDIS_URL=redis_url, GPTOSS_CACHE_DIR=prepared_models.cache_dir, GPTOSS_API_PORT=port,
        GPTOSS_MODEL="smollm2-135m", GPTOSS_AUTH="true", GPTOSS_RESPONSE_CACHE="true",
    )  # fmt: skip
    procs.start("api", ["api"], env)
    procs.start("scheduler", ["scheduler"], env)
    procs.start("worker", ["workers"], {**env, "GPTOSS_WORKER_QUEUE": keys.SINGLE_QUEUE})
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        beats = read_live(redis, keys.WORKER_HEARTBEAT_PATTERN, WorkerBeat)
        return http_ok(f"{base}/healthz") and any(b.state == "idle" for b in beats)

    try:
        wait_for(ready, 180, "the API and a loaded worker")
        yield Stack(base, {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}, folder)
    finally:
        procs.stop_all()


def post(stack: Stack, body: dict | str, headers: dict[str, str]) -> requests.Response:
    if isinstance(body, str):
        headers = {**headers, "Content-Type": "application/json"}
        return requests.post(f"{stack.base}/v1/jobs", data=body.encode(), headers=headers, timeout=30)
    return requests.post(f"{stack.base}/v1/jobs", json=body, headers=headers, timeout=30)


def generated(stack: Stack, response: requests.Response, headers: dict[str, str]) -> dict:
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    view: dict = {}

    def done() -> bool:
        nonlocal view
        view = requests.get(f"{stack.base}/v1/jobs/{job_id}", headers=headers, timeout=5).json()
        return view["status"] in ("finished", "failed", "rejected")

    wait_for(done, 120, f"job {job_id}", interval=0.2)
    assert view["status"] == "finished", view
    return view


def test_repeats_are_answered_from_the_cache_end_to_end(stack: Stack) -> None:
    question = "Name the capital of France.\r\nOne word, caf\u00e9 style."
    first = generated(stack, post(stack, {**GREEDY, "messages": [{"role": "user", "content": question}],
                                          "max_tokens": 12}, stack.alice), stack.alice)  # fmt: skip
    assert first["result"]["cache"] == "miss" and first["route"]["queue"] == keys.SINGLE_QUEUE

    # The same request as other bytes: NFD, LF, keys in another order.
    same = unicodedata.normalize("NFD", question.replace("\r\n", "\n"))
    raw = json.dumps({"max_tokens": 12, "messages": [{"content": same, "role": "user"}], "temperature": 0})
    hit = post(stack, raw, stack.alice)
    assert hit.status_code == 200, hit.text
    view = hit.json()
    assert view["status"] == "finished" and view["result"]["cache"] == "hit"
    assert view["result"]["text"].encode() == first["result"]["text"].encode()
    assert view["result"]["usage"] == first["result"]["usage"]
    assert "route" not in view  # never scheduled

    # The OpenAI endpoint answers the same request from the cache, streamed with its text.
    chat_body = {"messages": [{"role": "user", "content": same}], "max_tokens": 12, "temperature": 0}
    sync = requests.post(f"{stack.base}/v1/chat/completions", json=chat_body, headers=stack.alice, timeout=30)
    assert sync.json()["choices"][0]["message"]["content"] == first["result"]["text"]
    streamed = requests.post(f"{stack.base}/v1/chat/completions", json={**chat_body, "stream": True},
                             headers=stack.alice, timeout=30)  # fmt: skip
    deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
              for line in streamed.text.splitlines() if line.startswith("data: {")]  # fmt: skip
    assert "".join(deltas) == first["result"]["text"]

    # Another tenant generates its own; opting out and sampling generate every time.
    other = generated(stack, post(stack, raw, stack.bob), stack.bob)
    assert other["result"]["cache"] == "miss"
    opted_out = generated(stack, post(stack, {**json.loads(raw), "cache": False}, stack.alice), stack.alice)
    assert opted_out["result"].get("cache") is None
    sampled = {**json.loads(raw), "temperature": 0.9}
    for _ in range(2):
        assert generated(stack, post(stack, sampled, stack.alice), stack.alice)["result"].get("cache") is None

    metrics = requests.get(f"{stack.base}/metrics", timeout=5).text
    assert 'gptoss_cache_hits_total{model="smollm2-135m"} 3.0' in metrics
    assert 'gptoss_cache_misses_total{model="smollm2-135m"} 2.0' in metrics  # alice's first, bob's
    assert "gptoss_response_cache_entries 2.0" in metrics
    api_log = (stack.logs / "api.log").read_text()
    events = [json.loads(line).get("event") for line in api_log.splitlines() if line.startswith("{")]
    assert events.count("cache_hit") == 3 and events.count("cache_miss") == 2
    assert "capital of France" not in api_log  # prompts are never logged
