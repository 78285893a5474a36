"""The HTTP server's errors: every one is answered as JSON `{"error": {"message", "type"[, "param"]}}`."""
from __future__ import annotations

from typing import Any

# status -> (error type, when the server answers it): the OpenAPI schema documents these per route
STATUSES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "the request is malformed or a value is not allowed"),
    401: ("authentication_error", "the API key is missing or wrong (servers started with --api-key)"),
    404: ("not_found_error", "the voice or model named by the request does not exist"),
    405: ("invalid_request_error", "the method is not allowed on this path (see the Allow header)"),
    413: ("request_too_large", "the request body or upload is larger than the server's limit"),
    429: ("queue_full", "the queue is full; retry after the Retry-After header's seconds"),
    500: ("server_error", "an internal error"),
    503: ("unavailable", "the server is shutting down"),
    504: ("timeout", "no audio within the server's request timeout"),
}


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type or STATUSES.get(status, ("invalid_request_error",))[0]


class BodyTooLarge(Exception):
    """The request body grew past the limit while it was read."""


def error_body(message: str, type: str, param: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"message": message, "type": type}
    if param is not None:
        err["param"] = param
    return {"error": err}


ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorBody",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": "string", "description": "the request field at fault"}},
    }},
}
"""The JSON schema of `error_body`."""
