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


class ValidationFailed(GptossError):
    code, status, kind = "validation_error", 422, "invalid_request_error"


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
