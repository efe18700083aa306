"""The HTTP API and web page: `create_app(searcher, settings)`, run by `conchdb serve`.

Layers: `app` builds the FastAPI application; `routes/` holds one router per concern;
`service` holds the one `Searcher` that every request uses, with text batching
(`batching`) and the guards of what concurrent requests share (`shared`); `errors`,
`auth`, `uploads`, `filters` and `schemas` are the edges where requests are checked and
errors rendered; `page` serves the web page under `web/`.
"""

from conchdb.api.app import create_app
from conchdb.api.settings import ApiSettings, is_loopback

__all__ = ["ApiSettings", "create_app", "is_loopback"]
