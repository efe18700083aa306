"""How an error becomes an HTTP response: `{"error", "field", "fix"}` with a status that means something.

Library code raises `ConchdbError`s that carry the `parameter` they are about and a `fix` in
words that suit any front end; this module is the one place that turns them into JSON. The
status comes from the error's type (a malformed query is 422, an upload that is not an image
415, a slide file that moved 404, a store that refuses 409, a model that cannot load 503),
and the `field` is the error's parameter in the API's JSON spelling (`where` is `filters`,
`point` is `point_id`). Messages are for the person who sent the request: a validation
error names the field, the value sent as JSON writes it and what to send instead (never
pydantic's phrasing, a Python repr or `None`). Nothing else reaches the client: an unexpected exception is logged
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


def shown(value: Any) -> str:
    """A value as a user wrote it in JSON (`null`, `"lung"`, `2`, `true`, a list, an object),
    never a Python repr."""
    if value is None:
        return "no value (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if len(value) <= 60 else f'"{value[:57]}..."'
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a value of another kind"


SCHEMA_FIX = "see the fields each request takes at /docs"
_KIND_WORDS = {
    "int": "a whole number", "float": "a number", "bool": "true or false", "string": "a text",
    "dict": "an object", "list": "a list",
}


def _kind_problem(kind: str) -> str | None:
    for prefix, words in _KIND_WORDS.items():
        if kind.startswith(prefix + "_") or kind == prefix:
            return words
    return None


def validation_error(errors: list[Any], model: Any = None) -> ApiError:
    """The first of pydantic's complaints about a request, in words: which field, what is wrong
    with the value sent, and what to send instead (never pydantic's own phrasing or a repr)."""
    first = errors[0] if errors else {}
    field = _validation_field(tuple(first.get("loc", ()))) or "body"
    kind = str(first.get("type", ""))
    ctx = first.get("ctx") or {}
    value = first.get("input")
    in_url = tuple(first.get("loc", ("body",)))[:1] in (("query",), ("path",))
    sent = str if in_url else shown  # a URL's values are text as typed, not JSON
    names = sorted(getattr(model, "model_fields", {}) or {})
    fix = SCHEMA_FIX
    if kind == "missing" and field == "body":
        message = "the request has no JSON body"
        fix = "send a JSON object" + (" with the fields: " + ", ".join(names) if names else "")
    elif kind == "json_invalid":
        message = "the body is not valid JSON"
        fix = "send a JSON object, with double quotes around names and texts"
    elif kind == "missing":
        message = f"'{field}' is missing"
        fix = f"give '{field}'"
    elif kind == "extra_forbidden":
        message = f"this request takes no field '{field}'"
        fix = ("the fields are: " + ", ".join(names)) if names else SCHEMA_FIX
    elif kind in ("less_than_equal", "less_than", "greater_than_equal", "greater_than"):
        bound = ctx.get("le", ctx.get("lt", ctx.get("ge", ctx.get("gt"))))
        word = {"less_than_equal": "at most", "less_than": "below", "greater_than_equal": "at least",
                "greater_than": "above"}[kind]
        message = f"'{field}' must be {word} {bound}, not {sent(value)}"
        fix = f"give '{field}' a value {word} {bound}"
    elif kind == "string_too_short":
        message = f"'{field}' is empty" if not value else f"'{field}' is too short"
        fix = f"give '{field}' some text"
    elif kind == "string_too_long":
        message = f"'{field}' is longer than {ctx.get('max_length')} characters"
        fix = f"shorten '{field}'"
    elif kind in ("too_short", "too_long"):
        message = f"'{field}' has {'too few' if kind == 'too_short' else 'too many'} entries"
        limit = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        fix = f"give '{field}' {'at least' if kind == 'too_short' else 'at most'} {limit}"
    elif kind in ("literal_error", "enum"):
        message = f"'{field}' cannot be {sent(value)}"
        fix = f"give '{field}' one of: {ctx.get('expected', 'the values listed at /docs')}"
    elif _kind_problem(kind):
        words = _kind_problem(kind)
        message = f"'{field}' must be {words}, not {sent(value)}"
        fix = f"give '{field}' {words}"
    else:
        message = f"'{field}' is not valid ({sent(value)} was sent)"
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(422, message, fix, field=field)


def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    route = request.scope.get("route")
    field_info = getattr(getattr(route, "body_field", None), "field_info", None)
    body = getattr(field_info, "annotation", None)  # the route's request model, if it has one
    return error_response(validation_error(list(exc.errors()), body))


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
