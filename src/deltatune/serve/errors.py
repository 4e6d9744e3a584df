"""Errors the server answers with: an HTTP status and OpenAI's JSON error body.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` is what the official ``openai``
client parses into ``BadRequestError``, ``AuthenticationError``, ``NotFoundError``, ``RateLimitError``...
"""

from __future__ import annotations

from typing import Any

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "conflict_error", 413: "request_too_large", 429: "rate_limit_error", 500: "server_error",
               503: "service_unavailable"}


class ApiError(Exception):
    """An error the client caused or should know about; becomes ``status`` with a JSON body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code}}
