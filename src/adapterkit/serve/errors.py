"""Errors the server answers with, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Everything a handler refuses is an :class:`APIError` with its HTTP status;
the application turns it (and FastAPI's own validation errors) into that
body, so clients written for OpenAI or vLLM read our errors unchanged.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A refused request: HTTP ``status``, a message that says what was expected and found,
    OpenAI's error ``type``, the offending ``param`` and a short machine-readable ``code``."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    """400: a request the server understands but cannot do as given."""


class Unauthorized(APIError):
    """401: a missing or wrong API key."""

    status = 401
    type = "authentication_error"


class Forbidden(APIError):
    """403: an adapter path outside the adapter root, or an adapter made for another base."""

    status = 403
    type = "permission_error"


class NotFound(APIError):
    """404: an unknown model (adapter or base name) or route."""

    status = 404
    type = "not_found_error"


class TooLarge(APIError):
    """413: a request body larger than the server accepts."""

    status = 413


class Overloaded(APIError):
    """503: the queue is full (or the server is stopping); ``Retry-After`` says when to try again."""

    status = 503
    type = "server_overloaded"

    def __init__(self, message: str, retry_after: int = 1, **kwargs: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **kwargs)
