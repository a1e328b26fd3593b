"""Domain errors with stable codes. Each process turns them into its own answer at one boundary."""

from __future__ import annotations

from typing import Any


class GptossError(Exception):
    """Base of every error the user can act on: a stable `code`, an HTTP `status`, a message."""

    code = "internal_error"
    status = 500
    kind = "server_error"

    def __init__(self, message: str, *, details: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        """The error as the JSON body every process answers with (OpenAI's error shape)."""
        body: dict[str, Any] = {"code": self.code, "type": self.kind, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}


class InvalidJson(GptossError):
    code, status, kind = "invalid_json", 400, "invalid_request_error"


class InvalidEncoding(InvalidJson):
    """A body that is not UTF-8 (RFC 8259 JSON is UTF-8 only)."""

    code = "invalid_encoding"


class JsonTooDeep(InvalidJson):
    """Arrays and objects nested past the limit (api.body.MAX_JSON_DEPTH), refused before parsing."""

    code = "json_too_deep"


class NonFiniteNumber(InvalidJson):
    """`NaN`, `Infinity`, or a number literal too large for a float: not JSON numbers."""

    code = "non_finite_number"


class DuplicateKey(InvalidJson):
    """One object holding a key twice: parsers disagree on which value applies."""

    code = "duplicate_key"


class ValidationFailed(GptossError):
    code, status, kind = "validation_error", 422, "invalid_request_error"


class LoneSurrogate(ValidationFailed):
    """A string holding an unpaired UTF-16 surrogate escape: not Unicode text."""

    code = "lone_surrogate"


class UnsupportedParameter(ValidationFailed):
    """A known (OpenAI) parameter set to something this server does not implement."""

    code = "unsupported_parameter"


class InvalidTenant(ValidationFailed):
    """A tenant name outside the tenant alphabet (shared.apikeys.TENANT_PATTERN)."""

    code = "invalid_tenant"


class RequestTooLarge(GptossError):
    code, status, kind = "request_too_large", 413, "invalid_request_error"


class ClientClosedRequest(GptossError):
    """The client hung up before its request was done (nginx's 499: nobody reads the answer)."""

    code, status, kind = "client_closed_request", 499, "invalid_request_error"


class JobNotFound(GptossError):
    code, status, kind = "job_not_found", 404, "not_found_error"


class ModelNotFound(GptossError):
    code, status, kind = "model_not_found", 404, "not_found_error"


class RouteNotFound(GptossError):
    code, status, kind = "not_found", 404, "not_found_error"


class MethodNotAllowed(GptossError):
    code, status, kind = "method_not_allowed", 405, "invalid_request_error"


class ServiceUnavailable(GptossError):
    code, status, kind = "service_unavailable", 503, "server_error"


class PromptTooLong(GptossError):
    code, status, kind = "prompt_too_long", 413, "invalid_request_error"


class GenerationFailed(GptossError):
    code, status, kind = "generation_failed", 500, "server_error"


class Unauthorized(GptossError):
    code, status, kind = "unauthorized", 401, "authentication_error"


class AdminDisabled(GptossError):
    code, status, kind = "admin_disabled", 403, "permission_error"


class DashboardReadOnly(GptossError):
    code, status, kind = "dashboard_read_only", 403, "permission_error"


class BacklogFull(GptossError):
    code, status, kind = "backlog_full", 429, "rate_limit_error"


class TenantBacklogFull(GptossError):
    code, status, kind = "tenant_backlog_full", 429, "rate_limit_error"


class RateLimited(GptossError):
    code, status, kind = "rate_limited", 429, "rate_limit_error"


class InvalidEventId(GptossError):
    code, status, kind = "invalid_last_event_id", 400, "invalid_request_error"


class TooManyStreams(GptossError):
    code, status, kind = "too_many_streams", 429, "rate_limit_error"


class JobExpired(GptossError):
    code, status, kind = "job_expired", 410, "not_found_error"


class JobEnded(GptossError):
    code, status, kind = "job_ended", 409, "invalid_request_error"


class IdempotencyConflict(GptossError):
    code, status, kind = "idempotency_key_reused", 409, "invalid_request_error"


class IdempotencyInProgress(GptossError):
    code, status, kind = "idempotency_key_in_use", 409, "invalid_request_error"


class JobCancelled(GptossError):
    code, status, kind = "job_cancelled", 409, "invalid_request_error"


class DeadlineExceeded(GptossError):
    code, status, kind = "deadline_exceeded", 504, "server_error"


class JobRejected(GptossError):
    code, status, kind = "job_rejected", 503, "server_error"


class JobTimedOut(GptossError):
    code, status, kind = "timeout", 504, "server_error"
