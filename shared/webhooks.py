"""Webhooks: a job's final view POSTed to the client's URL, signed the Standard Webhooks way
(`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>`),
retried with exponential backoff from a small thread pool so no caller waits for the receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from urllib.parse import urlsplit

import requests
import structlog
from redis import Redis
from redis.exceptions import RedisError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from shared import keys
from shared.contract import JobView
from shared.errors import GptossError, ValidationFailed
from shared.jobstore.record import JobRecord
from shared.settings import Settings

log = structlog.get_logger()

SECRET_PREFIX = "whsec_"
"""Standard Webhooks secrets are `whsec_` + base64 of the key bytes."""

DELIVERY_THREADS = 4
"""Webhooks delivered at once by one process."""

BACKOFF_MAX = 60.0
"""Longest wait between two attempts, seconds."""


class DeliveryFailed(Exception):
    """One attempt did not get a 2xx answer."""


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


def _refused_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified
    )  # fmt: skip


def check_target(url: str, allow_private: bool) -> None:
    """Refuse (422) a URL that is not http(s), or whose host resolves to a loopback, private,
    link-local or otherwise internal address (unless `allow_private`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed("webhook must be an http(s) URL with a host.", details=[{"loc": ["webhook"]}])
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise ValidationFailed(f"webhook host `{parts.hostname}` does not resolve.") from None
    if any(_refused_address(str(info[4][0])) for info in infos):
        raise ValidationFailed(
            f"webhook host `{parts.hostname}` is a loopback, private or link-local address; refused.",
            details=[{"loc": ["webhook"], "msg": "internal address"}],
        )


class WebhookSender:
    """Delivers webhooks from a few background threads, retrying each with exponential backoff."""

    def __init__(self, settings: Settings, redis: Redis | None = None):
        self._settings = settings
        self._redis = redis  # with one, every message passes through the outbox (at least once)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def enabled(self) -> bool:
        """A signing secret is configured."""
        secret = self._settings.webhook_secret
        return secret is not None and bool(secret.get_secret_value())

    def check(self, url: str) -> None:
        """Refuse (422) a webhook this server would not deliver."""
        if not self.enabled:
            raise ValidationFailed("Webhooks are off on this server (GPTOSS_WEBHOOK_SECRET is unset).")
        check_target(url, self._settings.webhook_allow_private)

    @property
    def has_outbox(self) -> bool:
        """Messages go through the outbox in Redis (delivered at least once, even if this process dies)."""
        return self.enabled and self._redis is not None

    def entry(self, url: str, view: JobView, at: float | None = None) -> tuple[str, str]:
        """The outbox entry of `view`'s message to `url` (message id, stored value), for the
        transaction that ends the job to write: the message outlives a sender that dies."""
        message_id = f"msg_{view.id}_{view.status.value}"  # the same id on every retry
        body = event_body(view).decode()
        return message_id, json.dumps({"url": url, "body": body, "at": time.time() if at is None else at})

    def send(self, url: str, view: JobView) -> Future[bool] | None:
        """Deliver `view` to `url` in the background (through the outbox, when there is one); the
        future says whether it was accepted."""
        if not self.enabled:
            return None
        message_id, value = self.entry(url, view)
        if self._redis is not None:
            try:
                self._redis.hset(keys.WEBHOOK_OUTBOX, message_id, value)
            except RedisError as exc:  # delivered all the same, only not redelivered if we die
                log.warning("webhook_outbox_failed", message_id=message_id, error=str(exc))
        return self._submit(url, message_id, json.loads(value)["body"].encode())

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
            self._submit(str(message["url"]), message_id, str(message["body"]).encode())
            log.warning("webhook_redelivered", message_id=message_id)
            sent += 1
        return sent

    def _submit(self, url: str, message_id: str, body: bytes) -> Future[bool]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(DELIVERY_THREADS, thread_name_prefix="webhook")
        return self._pool.submit(self._deliver_once, url, message_id, body)

    def _deliver_once(self, url: str, message_id: str, body: bytes) -> bool:
        """Deliver, then take the message out of the outbox (delivered, or given up)."""
        accepted = self.deliver(url, message_id, body)
        if self._redis is not None:
            try:
                self._redis.hdel(keys.WEBHOOK_OUTBOX, message_id)
            except RedisError as exc:  # sent again later, under the same id
                log.warning("webhook_outbox_failed", message_id=message_id, error=str(exc))
        return accepted

    def deliver(self, url: str, message_id: str, body: bytes) -> bool:
        """POST one message until it is accepted (2xx) or the attempts run out; never raises."""
        settings = self._settings
        assert settings.webhook_secret is not None
        key = signing_key(settings.webhook_secret.get_secret_value())
        retrying = Retrying(
            stop=stop_after_attempt(settings.webhook_attempts),
            wait=wait_exponential(multiplier=settings.webhook_backoff, max=BACKOFF_MAX),
            retry=retry_if_exception_type((DeliveryFailed, requests.RequestException)),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    check_target(url, settings.webhook_allow_private)  # again: DNS may have changed
                    timestamp = int(time.time())
                    response = requests.post(
                        url,
                        data=body,
                        headers={
                            "content-type": "application/json",
                            "webhook-id": message_id,
                            "webhook-timestamp": str(timestamp),
                            "webhook-signature": sign(key, message_id, timestamp, body),
                        },
                        timeout=settings.webhook_timeout,
                        allow_redirects=False,  # a redirect could point inside the network
                    )
                    if not 200 <= response.status_code < 300:
                        raise DeliveryFailed(f"HTTP {response.status_code}")
        except (DeliveryFailed, requests.RequestException, GptossError) as exc:
            log.warning("webhook_failed", message_id=message_id, error=str(exc))
            return False
        log.info("webhook_delivered", message_id=message_id)
        return True

    def close(self, wait: bool = True) -> None:
        """Finish (or drop) the deliveries under way."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait)


def notify(sender: WebhookSender | None, view: JobView, record: JobRecord) -> None:
    """Send the job's final `view` to its webhook, if the client gave one."""
    if sender is not None and record.webhook is not None:
        sender.send(record.webhook, view)
