"""The web page in a real browser: Debian's chromium driven by Playwright against a live server on loopback.

Type a query, see the result images load, filter, open a tile in the deep-zoom viewer (its
tiles requested and drawn, the tile outlined), lay the heatmap over it, and ask for "more
like this". A screenshot of the page with the viewer open is kept as a test artifact.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conchdb.api import ApiSettings, create_app
from conchdb.api.page import viewer_installed
from tests.api.conftest import KEY, LiveServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-dev-shm-usage",  # root in a container
    # nothing but the test server: no update checks, sync, field trials or safe-browsing lists
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-domain-reliability", "--disable-features=OptimizationHints,MediaRouter",
]


def _need(condition: bool, reason: str) -> None:
    """Skip where a tool is missing on a developer's machine; in CI (which installs it) fail."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (.ci/run installs it)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    _need(Path(CHROMIUM).is_file() or shutil.which("chromium") is not None, f"no chromium at {CHROMIUM}")
    _need(viewer_installed(), "OpenSeadragon is not installed: run `npm ci --prefix conchdb/api/web`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(searcher):
    with LiveServer(create_app(searcher, ApiSettings(api_key=KEY))) as live:
        yield live


def test_search_filter_view_and_more_like_this(browser, server, searcher, tmp_path_factory):
    page = browser.new_page(viewport={"width": 1400, "height": 950})
    requests: list[str] = []
    failures: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("requestfailed", lambda r: failures.append(r.url))
    page.on("pageerror", lambda e: failures.append(f"script error: {e}"))
    page.on("dialog", lambda d: d.accept(KEY))  # the page asks for the key once, on the first 401
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=yes]", timeout=20_000)
    assert all(url.startswith("http://127.0.0.1:") for url in requests)

    page.fill("#text", "adenocarcinoma")
    page.press("#text", "Enter")
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('.card img')];"
        " return imgs.length === 24 && imgs.every(i => i.complete && i.naturalWidth === 64); }",
        timeout=20_000,
    )
    assert page.locator("#summary").inner_text().startswith("Results 1–24")

    page.fill("#filters input[name=diagnosis]", "adenoma")
    page.press("#filters input[name=diagnosis]", "Tab")  # a change re-runs the search
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.card .meta')];"
        " return m.length === 24 && m.every(e => e.textContent.includes('diagnosis: adenoma')); }",
        timeout=20_000,
    )
    first = page.locator(".card").first
    clicked = first.get_attribute("data-id")
    first.click()
    page.wait_for_selector("#viewer-panel:not([hidden])")
    page.wait_for_function("() => window.conchdb.tilesLoaded > 0 && document.getElementById('tile-outline')",
                           timeout=20_000)
    page.wait_for_timeout(800)  # let the viewer finish drawing before the pictures are taken
    plain = np.asarray(Image.open(io.BytesIO(page.locator("#viewer").screenshot())).convert("RGB"), dtype=float)
    page.check("#heatmap-toggle")
    page.wait_for_selector("body[data-heatmap=shown]", timeout=20_000)
    page.wait_for_timeout(800)
    assert page.evaluate("window.conchdb.viewer.world.getItemCount()") == 2
    deep_zoom = [u for u in requests if "_files/" in u and u.endswith(".jpeg")]
    assert deep_zoom and any("case_a%2Fs2.png_files/" in u for u in deep_zoom)
    assert any("/heatmap.png?query=adenocarcinoma" in u for u in requests)
    viewer = np.asarray(Image.open(io.BytesIO(page.locator("#viewer").screenshot())).convert("RGB"), dtype=float)
    assert plain.std() > 20  # the slide is drawn, not a blank canvas
    assert np.abs(viewer - plain).mean() > 5  # and the heatmap is laid over it
    assert page.locator("#tile-outline").is_visible()
    shot = tmp_path_factory.mktemp("artifacts") / "page_viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    page.click("#more-like-this")
    page.wait_for_selector("#viewer-panel[hidden]", state="attached")
    page.wait_for_function(
        f"() => {{ const c = document.querySelector('.card'); return c && c.dataset.id === '{clicked}'"
        " && document.getElementById('summary').textContent.includes('tiles like tile'); }",
        timeout=20_000,
    )

    target = next(iter(searcher.store.scroll("conch_tiles")))  # an image query through the file picker
    p = target.payload
    query = tmp_path_factory.mktemp("upload") / "query.png"
    with Image.open(p["path"]) as image:
        image.convert("RGB").crop((p["x"], p["y"], p["x"] + p["size"], p["y"] + p["size"])).save(query)
    page.fill("#filters input[name=diagnosis]", "")
    page.set_input_files("#file", str(query))
    page.wait_for_function(
        f"() => {{ const c = document.querySelector('.card'); return c && c.dataset.id === '{target.id}'"
        " && document.getElementById('summary').textContent.includes('the image query.png'); }",
        timeout=20_000,
    )
    assert not failures, failures
    assert shot.stat().st_size > 10_000
    page.close()


def test_the_page_says_clearly_when_the_server_refuses(browser, server):
    page = browser.new_page()
    page.on("dialog", lambda d: d.accept("not-the-key"))
    page.goto(server.url + "/")
    page.wait_for_selector("#banner:not([hidden])", timeout=20_000)
    text = page.locator("#banner").inner_text()
    assert "refused (401)" in text and "API key" in text
    page.close()


def test_a_hits_viewer_url_opens_its_slide_centred_on_the_tile(browser, server, searcher):
    import httpx

    hit = httpx.post(f"{server.url}/v1/search/text", json={"query": "mucosa", "top_k": 1},
                     headers={"X-API-Key": KEY}, trust_env=False).json()["hits"][0]
    page = browser.new_page()
    page.on("dialog", lambda d: d.accept(KEY))
    page.goto(server.url + hit["viewer_url"])
    page.wait_for_function("() => window.conchdb.tilesLoaded > 0 && document.getElementById('tile-outline')",
                           timeout=20_000)
    assert hit["slide_id"] in page.locator("#viewer-title").inner_text()
    assert f"({hit['x']}, {hit['y']})" in page.locator("#viewer-title").inner_text()
    page.close()
