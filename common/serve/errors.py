"""Errors as an OpenAI-compatible API answers them: status, type, code and the field at fault (`param`).

Bad input is 400, a missing model or backend 503, anything else (a bug) 500.
"""

from __future__ import annotations

import json
import math
import re

from common.engine.core import EngineUnavailableError
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
_UNAVAILABLE = (ModelNotFoundError, BackendUnavailableError, ConfigError, CheckpointError, EngineUnavailableError)


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


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}|\\u[dD][c-fC-F][0-9a-fA-F]{2}")


_BOMS = ((b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"), (b"\xfe\xff", "UTF-16"),
         (b"\xff\xfe", "UTF-16"))


def _wide_encoding(body: bytes) -> str | None:
    """UTF-16 or UTF-32 by its byte order mark, or by the zero bytes that ASCII JSON has in those encodings."""
    for mark, name in _BOMS:
        if body.startswith(mark):
            return name
    head = body[:4]
    if len(head) == 4 and head.count(0) == 3:
        return "UTF-32"
    if len(head) >= 2 and 0 in head[:2]:
        return "UTF-16"
    return None


def bad_json_message(body: bytes, decoder_message: str) -> str:
    """What is wrong with a request body the JSON decoder refused, in words a client can act on (only ever run on a
    body already refused, whose size the request guard bounds)."""
    if not body.strip():
        return "the request body is empty; send a JSON object"
    if body.startswith(b"\xef\xbb\xbf"):
        return "the body starts with a byte order mark (BOM); send UTF-8 JSON without one"
    if (wide := _wide_encoding(body)) is not None:
        return f"the body is {wide} text; send JSON encoded as UTF-8"

    def no_constants(name: str) -> None:
        raise ValueError(f"the body holds {name}, which is not a JSON number (JSON has no NaN or Infinity)")

    def finite(text: str) -> float:
        value = float(text)
        if math.isinf(value):
            raise ValueError(f"the number {text[:40]} is out of range (JSON numbers here must fit a 64-bit float)")
        return value

    try:
        json.loads(body.decode("utf-8"), parse_constant=no_constants, parse_float=finite)
    except RecursionError:
        return "the JSON body is nested too deeply"
    except UnicodeDecodeError as exc:
        return f"the body is not UTF-8 text ({exc.reason} at byte {exc.start}); send JSON encoded as UTF-8"
    except json.JSONDecodeError as exc:
        return f"the body is not valid JSON: {exc}"
    except ValueError as exc:  # no_constants or finite
        return str(exc)
    if _SURROGATE_ESCAPE.search(body):
        return "the body holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); send valid Unicode text"
    return f"the body is not valid JSON: {decoder_message}"
