"""Errors as an OpenAI-compatible API answers them: status, type, code and the field at fault (`param`).

Bad input is 400, a missing model or backend 503, anything else (a bug) 500.
"""

from __future__ import annotations

from common.errors import BackendUnavailableError, CheckpointError, ConfigError, DsocrError, ModelNotFoundError

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
_UNAVAILABLE = (ModelNotFoundError, BackendUnavailableError, ConfigError, CheckpointError)


def error_type(status: int) -> str:
    return STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class APIError(Exception):
    """An error answered in OpenAI's JSON format."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or error_type(status)
        self.headers = headers or {}


def api_error_for(exc: BaseException) -> APIError:
    """The answer for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, _UNAVAILABLE):
        return APIError(503, str(exc), code=type(exc).__name__)
    if isinstance(exc, DsocrError):
        return APIError(400, str(exc), code=type(exc).__name__, param=exc.param)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
