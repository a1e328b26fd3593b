"""Redis key names, queue names and lifetimes. Every key the project writes starts with PREFIX."""

from __future__ import annotations

from urllib.parse import quote

PREFIX = "gptoss:"
"""Prefix of every Redis key the project writes itself (RQ keeps its own `rq:` keys)."""


def key_part(value: str) -> str:
    """One tenant- or client-given part of a key, percent-encoded (everything but letters, digits
    and `_.-~`): it never holds the `:` that separates parts, and two values never give one part.
    Tenant names (shared.apikeys.TENANT_PATTERN) pass unchanged, so their keys keep their names."""
    # `%` is encoded too, so the encoding is reversible; surrogatepass keeps a lone surrogate (JSON
    # allows one) from raising, and its bytes are no valid UTF-8 sequence, so it cannot collide.
    return quote(value, safe="", errors="surrogatepass")


def scoped(*parts: str) -> str:
    """`parts` encoded (key_part) and joined by `:`: two different tuples of one length never give
    one string. Every key built from a tenant or a client's string goes through here or key_part."""
    return ":".join(key_part(part) for part in parts)


INCOMING_QUEUE = "incoming"
"""RQ queue the API enqueues on; only the scheduler takes jobs from it."""

SINGLE_QUEUE = "gpu-single"
"""RQ queue of workers that hold the model on one device."""

MULTI_QUEUE = "gpu-multi"
"""RQ queue of workers that spread the model over several devices (long prompts)."""

WORKER_QUEUES = (SINGLE_QUEUE, MULTI_QUEUE)
"""Queues a worker may listen on; readiness needs a live worker on each."""

GENERATE_FUNC = "workers.jobs.generate"
"""Dotted name of the job function, so the API never imports the workers."""

SCHEDULER_INFLIGHT = PREFIX + "scheduler:inflight"
"""List holding job ids the scheduler has taken from `incoming` but not yet routed."""

RESULT_TTL = 24 * 3600
"""Seconds a finished job and its result are kept."""

FAILURE_TTL = 24 * 3600
"""Seconds a failed or rejected job is kept (never RQ's year-long default)."""


def worker_heartbeat(name: str) -> str:
    """Key of one worker's heartbeat (a JSON document with a short TTL)."""
    return f"{PREFIX}heartbeat:worker:{name}"


WORKER_HEARTBEAT_PATTERN = PREFIX + "heartbeat:worker:*"
"""Pattern of every worker heartbeat's key (its index: `shared.heartbeat.index_of`)."""

SCHEDULER_HEARTBEAT_PATTERN = PREFIX + "heartbeat:scheduler:*"
"""Pattern of every scheduler heartbeat's key (its index: `shared.heartbeat.index_of`)."""


def scheduler_heartbeat(name: str) -> str:
    """Key of one scheduler's heartbeat."""
    return f"{PREFIX}heartbeat:scheduler:{name}"


DECISIONS = PREFIX + "decisions"
"""Capped list of recent admission and routing decisions (JSON), newest first."""

DECISIONS_TTL = 7 * 24 * 3600
"""Seconds the decision list lives after its last write."""


STREAM_TTL = 3600
"""Seconds a job's event stream lives after its last event (long enough to resume or replay)."""


def hub_wake(hub_id: str) -> str:
    """Key of the stream a process's stream reader also blocks on: an entry wakes its round, so a new
    follower is read at once, not when the round's block ends."""
    return f"{PREFIX}hub-wake:{hub_id}"


HUB_WAKE_TTL = 600
"""Seconds a stream reader's wake stream outlives its last wake (its process may have died)."""

REPLICATION_MARK = PREFIX + "replication:mark"
"""Counter each acknowledged write increments, so the WAIT after it counts that connection's writes
(shared/replication.py)."""


def job_stream(job_id: str) -> str:
    """Key of the Redis stream of one job's events (start, token deltas, done or error)."""
    return f"{PREFIX}stream:{job_id}"


SCHEDULER_HELD = PREFIX + "scheduler:held"
"""Sorted set of job ids the scheduler holds (score: when they were received)."""

DRAINED = PREFIX + "drained"
"""Sorted set of recently ended job ids (score: when), the base of the drain rate."""


DEFAULT_TENANT = "default"
"""The tenant of a request that authenticates as no one in particular."""


def tenant_backlog(tenant: str) -> str:
    """Sorted set of one tenant's accepted, not yet started job ids (score: when received)."""
    return f"{PREFIX}backlog:tenant:{key_part(tenant)}"


ADMISSION_LOCK = PREFIX + "admission:lock"
"""Lock held by the API while it checks the backlog and enqueues one job."""

API_KEYS = PREFIX + "apikeys"
"""Hash of API key records by the SHA-256 of the key (configuration: no TTL, bounded by operators)."""

API_KEY_IDS = PREFIX + "apikeys:ids"
"""Hash from a key's public id to its SHA-256, for revocation."""

RATE_LIMIT_PREFIX = PREFIX + "ratelimit"
"""Prefix of the per-tenant rate-limit windows (kept by the `limits` library, with TTLs)."""

PRIORITIES = ("high", "normal", "low", "batch")
"""Job priorities, highest first. Each base queue has one RQ queue per priority (`normal` keeps the
plain name), and consumers listen on them in this order: RQ's idiomatic priority. `batch`, the
lowest, is the Batch API's lines alone (no client submits it)."""

BATCH_PRIORITY = "batch"
"""The priority of a batch's lines: served after every other, outside the interactive backlog
budgets, and held to `size - reserved` rows of a worker's batch (workers/fair_share.py)."""


def priority_queue(base: str, priority: str) -> str:
    """The RQ queue of `base` (`incoming`, `gpu-single`, `gpu-multi`) for jobs of `priority`."""
    return base if priority == "normal" else f"{base}:{priority}"


def queues_by_priority(base: str) -> tuple[str, ...]:
    """The RQ queues of `base`, highest priority first."""
    return tuple(priority_queue(base, p) for p in PRIORITIES)


INCOMING_QUEUES = queues_by_priority(INCOMING_QUEUE)
"""The `incoming` queues the scheduler takes from, highest priority first."""

ALL_QUEUES = INCOMING_QUEUES + tuple(q for base in WORKER_QUEUES for q in queues_by_priority(base))
"""Every RQ queue a job may wait in: what depths, metrics, capacity and the debug bundle report."""

BATCH_QUEUES = tuple(priority_queue(base, BATCH_PRIORITY) for base in (INCOMING_QUEUE, *WORKER_QUEUES))
"""The queues of batch-priority jobs (`incoming:batch`, `gpu-single:batch`, `gpu-multi:batch`)."""

INTERACTIVE_QUEUES = tuple(q for q in ALL_QUEUES if q not in BATCH_QUEUES)
"""The fixed queues of every other priority: what the interactive backlog budget counts."""

SCHEDULER_WAKE = PREFIX + "scheduler:wake"
"""List the API pushes to after enqueueing, so a scheduler waiting on several queues wakes at once."""

WAKE_TOKENS = 64
"""Most wake-ups a worker queue's wake list keeps (one per job pushed; a worker that finds none
left to take waits again)."""

WAKE_TTL = 600
"""Seconds a wake list outlives its last push (an idle worker looks at its queues every second
anyway)."""


def worker_wake(queue: str) -> str:
    """List pushed to whenever a job is put on worker queue `queue`, so an idle worker blocked on
    the wake lists of its queues takes it at once (Redis cannot block on several lists and move
    atomically into the running ledger)."""
    return f"{PREFIX}wake:{queue}"


def cancel_flag(job_id: str) -> str:
    """Key set when a client cancels the job; the scheduler and the worker (every decode step) read it."""
    return f"{PREFIX}cancel:{job_id}"


def fence(job_id: str) -> str:
    """Counter of a job's runs and hand-backs: a run's writes count only while it holds the current
    number (a fencing token), so a worker that was paused or cut off cannot write after it was replaced."""
    return f"{PREFIX}fence:{job_id}"


FENCE_TTL = 2 * 24 * 3600
"""Seconds a job's fence lives after its last run began or was handed back (beyond any retention)."""


WEBHOOK_OUTBOX = PREFIX + "webhooks:outbox"
"""Hash of webhook messages not yet delivered (message id -> url, body, when): written with the job's
ending, removed once delivered or given up, redelivered by the scheduler when a sender died."""

WEBHOOK_REDELIVER_AFTER = 120.0
"""Seconds after which an undelivered webhook is sent again (longer than one sender's retries)."""


def tombstone(job_id: str) -> str:
    """Key that outlives a job's record, so an expired id answers 410 instead of 404."""
    return f"{PREFIX}tombstone:{job_id}"


TOMBSTONE_TTL = 7 * 24 * 3600
"""Seconds a tombstone outlives the job's retention."""


def tenant_jobs(tenant: str) -> str:
    """Sorted set of one tenant's jobs (score: when received), what `GET /v1/jobs` pages through."""
    return f"{PREFIX}jobs:tenant:{key_part(tenant)}"


def idempotency(tenant: str, digest: str) -> str:
    """Key of one tenant's Idempotency-Key (by its SHA-256): the job it created and the body's hash."""
    return f"{PREFIX}idempotency:{scoped(tenant, digest)}"


def stored_response(tenant: str, response_id: str) -> str:
    """Key of one tenant's stored Response (`/v1/responses`): its request echo and conversation,
    kept as long as its job (another tenant's same id names another key, which does not exist)."""
    return f"{PREFIX}response:{scoped(tenant, response_id)}"


RUNNING = PREFIX + "running"
"""Hash of job id -> the worker running it (JSON), so the jobs of a dead worker can be found.
Bounded: entries leave when jobs end or are handed back."""

FAIR_TTL = 24 * 3600
"""Seconds the fair-queuing state (queued tenants, tags, clocks) outlives its last use."""


def queued_tenants(queue: str) -> str:
    """Hash of job id -> tenant of the jobs waiting in worker queue `queue` (what the fair take reads;
    emptied with the queue)."""
    return f"{PREFIX}fair:tenants:{queue}"


def fair_tags(base: str) -> str:
    """Hash of tenant -> virtual finish tag in the fair take of worker queue `base`'s queues."""
    return f"{PREFIX}fair:tags:{base}"


def fair_clock(base: str) -> str:
    """The virtual time of the fair take of worker queue `base`'s queues (the last start tag)."""
    return f"{PREFIX}fair:clock:{base}"


def fair_base(queue: str) -> str | None:
    """The worker queue whose fair take orders `queue` (one of its priority queues); None for a
    queue taken in arrival order (a worker's own queue, `incoming`)."""
    return next((base for base in WORKER_QUEUES if queue in queues_by_priority(base)), None)


def response_cache_entry(fingerprint: str) -> str:
    """Key of one cached response (JSON of the job result), by its request's fingerprint."""
    return f"{PREFIX}cache:response:{fingerprint}"


RESPONSE_CACHE_LRU = PREFIX + "cache:response:lru"
"""Sorted set of cached fingerprints (score: last use), the order of eviction."""

RESPONSE_CACHE_SIZES = PREFIX + "cache:response:sizes"
"""Hash of fingerprint -> bytes of its entry, so eviction knows what it frees."""

RESPONSE_CACHE_BYTES = PREFIX + "cache:response:bytes"
"""Bytes all cached responses take now (the sum of RESPONSE_CACHE_SIZES)."""


def session_scope(tenant: str, session_id: str) -> str:
    """One tenant's session, as a worker's in-memory session store and the affinity key name it:
    another tenant's same id is another session, whatever either contains."""
    return scoped(tenant, session_id)


def session_affinity(tenant: str, session_id: str) -> str:
    """Key naming the worker that holds one tenant's session's KV cache (with the session's TTL)."""
    return f"{PREFIX}session:{session_scope(tenant, session_id)}"


def rate_limit_identity(tenant: str) -> str:
    """The tenant as a `limits` identifier (the library joins identifiers with `/`, which
    key_part encodes along with `:`)."""
    return key_part(tenant)


def decoding(fingerprint: str) -> str:
    """Key naming the worker decoding a cacheable request of this response-cache fingerprint (while
    it decodes), so the scheduler sends identical requests there to follow it."""
    return f"{PREFIX}decoding:{fingerprint}"


OWN_QUEUE_PREFIX = "worker:"
"""Names of workers' own queues start with this."""

OWN_QUEUES_LABEL = "own"
"""The metric label the workers' own queues go by, all together: one series per worker process
would pile up as workers come and go."""


def own_queues_label(base: str) -> str:
    """The metric label of the own queues of the workers of `base` (`gpu-single`, `gpu-multi`)
    together: what autoscaling adds to that base's queues (a worker serves its own queue first)."""
    return f"{OWN_QUEUES_LABEL}:{base}"


def own_queue(worker_name: str) -> str:
    """The RQ queue of one worker alone: where the scheduler routes the turns of its sessions."""
    return OWN_QUEUE_PREFIX + worker_name


def requeue_target(origin: str, priority: str) -> str:
    """Where a job handed back from `origin` waits again: its queue, except that a job taken from a
    worker's own queue goes back to `incoming`, to be routed afresh (that worker is gone)."""
    if origin.startswith(OWN_QUEUE_PREFIX):
        return priority_queue(INCOMING_QUEUE, priority)
    return origin


# --- files and batches (shared/batches/) -----------------------------------------------------------


def file_meta(tenant: str, file_id: str) -> str:
    """Hash of one tenant's file: its FileObject fields, its byte and line counts."""
    return f"{PREFIX}file:{scoped(tenant, file_id)}"


def file_lines(tenant: str, file_id: str) -> str:
    """List of one tenant's file's lines (JSONL, one entry per line, without its newline)."""
    return f"{PREFIX}file:{scoped(tenant, file_id)}:lines"


def tenant_files(tenant: str) -> str:
    """Sorted set of one tenant's file ids (score: created_at), what `GET /v1/files` pages through."""
    return f"{PREFIX}files:tenant:{key_part(tenant)}"


def batch(tenant: str, batch_id: str) -> str:
    """Hash of one tenant's batch: its Batch fields, counts and the feeder's cursor."""
    return f"{PREFIX}batch:{scoped(tenant, batch_id)}"


def batch_jobs(tenant: str, batch_id: str) -> str:
    """Hash of job id -> line number of a batch's released lines whose job has not been settled."""
    return f"{PREFIX}batch:{scoped(tenant, batch_id)}:jobs"


def batch_open(tenant: str, batch_id: str) -> str:
    """Hash of line number -> claim time of a batch's lines claimed and not yet settled (one write
    per line takes it out: exactly one output or error line each)."""
    return f"{PREFIX}batch:{scoped(tenant, batch_id)}:open"


def tenant_batches(tenant: str) -> str:
    """Sorted set of one tenant's batch ids (score: created_at), what `GET /v1/batches` pages through."""
    return f"{PREFIX}batches:tenant:{key_part(tenant)}"


ACTIVE_BATCHES = PREFIX + "batches:active"
"""Sorted set of the batches the feeder works on (member: `scoped(tenant, id)`; score: created_at)."""
