"""The pure parts of batches (input line checks, release decisions, the upload's line reading) and
the ledger's atomic steps on a real Redis."""

from __future__ import annotations

import io
import json
import time

import pytest
from redis import Redis

from api.uploads import Ingested, Limits, ingest
from shared.batches.errors import FileTooLarge
from shared.batches.ledger import BatchLedger, parse_member
from shared.batches.lines import InputLine, LineError, check_line
from shared.batches.records import StoredBatch, StoredFile
from shared.batches.release import BatchLoad, Caps, release_plan
from shared.batches.store import RedisFileStore, RedisUpload

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ([1, 2], "invalid_line"),
        ({**LINE, "extra": 1}, "invalid_line"),
        ({**LINE, "custom_id": ""}, "missing_custom_id"),
        ({**LINE, "custom_id": 7}, "missing_custom_id"),
        ({**LINE, "custom_id": "x" * 513}, "invalid_custom_id"),
        ({**LINE, "custom_id": "seen"}, "duplicate_custom_id"),
        ({**LINE, "method": "GET"}, "invalid_method"),
        ({**LINE, "url": "/v1/embeddings"}, "invalid_url"),
        ({**LINE, "body": []}, "invalid_body"),
    ],
)
def test_a_bad_line_is_refused_with_its_code(line: object, code: str) -> None:
    checked = check_line(4, line, {"seen"})
    assert isinstance(checked, LineError) and (checked.line, checked.code) == (4, code)


def test_a_good_line_is_remembered_so_its_id_cannot_repeat() -> None:
    seen: set[str] = set()
    assert check_line(1, LINE, seen) == InputLine("a", "/v1/chat/completions")
    assert isinstance(check_line(2, LINE, seen), LineError)


CAPS = Caps(in_flight=10, tenant_in_flight=4, waiting=6)


def test_release_fills_the_waiting_room_and_no_more() -> None:
    plan = release_plan([BatchLoad("b1", "acme", 0, 100)], waiting=0, caps=Caps(10, 10, 6))
    assert plan == {"b1": 6}
    assert release_plan([BatchLoad("b1", "acme", 0, 100)], waiting=6, caps=Caps(10, 10, 6)) == {}
    assert release_plan([BatchLoad("b1", "acme", 9, 100)], waiting=0, caps=Caps(10, 10, 6)) == {"b1": 1}


def test_release_holds_a_tenant_to_its_quota_and_takes_tenants_in_turn() -> None:
    loads = [BatchLoad("a1", "acme", 3, 50), BatchLoad("a2", "acme", 0, 50), BatchLoad("g1", "globex", 0, 50)]
    plan = release_plan(loads, waiting=0, caps=CAPS)
    assert plan == {"a1": 1, "g1": 4}  # acme had room for 1 (oldest batch first); globex the rest
    small = Caps(in_flight=10, tenant_in_flight=10, waiting=1)
    turns = [release_plan(loads, waiting=0, caps=small, turn=t) for t in range(2)]
    assert turns == [{"a1": 1}, {"g1": 1}]  # one slot: the tenants take it in turn


def test_release_never_exceeds_the_lines_left() -> None:
    assert release_plan([BatchLoad("b1", "acme", 0, 2)], waiting=0, caps=CAPS) == {"b1": 2}
    assert release_plan([], waiting=0, caps=CAPS) == {}


def _upload(redis: Redis, text: bytes, limits: Limits) -> tuple[Ingested, RedisUpload, StoredFile]:
    file = StoredFile(id="file-x", tenant="acme", purpose="batch", filename="f.jsonl", created_at=1)
    upload = RedisFileStore(redis).begin(file)
    return ingest(io.BytesIO(text), upload, limits), upload, file


def test_an_upload_is_read_line_by_line_and_stored(redis: Redis) -> None:
    lines = [json.dumps({**LINE, "custom_id": f"c{i}"}) for i in range(600)]
    found, upload, file = _upload(redis, "\n".join(lines).encode(), Limits(10_000, 1000, 10**6))
    assert not found.error_count and found.urls == {"/v1/chat/completions"}
    upload.finish()
    store = RedisFileStore(redis)
    assert (
        store.lines("acme", "file-x", 0, 1000) == lines and list(store.iter_lines("acme", "file-x")) == lines
    )
    assert file.lines == 600 and file.bytes == sum(len(x) + 1 for x in lines)


def test_an_upload_stops_at_its_limits(redis: Redis) -> None:
    line = json.dumps(LINE).encode()
    found, _, _ = _upload(redis, line + b"\n" + b"x" * 300 + b"\n" + line, Limits(200, 10, 10**6))
    assert [(e.line, e.code) for e in found.errors] == [(2, "line_too_long")]
    with pytest.raises(FileTooLarge):
        _upload(redis, b"\n".join(json.dumps({**LINE, "custom_id": str(i)}).encode() for i in range(3)),
                Limits(10_000, 2, 10**6))  # fmt: skip
    with pytest.raises(FileTooLarge):
        _upload(redis, line * 1, Limits(10_000, 10, 10))


def _batch(redis: Redis, total: int = 5) -> tuple[BatchLedger, StoredBatch]:
    ledger = BatchLedger(redis)
    now = int(time.time())
    files = {"input_file_id": "file-in", "output_file_id": "file-out", "error_file_id": "file-err"}
    batch = StoredBatch(id="batch_x", tenant="ac:me", endpoint="/v1/chat/completions", status="in_progress",
                        created_at=now, expires_at=now + 3600, output_ttl=3600, total=total,
                        **files)  # fmt: skip
    ledger.create(batch, 3600)
    return ledger, batch


def test_a_line_is_settled_once_whoever_settles_it(redis: Redis) -> None:
    ledger, batch = _batch(redis)
    assert list(ledger.claim(batch.tenant, batch.id, 2, time.time())) == [0, 1]
    now = int(time.time())
    assert ledger.settle(batch, 0, "completed", '{"line": 0}', now)
    assert not ledger.settle(batch, 0, "completed", '{"line": 0}', now)  # a second feeder: nothing written
    assert ledger.settle(batch, 1, "failed", '{"line": 1}', now)
    store = RedisFileStore(redis)
    assert store.lines(batch.tenant, "file-out", 0, 10) == ['{"line": 0}']
    assert store.lines(batch.tenant, "file-err", 0, 10) == ['{"line": 1}']
    output = store.get(batch.tenant, "file-out")
    assert output is not None and output.purpose == "batch_output" and output.bytes == len('{"line": 0}') + 1
    stored = ledger.get(batch.tenant, batch.id)
    assert stored is not None and (stored.completed, stored.failed, stored.cursor) == (1, 1, 2)


def test_claims_stop_with_the_batch_and_end_at_its_last_line(redis: Redis) -> None:
    ledger, batch = _batch(redis, total=3)
    assert list(ledger.claim(batch.tenant, batch.id, 2, time.time())) == [0, 1]
    assert list(ledger.claim(batch.tenant, batch.id, 5, time.time())) == [2]
    assert list(ledger.claim(batch.tenant, batch.id, 5, time.time())) == []
    ledger2, other = _batch(redis, total=3)
    assert ledger2.stop(other.tenant, other.id, "expire") and not ledger2.stop(
        other.tenant, other.id, "expire"
    )
    assert list(ledger2.claim(other.tenant, other.id, 2, time.time())) == []


def test_a_batch_ends_only_once_nothing_is_open(redis: Redis) -> None:
    ledger, batch = _batch(redis, total=1)
    ledger.claim(batch.tenant, batch.id, 1, time.time())
    assert not ledger.advance(batch, ("in_progress",), "finalizing", 1, "all")
    ledger.settle(batch, 0, "completed", "{}", int(time.time()))
    assert ledger.advance(batch, ("in_progress",), "finalizing", 1, "all")
    assert ledger.advance(batch, ("finalizing",), "completed", 2, "all", ttl=60)
    assert not ledger.advance(batch, ("finalizing",), "completed", 3, "all", ttl=60)  # only once
    assert ledger.active() == [] and 0 < redis.ttl(f"gptoss:batch:{'ac%3Ame'}:batch_x") <= 60


def test_active_members_name_their_tenant_even_with_colons(redis: Redis) -> None:
    ledger, batch = _batch(redis)
    assert ledger.active() == [("ac:me", "batch_x")] and parse_member("ac%3Ame:batch_x") == (
        "ac:me",
        "batch_x",
    )
    assert ledger.active_count("ac:me") == 1 and ledger.active_count("ac") == 0
