"""The web page at `/`: static HTML, CSS and JavaScript, and the OpenSeadragon viewer.

No build step: the files under `web/static/` are served as they are, and OpenSeadragon
comes from the npm package that the README's set-up command installs into
`web/node_modules/` (pinned by `web/package-lock.json`). Without it the page still
searches and says that the viewer is not installed. The page and its files hold no data,
so they need no key; everything they show comes from the keyed API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

WEB = Path(__file__).parent / "web"
STATIC = WEB / "static"
OPENSEADRAGON = WEB / "node_modules" / "openseadragon" / "build" / "openseadragon"

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/index.html")
def index_html() -> RedirectResponse:
    return RedirectResponse("/")


def viewer_installed() -> bool:
    return (OPENSEADRAGON / "openseadragon.min.js").is_file()


def mount_static(app: FastAPI) -> None:
    """Serve the page's files, and OpenSeadragon's build when it is installed."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if viewer_installed():
        app.mount("/viewer", StaticFiles(directory=OPENSEADRAGON), name="viewer")
