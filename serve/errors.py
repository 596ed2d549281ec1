"""HTTP errors of the API: every failure becomes ``{"detail": "<what was wrong>"}`` with a 4xx status
(a 5xx only for a fault of the server itself, never for a request)."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

# Ray Serve's logger: its lines land in the replica's log file next to Serve's own, request ids included.
log = logging.getLogger("ray.serve")
INTERNAL_ERROR = "internal error: the server failed on this request; quote request id {} to its operator"


class ApiError(Exception):
    """A request the API refuses: ``status`` is the HTTP code, the message is the detail."""

    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = " ".join(str(detail).split())


class BadRequest(ApiError):
    """Well-formed JSON that asks for something impossible (unknown layer, label out of range...)."""

    status = 422


class NotFound(ApiError):
    """An unknown run, slice or sample."""

    status = 404


class Unauthorized(ApiError):
    """A missing or wrong bearer token."""

    status = 401


def error_response(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    """The JSON reply of every error."""
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


def describe_validation(error: RequestValidationError) -> tuple[int, str]:
    """FastAPI's list of validation errors as (status, one line): 400 for malformed JSON, else 422."""
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        reason = next(p for p in problems if p.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, f"malformed JSON body: {reason}".rstrip(": ")
    if any(list(p.get("loc", ())) == ["body"] and p.get("type", "").endswith("_type") for p in problems):
        return 422, "request body must be a JSON object (send it with Content-Type: application/json)"
    parts = []
    for problem in problems[:5]:
        loc = list(problem.get("loc", ()))
        where = ".".join(str(part) for part in (loc[1:] if loc[:1] == ["body"] else loc)) or "body"
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return 422, "; ".join(parts) + more


def install_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` a ``{"detail": str}`` reply."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(error, Unauthorized) else None
        return error_response(error.status, error.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(*describe_validation(error))

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # The reply names no exception, type, pid or path: those stay in the server log, under the request id.
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        log.error("camscope: request %s (%s %s) failed", request_id, request.method, request.url.path,
                  exc_info=error)
        return error_response(500, INTERNAL_ERROR.format(request_id))  # Serve's proxy adds the X-Request-ID header
