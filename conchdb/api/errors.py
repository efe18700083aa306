"""How an error becomes an HTTP response: `{"error", "field", "fix"}` with a status that means something.

Library code raises `ConchdbError`s that carry the `parameter` they are about and a `fix` in
words that suit any front end; this module is the one place that turns them into JSON. The
status comes from the error's type (a malformed query is 422, an upload that is not an image
415, a slide file that moved 404, a store that refuses 409, a model that cannot load 503),
and the `field` is the error's parameter in the API's JSON spelling (`where` is `filters`,
`point` is `point_id`). Nothing else reaches the client: an unexpected exception is logged
here and answered with a plain 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from conchdb.errors import (
    CheckpointError,
    ConchdbError,
    ImageInputError,
    QueryError,
    SlideError,
    StoreError,
    TokenizerError,
)

log = logging.getLogger("conchdb.api")


class ApiError(ConchdbError):
    """An error the API itself raises, with its HTTP status and the JSON field it is about."""

    def __init__(self, status: int, message: str, fix: str | None = None, *, field: str | None = None):
        super().__init__(message, fix, parameter=field)
        self.status = status
        self.field = field


PARAMETER_FIELDS: dict[str, str] = {
    "where": "filters",
    "filter": "filters",
    "point": "point_id",
    "slide": "slide_id",
    "k": "top_k",
    "label": "labels",
}
"""Library parameter names whose JSON field is spelled otherwise (the rest are the same)."""

STATUS_BY_TYPE: tuple[tuple[type[ConchdbError], int], ...] = (
    (CheckpointError, 503),
    (TokenizerError, 503),
    (ImageInputError, 415),
    (SlideError, 404),
    (StoreError, 409),
    (QueryError, 422),
)


def error_status(exc: ConchdbError) -> int:
    """The HTTP status of a library or API error."""
    if isinstance(exc, ApiError):
        return exc.status
    for kind, status in STATUS_BY_TYPE:
        if isinstance(exc, kind):
            return status
    return 400


def error_field(exc: ConchdbError) -> str | None:
    """The JSON field an error is about: the API's own, or the library's `parameter`."""
    if isinstance(exc, ApiError):
        return exc.field
    return PARAMETER_FIELDS.get(exc.parameter, exc.parameter) if exc.parameter else None


def error_body(message: str, field: str | None = None, fix: str | None = None) -> dict[str, Any]:
    return {"error": message, "field": field, "fix": fix}


def error_response(exc: ConchdbError) -> JSONResponse:
    """The JSON response for a `ConchdbError` (the one mapping every route goes through)."""
    status = error_status(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(exc.message, error_field(exc), exc.fix), status, headers=headers)


def _validation_field(loc: tuple[Any, ...]) -> str | None:
    """`("body", "filters", "grade")` -> `filters.grade`: where in the request the problem is."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie", "form"):
        parts = parts[1:]
    return ".".join(parts) or None


def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    field = _validation_field(tuple(first.get("loc", ())))
    message = str(first.get("msg", "the request is not valid"))
    if field:
        message = f"{field}: {message}"
    more = f" ({len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return JSONResponse(
        error_body(message + more, field, "see the request schema at /docs (or /openapi.json)"), 422
    )


def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    fixes = {
        400: "send a JSON object encoded as UTF-8, with Content-Type: application/json",
        404: "see the endpoints at /docs",
        405: "see the methods each endpoint takes at /docs",
    }
    return JSONResponse(
        error_body(str(exc.detail), None, fixes.get(exc.status_code)), exc.status_code, headers=exc.headers
    )


def _on_conchdb(request: Request, exc: ConchdbError) -> JSONResponse:
    return error_response(exc)


def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(
        error_body("internal error", None, "the server log has the details; please report it"), 500
    )


def install(app: FastAPI) -> None:
    """Register the handlers: every error leaves the server as `{"error", "field", "fix"}`."""
    app.add_exception_handler(ConchdbError, _on_conchdb)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)
