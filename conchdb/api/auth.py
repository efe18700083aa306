"""The API key: `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time.

With no key configured every request passes (the server then listens on loopback only:
`conchdb serve` refuses anything else). The schemes are declared with FastAPI's security
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


def require_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    api_key: str | None = Depends(header),
) -> None:
    """Refuse a request without the key (401), when the server has one."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    given = [credentials.credentials if credentials is not None else None, api_key]
    if not any(g is not None for g in given):
        raise ApiError(401, "this server needs an API key", FIX, field="authorization")
    if not any(key_matches(g, expected) for g in given if g is not None):
        raise ApiError(401, "the API key is not this server's", FIX, field="authorization")
