"""Webhooks: a job's final view POSTed to the client's URL, signed the Standard Webhooks way
(`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>`),
through the outbox in Redis (at least once) and delivered in the background, fairly across tenants
(shared/webhook_delivery.py), only to public addresses checked as connected (shared/webhook_targets.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime

import structlog
import urllib3
from redis import Redis
from redis.exceptions import RedisError

from shared import keys
from shared.contract import JobView
from shared.errors import ValidationFailed
from shared.jobstore.record import JobRecord
from shared.settings import Settings
from shared.webhook_delivery import FairDispatcher, Message, Outcome
from shared.webhook_targets import Resolver, check_target, post, resolve_target, system_resolver

log = structlog.get_logger()

SECRET_PREFIX = "whsec_"
"""Standard Webhooks secrets are `whsec_` + base64 of the key bytes."""


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: the decoded bytes of `whsec_<base64>`, else the string's own bytes."""
    if secret.startswith(SECRET_PREFIX):
        return base64.b64decode(secret[len(SECRET_PREFIX) :])
    return secret.encode()


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one message."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def event_body(view: JobView) -> bytes:
    """The JSON body of the webhook telling that a job ended."""
    return json.dumps(
        {
            "type": f"job.{view.status.value}",
            "timestamp": datetime.now(UTC).isoformat(),
            "data": view.model_dump(mode="json", exclude_none=True),
        }
    ).encode()


class WebhookSender:
    """Delivers webhooks in the background (fair across tenants), each retried with exponential
    backoff; `resolver` looks host names up (tests inject one)."""

    def __init__(self, settings: Settings, redis: Redis | None = None, resolver: Resolver = system_resolver):
        self._settings = settings
        self._redis = redis  # with one, every message passes through the outbox (at least once)
        self._resolver = resolver
        self._dispatcher: FairDispatcher | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """A signing secret is configured."""
        secret = self._settings.webhook_secret
        return secret is not None and bool(secret.get_secret_value())

    def check(self, url: str) -> None:
        """Refuse (422) a webhook this server would not deliver."""
        if not self.enabled:
            raise ValidationFailed("Webhooks are off on this server (GPTOSS_WEBHOOK_SECRET is unset).")
        check_target(url, self._settings.webhook_allow_private, self._resolver)

    @property
    def has_outbox(self) -> bool:
        """Messages go through the outbox in Redis (delivered at least once, even if this process dies)."""
        return self.enabled and self._redis is not None

    def entry(
        self, url: str, view: JobView, tenant: str | None = None, at: float | None = None
    ) -> tuple[str, str]:
        """The outbox entry of `view`'s message to `url` for `tenant` (message id, stored value),
        for the transaction that ends the job to write: the message outlives a sender that dies."""
        message_id = f"msg_{view.id}_{view.status.value}"  # the same id on every retry
        body = event_body(view).decode()
        value = {"url": url, "body": body, "tenant": tenant or keys.DEFAULT_TENANT}
        return message_id, json.dumps({**value, "at": time.time() if at is None else at})

    def send(self, url: str, view: JobView, tenant: str | None = None) -> Future[bool] | None:
        """Deliver `view` to `url` in the background, in `tenant`'s turn (through the outbox, when
        there is one); the future says whether it was accepted."""
        if not self.enabled:
            return None
        message_id, value = self.entry(url, view, tenant)
        if self._redis is not None:
            try:
                self._redis.hset(keys.WEBHOOK_OUTBOX, message_id, value)
            except RedisError as exc:  # delivered all the same, only not redelivered if we die
                log.warning("webhook_outbox_failed", message_id=message_id, error=str(exc))
        return self._submit(message_id, json.loads(value))

    def deliver_entry(self, message_id: str, value: str) -> Future[bool] | None:
        """Deliver an outbox entry that the transaction ending what it tells already wrote (a batch's
        event, whose body is not a job's view)."""
        return self._submit(message_id, json.loads(value)) if self.enabled else None

    def redeliver(self, older_than: float = keys.WEBHOOK_REDELIVER_AFTER, now: float | None = None) -> int:
        """Send again every outbox message older than `older_than` seconds (its sender died before
        delivering it): under the same id, so a receiver that got it already can tell."""
        if not self.enabled or self._redis is None:
            return 0
        now = time.time() if now is None else now
        sent = 0
        for raw_id, raw in self._redis.hgetall(keys.WEBHOOK_OUTBOX).items():
            message_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            message = json.loads(raw)
            if now - float(message.get("at", 0)) < older_than:
                continue
            self._redis.hset(keys.WEBHOOK_OUTBOX, message_id, json.dumps({**message, "at": now}))
            self._submit(message_id, message)
            log.warning("webhook_redelivered", message_id=message_id)
            sent += 1
        return sent

    def _submit(self, message_id: str, stored: dict[str, object]) -> Future[bool]:
        # Entries written before messages carried a tenant are delivered in the default one's turn.
        tenant = str(stored.get("tenant") or keys.DEFAULT_TENANT)
        message = Message(message_id, str(stored["url"]), str(stored["body"]).encode(), tenant)
        with self._lock:
            if self._dispatcher is None:
                settings = self._settings
                self._dispatcher = FairDispatcher(
                    self.attempt,
                    self._settle,
                    attempts=settings.webhook_attempts,
                    backoff_base=settings.webhook_backoff,
                )
        return self._dispatcher.submit(message)

    def attempt(self, message: Message) -> Outcome:
        """POST `message` once: its host resolved and checked now, and connected to as checked."""
        settings = self._settings
        assert settings.webhook_secret is not None
        try:
            target = resolve_target(message.url, settings.webhook_allow_private, self._resolver)
        except ValidationFailed as exc:  # the name resolves somewhere refused now: give up
            log.warning("webhook_refused", message_id=message.message_id, error=exc.message)
            return "refused"
        key = signing_key(settings.webhook_secret.get_secret_value())
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": message.message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(key, message.message_id, timestamp, message.body),
        }
        try:
            status = post(target, message.body, headers, settings.webhook_timeout)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.info("webhook_attempt_failed", message_id=message.message_id, attempt=message.attempts,
                     error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return "failed"
        if 200 <= status < 300:
            return "accepted"
        log.info("webhook_attempt_failed", message_id=message.message_id, attempt=message.attempts,
                 error=f"HTTP {status}")  # fmt: skip
        return "failed"

    def _settle(self, message: Message, accepted: bool) -> None:
        """Take the message out of the outbox: delivered, or given up."""
        if accepted:
            log.info("webhook_delivered", message_id=message.message_id, tenant=message.tenant)
        else:
            log.warning("webhook_failed", message_id=message.message_id, tenant=message.tenant,
                        attempts=message.attempts)  # fmt: skip
        if self._redis is not None:
            try:
                self._redis.hdel(keys.WEBHOOK_OUTBOX, message.message_id)
            except RedisError as exc:  # sent again later, under the same id
                log.warning("webhook_outbox_failed", message_id=message.message_id, error=str(exc))

    def close(self, wait: bool = True) -> None:
        """Finish (`wait`) or drop the deliveries under way (dropped ones stay in the outbox)."""
        if self._dispatcher is not None:
            self._dispatcher.close(wait=wait)


def notify(sender: WebhookSender | None, view: JobView, record: JobRecord) -> None:
    """Send the job's final `view` to its webhook, if the client gave one, in its tenant's turn."""
    if sender is not None and record.webhook is not None:
        sender.send(record.webhook, view, record.tenant_or_default)
