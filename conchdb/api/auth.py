"""The API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time.

The search key opens every read; with none configured every read passes (the server then
listens on loopback only: `conchdb serve` refuses anything else). The admin key opens the
reads too, and is the only key that deletes; with none configured, nothing is deleted over
HTTP, whoever asks. The schemes are declared with FastAPI's security
classes so that the OpenAPI document and `/docs` show them.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from conchdb.api.errors import ApiError

bearer = HTTPBearer(auto_error=False, description="The server's API key as a bearer token.")
header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key.")

FIX = "send the server's API key as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"


def key_matches(given: str | None, expected: str) -> bool:
    """Whether `given` is the key, in time that does not depend on where they differ."""
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


ADMIN_FIX = "deleting needs the server's admin key (conchdb serve --admin-key, or CONCHDB_ADMIN_KEY)"


def _given(credentials: HTTPAuthorizationCredentials | None, api_key: str | None) -> list[str]:
    return [g for g in (credentials.credentials if credentials is not None else None, api_key) if g is not None]


def require_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    api_key: str | None = Depends(header),
) -> None:
    """Refuse a request without the key (401), when the server has one; the admin key opens reads too."""
    settings = request.app.state.settings
    if not settings.api_key:
        return
    given = _given(credentials, api_key)
    if not given:
        raise ApiError(401, "this server needs an API key", FIX, field="authorization")
    keys = [k for k in (settings.api_key, settings.admin_key) if k]
    if not any(key_matches(g, k) for g in given for k in keys):
        raise ApiError(401, "the API key is not this server's", FIX, field="authorization")


def require_admin(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    api_key: str | None = Depends(header),
) -> None:
    """Refuse a change to the store (403) unless it comes with the admin key, which must be configured."""
    expected = request.app.state.settings.admin_key
    if not expected:
        raise ApiError(403, "this server deletes nothing: it was started without an admin key",
                       "start it with --admin-key (or CONCHDB_ADMIN_KEY), or remove slides with `conchdb remove`",
                       field="authorization")
    if not any(key_matches(g, expected) for g in _given(credentials, api_key)):
        raise ApiError(403, "this key may search but not delete", ADMIN_FIX, field="authorization")
