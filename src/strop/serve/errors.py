"""OpenAI's error body, and the exception handlers that give every failure that shape.

A failure a client causes is an `ApiError` with 400, 401, 404 or 429 (`{"error": {message, type, param,
code}}`, a 429 with Retry-After); an unknown route or method is the same body from Starlette's status;
anything else is a 500 of the same shape, never a traceback.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}
        body = {
            "message": self.message,
            "type": kind.get(self.status, "invalid_request_error" if self.status < 500 else "server_error"),
            "param": self.param,
            "code": self.code,
        }
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


async def api_error(request: Request, e: ApiError) -> JSONResponse:
    return e.response()


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """404 for an unknown path, 405 for a wrong method: Starlette's status, OpenAI's body."""
    return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    return ApiError(500, f"internal error: {type(e).__name__}: {e}").response()
