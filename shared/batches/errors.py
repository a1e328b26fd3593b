"""The Files and Batches APIs' own errors, each with a stable code (shared.errors' base)."""

from __future__ import annotations

from shared.errors import GptossError, ValidationFailed


class FileNotFound(GptossError):
    code, status, kind = "file_not_found", 404, "not_found_error"


class BatchNotFound(GptossError):
    code, status, kind = "batch_not_found", 404, "not_found_error"


class InvalidFile(GptossError):
    """An upload whose lines are not batch requests (details: the first lines' errors)."""

    code, status, kind = "invalid_file", 400, "invalid_request_error"


class UnsupportedPurpose(ValidationFailed):
    code = "unsupported_purpose"


class FileTooLarge(GptossError):
    code, status, kind = "file_too_large", 413, "invalid_request_error"


class FileQuotaExceeded(GptossError):
    code, status, kind = "file_quota_exceeded", 429, "rate_limit_error"


class BatchQuotaExceeded(GptossError):
    code, status, kind = "batch_quota_exceeded", 429, "rate_limit_error"


class BatchEnded(GptossError):
    code, status, kind = "batch_ended", 409, "invalid_request_error"
