"""The web page in a real browser: Debian's chromium driven by Playwright against a live server on loopback.

One server and one browser serve the module. The server runs behind a gate that holds the
requests a test names until the test lets them go, so a slow search is made by the test,
never by sleeping in the page. A screenshot of each state is kept as a test artifact, in
`$CONCHDB_TEST_ARTIFACTS/page/` when that is set, else in pytest's temporary folder (the
path is printed).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from PIL import Image

from conchdb.api import ApiSettings, create_app
from conchdb.api.filters import OPERATORS
from conchdb.api.page import WEB, viewer_installed
from tests.api.conftest import KEY, LiveServer
from tests.conftest import need_tool

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-dev-shm-usage",  # root in a container
    # nothing but the test server: no update checks, sync, field trials or safe-browsing lists
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-domain-reliability", "--disable-features=OptimizationHints,MediaRouter",
]
AXE = WEB / "node_modules" / "axe-core" / "axe.min.js"
WAIT = 20_000  # ms: how long Playwright's auto-waiting may take before a test fails (never a delay)


class Gate:
    """Holds the requests for which `rule(path, body)` is true until `open()`: a slow server."""

    def __init__(self) -> None:
        self.rule: Callable[[str, dict], bool] | None = None
        self.released = threading.Event()
        self.held = threading.Event()
        self.answered = threading.Event()

    def hold(self, rule: Callable[[str, dict], bool]) -> None:
        self.released.clear()
        self.held.clear()
        self.answered.clear()
        self.rule = rule

    def open(self) -> None:
        self.rule = None
        self.released.set()


class Gated:
    """ASGI middleware: requests that the gate's rule picks wait for the gate to open."""

    def __init__(self, app, gate: Gate):
        self.app = app
        self.gate = gate

    async def __call__(self, scope, receive, send):
        rule = self.gate.rule
        if scope["type"] != "http" or rule is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if raw.startswith(b"{") else {"upload": True}
        except ValueError:
            body = {}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        if rule(scope["path"], body):
            self.gate.held.set()
            await asyncio.to_thread(self.gate.released.wait, 60)
            await self.app(scope, replay, send)
            self.gate.answered.set()
        else:
            await self.app(scope, replay, send)


@pytest.fixture(scope="module")
def browser():
    need_tool(Path(CHROMIUM).is_file() or shutil.which("chromium") is not None, f"no chromium at {CHROMIUM}")
    need_tool(viewer_installed() and AXE.is_file(), "the page's npm packages are not installed: run "
              "`npm ci --prefix conchdb/api/web`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need_tool(False, "playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def server(searcher, gate):
    with LiveServer(Gated(create_app(searcher, ApiSettings(api_key=KEY)), gate)) as live:
        yield live
    gate.open()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    root = os.environ.get("CONCHDB_TEST_ARTIFACTS")
    folder = Path(root) / "page" if root else tmp_path_factory.mktemp("page-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"page screenshots: {folder}")
    return folder


class Page:
    """A browser tab on the page, its script errors collected, the API key given when asked."""

    def __init__(self, browser, server):
        self.page = browser.new_page(viewport={"width": 1400, "height": 950}, accept_downloads=True)
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"script error: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: d.accept(KEY))
        self.url = server.url

    def open(self, path: str = "/") -> Page:
        self.page.goto(self.url + path)
        self.page.wait_for_selector("body[data-ready=yes]", timeout=WAIT)
        return self

    def wait(self, script: str) -> None:
        self.page.wait_for_function(script, timeout=WAIT)

    def wait_cards(self, n: int | None = None, selector: str = ".card") -> None:
        """Until the results are shown (not loading), with `n` cards whose images have loaded."""
        count = f"c.length === {n}" if n is not None else "c.length > 0"
        self.wait(f"() => {{ const c = [...document.querySelectorAll('{selector}')];"
                  f" return document.body.dataset.busy === 'no' && {count}"
                  " && c.every(x => [...x.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)); }")

    def summary(self) -> str:
        return self.page.locator("#summary").inner_text()

    def ids(self) -> list[str]:
        return self.page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")

    def search(self, text: str) -> None:
        self.page.fill("#text", text)
        self.page.press("#text", "Enter")

    def shot(self, folder: Path, name: str) -> None:
        path = folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=False)
        assert path.stat().st_size > 5_000

    def axe(self) -> list[dict]:
        """axe-core's serious and critical violations on the page as it is now."""
        if not self.page.evaluate("typeof window.axe !== 'undefined'"):
            self.page.add_script_tag(path=str(AXE))
        return self.page.evaluate(
            "async () => (await axe.run(document)).violations"
            ".filter(v => ['serious', 'critical'].includes(v.impact))"
            ".map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' '))}))"
        )

    def close(self) -> None:
        assert not self.errors, self.errors
        self.page.close()


def api_hits(server, path: str, body: dict) -> list[dict]:
    return httpx.post(f"{server.url}{path}", json=body, headers={"X-API-Key": KEY}, trust_env=False).json()["hits"]


def test_landing_search_cards_and_filters_from_the_data(browser, server, shots):
    tab = Page(browser, server).open()
    assert tab.page.locator("#pager").is_hidden() and tab.page.locator(".card").count() == 0
    assert all(url.startswith("http://127.0.0.1:") for url in tab.requests)
    tab.shot(shots, "01-landing")

    tab.search("adenocarcinoma")
    tab.wait_cards(24)
    assert tab.summary() == "Results 1–24 for “adenocarcinoma”"
    assert "q=adenocarcinoma" in tab.page.url
    assert tab.page.locator("#pager").is_visible() and tab.page.locator("#prev").is_disabled()
    page_one = tab.ids()
    tab.page.click("#next")
    tab.wait("() => document.getElementById('summary').textContent === 'Results 25–48 for “adenocarcinoma”'")
    tab.wait_cards(24)
    want = [h["id"] for h in api_hits(server, "/v1/search/text", {"query": "adenocarcinoma", "top_k": 24, "page": 2})]
    assert tab.ids() == want and not set(want) & set(page_one) and "page=2" in tab.page.url
    tab.page.click("#prev")
    tab.wait("() => document.getElementById('summary').textContent === 'Results 1–24 for “adenocarcinoma”'")
    tab.wait_cards(24)
    first = tab.page.locator(".card").first
    text = first.inner_text()
    assert "diagnosis" in text and " µm" in text and "score" in text
    assert first.locator("details.storage").count() == 1 and not first.locator("details.storage dl").is_visible()
    shown = first.locator(".card-body > dl.facts").inner_text()  # the card's fields (not a weak hit's note)
    assert "mosaic" not in shown and "cohort" not in shown and "tissue" not in shown  # storage behind "details"
    tab.shot(shots, "02-results-tiles")

    labels = tab.page.locator("#filter-diagnosis").inner_text()
    assert "adenoma" in labels and "(1 slide)" in labels  # stored values offered with their counts
    tab.page.check("#filters input[name=diagnosis][value=adenoma]")
    tab.wait("() => document.getElementById('summary').textContent.includes('diagnosis: adenoma')")
    tab.wait_cards(24)
    metas = tab.page.eval_on_selector_all(".card", "cs => cs.map(c => c.innerText)")
    assert all("adenoma" in m and "adenocarcinoma" not in m for m in metas)
    assert "diagnosis" in tab.page.url
    with tab.page.expect_download() as download:
        tab.page.click("#export")
    csv = Path(download.value.path()).read_text().splitlines()
    assert csv[0].startswith("rank,group,point_id,slide_id,score") and len(csv) == 25
    assert all(",adenoma," in row for row in csv[1:])

    tab.page.fill("#filter-age-min", "70")
    tab.page.press("#filter-age-min", "Tab")  # a range with one end is a search (no adenoma is that old)
    tab.wait("() => document.getElementById('summary').textContent.startsWith('No results')")
    searches = len([u for u in tab.requests if u.endswith("/v1/search/text")])
    tab.page.fill("#filter-age-max", "50")
    tab.page.press("#filter-age-max", "Tab")
    problem = tab.page.locator("#filter-age-problem")
    assert "above" in problem.inner_text()  # min > max is refused in the form, not sent
    assert len([u for u in tab.requests if u.endswith("/v1/search/text")]) == searches
    tab.shot(shots, "03-filters-refused-range")

    tab.close()


@pytest.mark.parametrize("case", ["image then text", "text then text", "filter during a slow search"])
def test_the_last_query_wins_whatever_answers_last(browser, server, searcher, gate, shots, tmp_path, case):
    tab = Page(browser, server).open()
    if case == "image then text":
        target = next(iter(searcher.store.scroll("conch_tiles")))
        p = target.payload
        query = tmp_path / "query.png"
        with Image.open(p["path"]) as image:
            image.convert("RGB").crop((p["x"], p["y"], p["x"] + p["size"], p["y"] + p["size"])).save(query)
        gate.hold(lambda path, body: path == "/v1/search/image")
        tab.page.set_input_files("#file", str(query))
        final, final_body = "mucosa", {"query": "mucosa", "top_k": 24}
    elif case == "text then text":
        gate.hold(lambda path, body: body.get("query") == "tumor")
        tab.search("tumor")
        final, final_body = "mucosa", {"query": "mucosa", "top_k": 24}
    else:
        gate.hold(lambda path, body: path == "/v1/search/text" and not body.get("filters"))
        tab.search("adenocarcinoma")
        final = None
        final_body = {"query": "adenocarcinoma", "top_k": 24, "filters": {"diagnosis": {"in": ["normal"]}}}
    assert gate.held.wait(30)
    tab.page.wait_for_selector("#loading", state="visible", timeout=WAIT)  # shown while the request is held
    assert tab.page.locator(".card").count() == 0
    tab.shot(shots, f"04-loading-{case.replace(' ', '-')}")
    if final:
        tab.search(final)
    else:
        tab.page.check("#filters input[name=diagnosis][value=normal]")
    tab.wait_cards(24)
    shown_before = (tab.summary(), tab.ids())
    gate.open()
    assert gate.answered.wait(30)  # the older search has now answered, after the newer one
    tab.page.evaluate("() => fetch('/v1/health').then(r => r.json())")  # the page has had its turn
    assert (tab.summary(), tab.ids()) == shown_before
    want = [h["id"] for h in api_hits(server, "/v1/search/text", final_body)]
    assert tab.ids() == want
    expected_title = f"Results 1–24 for “{final_body['query']}”"
    assert tab.summary().startswith(expected_title)
    assert tab.page.locator("#loading").is_hidden()
    tab.close()


def test_grouped_slides_cases_like_this_slide_and_the_slide_browser(browser, server, shots):
    tab = Page(browser, server).open("/?q=adenocarcinoma")
    tab.wait_cards(24)
    tab.page.check("input[name=group][value=slide]")
    tab.wait_cards(3, ".card.group")
    assert tab.summary() == "Slides 1–3 for “adenocarcinoma”" and "group=slide" in tab.page.url
    group = tab.page.locator(".card.group").first
    assert group.locator(".group-tiles img").count() == 4
    assert re.search(r"24 of the best 72 tiles", group.inner_text())  # the slide's count of hits
    assert "diagnosis" in group.inner_text()
    tab.shot(shots, "05-grouped-by-slide")

    slide = group.get_attribute("data-slide")
    group.locator("button.cases").click()
    tab.wait_cards(2, ".slide-card")
    assert tab.summary() == f"Cases like slide {slide}: 2 slides"
    assert slide not in tab.page.eval_on_selector_all(".slide-card", "cs => cs.map(c => c.dataset.slide)")
    tab.shot(shots, "06-cases-like-this-slide")

    tab.page.go_back()  # to the grouped search
    tab.wait_cards(3, ".card.group")
    tab.page.check("input[name=group][value=patient]")  # the collection has patient_id: group by patient
    tab.wait_cards(2, ".card.group")
    assert tab.summary() == "Patients 1–2 for “adenocarcinoma”" and "group=patient" in tab.page.url
    assert sorted(tab.page.eval_on_selector_all(".card.group", "cs => cs.map(c => c.dataset.group)")) == ["P-a", "P-b"]
    assert "48 of the best 72 tiles" in tab.page.locator(".card.group[data-group=P-a]").inner_text()
    tab.shot(shots, "05b-grouped-by-patient")
    tab.page.go_back()  # to the slides; from the viewer on one of their tiles, cases like that slide
    tab.wait_cards(3, ".card.group")
    tab.page.locator(".card.group").nth(1).locator(".card-open").first.click()
    tab.page.wait_for_selector("#viewer-panel:not([hidden])")
    other = tab.page.locator(".card.group").nth(1).get_attribute("data-slide")
    tab.page.click("#cases-like-slide")
    tab.page.wait_for_selector("#viewer-panel[hidden]", state="attached")
    tab.wait(f"() => document.getElementById('summary').textContent === 'Cases like slide {other}: 2 slides'")
    tab.wait_cards(2, ".slide-card")

    tab.page.click("#browse")
    tab.wait_cards(3, ".slide-card")
    assert tab.summary() == "Slides 1–3 of 3" and "browse=1" in tab.page.url
    tab.page.check("#filters input[name=diagnosis][value=normal]")  # the browser filters by the same fields
    tab.wait("() => document.getElementById('summary').textContent === 'Slides 1–1 of 1'")
    tab.wait_cards(1, ".slide-card")
    assert tab.page.locator(".slide-card").get_attribute("data-slide") == "case_b/s3.png"
    tab.open("/?browse=1&k=2")
    tab.wait_cards(2, ".slide-card")
    assert tab.summary() == "Slides 1–2 of 3" and tab.page.locator("#top-k").input_value() == "2"
    tab.page.click("#next")
    tab.wait("() => document.getElementById('summary').textContent === 'Slides 3–3 of 3'")
    tab.wait_cards(1, ".slide-card")
    assert tab.page.locator("#next").is_disabled() and "page=2" in tab.page.url
    tab.shot(shots, "07-slide-browser")
    tab.close()


def test_the_viewer_scale_outlines_keys_heatmap_and_region_search(browser, server, searcher, shots):
    tab = Page(browser, server).open("/?q=adenocarcinoma")
    tab.wait_cards(24)
    first = tab.page.locator(".card").first
    slide, clicked = first.get_attribute("data-slide"), first.get_attribute("data-id")
    first.locator(".card-open").click()
    tab.page.wait_for_selector("#viewer-panel:not([hidden])")
    tab.wait("() => window.conchdb.tilesLoaded > 0 && document.getElementById('tile-outline')")
    bar = tab.page.locator("#scalebar")
    bar.wait_for(state="visible", timeout=WAIT)
    assert bar.get_attribute("data-mpp") == "0.5" and re.search(r"\d+ µm", bar.inner_text())
    tiles_on_slide = sum(1 for h in searcher.store.scroll("conch_tiles") if h.payload["slide_id"] == slide)
    assert tab.page.locator("#viewer .outline").count() == tiles_on_slide  # every hit on the slide outlined
    assert tab.page.locator("#viewer .outline.current").count() == 1
    assert tab.page.locator("#tile-outline").get_attribute("data-id") == clicked
    assert f"open={clicked}" in tab.page.url
    # The hits on this slide for QuPath: one closed level-0 square per outlined tile, QuPath's layout.
    with tab.page.expect_download() as download:
        tab.page.click("#export-geojson")
    doc = json.loads(Path(download.value.path()).read_text())
    stored = {h.id: h.payload for h in searcher.store.scroll("conch_tiles") if h.payload["slide_id"] == slide}
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == tiles_on_slide
    for feature in doc["features"]:
        p = stored[feature["id"]]
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] == [p["x"], p["y"]] and ring[2] == [p["x"] + p["size"], p["y"] + p["size"]]
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] in ("conchdb hit", "conchdb weak hit")
        assert isinstance(feature["properties"]["measurements"]["score"], float)

    tab.page.keyboard.press("n")
    tab.wait("() => document.getElementById('viewer-title').textContent.includes('hit #2')")
    second = tab.page.locator(".card").nth(1).get_attribute("data-id")
    tab.wait(f"() => document.getElementById('tile-outline')?.dataset.id === '{second}'")
    tab.page.keyboard.press("p")
    tab.wait(f"() => document.getElementById('tile-outline')?.dataset.id === '{clicked}'")

    tab.page.check("#heatmap-toggle")
    tab.page.wait_for_selector("body[data-heatmap=shown]", timeout=WAIT)
    assert tab.page.locator("#legend").is_visible()
    low, high = (float(tab.page.locator(f"#legend-{end}").inner_text()) for end in ("low", "high"))
    assert low < high
    assert "rgb(68, 1, 84)" in tab.page.eval_on_selector("#legend-bar", "e => getComputedStyle(e).backgroundImage")
    tab.page.fill("#heatmap-opacity", "80")
    tab.wait("() => Math.abs(window.conchdb.heatmapItem.getOpacity() - 0.8) < 1e-6")
    tab.page.click("#describe")
    tab.page.wait_for_selector("#viewer-answers li", timeout=WAIT)
    tab.page.fill("#classify-labels", "adenoma, normal tissue")
    tab.page.click("#classify")
    tab.page.wait_for_selector("#viewer-answers h3:has-text('Zero-shot class')", timeout=WAIT)
    assert tab.page.locator("#viewer-answers li").count() == 2
    assert tab.axe() == [], "the viewer with its heatmap, legend and answers"
    tab.shot(shots, "08-viewer-heatmap")

    box = tab.page.locator("#viewer").bounding_box()
    tab.page.click("#draw-region")
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    tab.page.mouse.move(cx - 60, cy - 60)
    tab.page.mouse.down()
    tab.page.mouse.move(cx, cy, steps=4)
    tab.page.mouse.move(cx + 60, cy + 60, steps=4)
    tab.page.mouse.up()
    tab.page.wait_for_selector("#viewer-panel[hidden]", state="attached", timeout=WAIT)
    tab.wait("() => document.getElementById('summary').textContent.startsWith('Results 1–24 for tiles like a region')")
    tab.wait_cards(24)
    assert "region=" in tab.page.url and quote(slide, safe="") in tab.page.url
    assert re.search(r"a \d+ × \d+ µm region of slide", tab.page.locator("#query-shown").inner_text())
    assert any(u.endswith("/v1/search/image") for u in tab.requests)
    tab.shot(shots, "09-region-search")
    tab.close()


def test_more_like_this_leaves_the_query_tile_out_and_shows_it(browser, server, shots):
    tab = Page(browser, server).open("/?q=adenocarcinoma")
    tab.wait_cards(24)
    clicked = tab.page.locator(".card").first.get_attribute("data-id")
    tab.page.locator(".card .card-open").first.click()
    tab.page.wait_for_selector("#viewer-panel:not([hidden])")
    tab.page.click("#more-like-this")
    tab.wait("() => document.getElementById('summary').textContent"
             ".startsWith('Results 1–24 for tiles like the query tile')")
    tab.wait_cards(24)
    assert clicked not in tab.ids()
    assert tab.page.locator("#query-shown img").get_attribute("alt") == "the query tile"
    assert "of slide case_" in tab.page.locator("#query-shown").inner_text()
    tab.wait("() => document.querySelector('#query-shown img').naturalWidth > 0")
    assert f"like={clicked}" in tab.page.url
    tab.shot(shots, "10-more-like-this")
    tab.close()


def test_a_search_url_restores_after_reload_and_back_steps_back(browser, server):
    tab = Page(browser, server).open()
    tab.search("adenocarcinoma")
    tab.wait_cards(24)
    first = (tab.summary(), tab.ids())
    tab.page.check("input[name=group][value=slide]")
    tab.wait_cards(3, ".card.group")
    grouped = (tab.summary(), tab.ids())
    tab.search("mucosa")
    tab.wait("() => document.getElementById('summary').textContent.startsWith('Slides 1–3 for “mucosa”')")
    tab.wait_cards(3)
    second = (tab.summary(), tab.ids())
    tab.page.reload()
    tab.page.wait_for_selector("body[data-ready=yes]")
    tab.wait_cards(3)
    assert (tab.summary(), tab.ids()) == second
    tab.page.go_back()
    tab.wait(f"() => document.getElementById('summary').textContent === {json.dumps(grouped[0])}")
    tab.wait_cards(3)
    assert tab.ids() == grouped[1]
    tab.page.go_back()
    tab.wait(f"() => document.getElementById('summary').textContent === {json.dumps(first[0])}")
    tab.wait_cards(24)
    assert tab.ids() == first[1]

    card = tab.page.locator(".card").nth(2)
    point = card.get_attribute("data-id")
    card.locator(".card-open").click()
    tab.wait("() => window.conchdb.tilesLoaded > 0 && document.getElementById('tile-outline')")
    tab.page.reload()  # the open viewer is in the URL too
    tab.page.wait_for_selector("body[data-ready=yes]")
    tab.wait(f"() => document.getElementById('tile-outline')?.dataset.id === '{point}'")
    assert "hit #3" in tab.page.locator("#viewer-title").inner_text()
    tab.page.go_forward()  # forward to the grouped search: the viewer closes, the URL stays the one stepped to
    tab.wait(f"() => document.getElementById('summary').textContent === {json.dumps(grouped[0])}")
    tab.wait_cards(3)
    assert tab.page.locator("#viewer-panel").is_hidden()
    assert "open=" not in tab.page.url and "group=slide" in tab.page.url
    tab.close()


def test_keyboard_only_and_axe_finds_nothing_serious(browser, server, shots):
    tab = Page(browser, server).open()
    assert tab.axe() == [], "landing page"
    # The image drop zone is a button: Enter asks the file input to open its chooser (the input's click is
    # recorded instead of opening the browser's dialog, which a headless browser may not raise every time).
    tab.page.evaluate("document.getElementById('file').click = () => { window.chooserAsked = true; }")
    tab.page.focus("#drop")
    tab.page.keyboard.press("Enter")
    tab.wait("() => window.chooserAsked === true")
    tab.search("adenocarcinoma")
    tab.wait_cards(24)
    tab.page.focus("#text")
    order = []
    for _ in range(60):  # Tab through the query controls and filters to the first card
        tab.page.keyboard.press("Tab")
        order.append(tab.page.evaluate("document.activeElement.id || document.activeElement.className"))
        if tab.page.evaluate("document.activeElement.classList.contains('card-open')"):
            break
    assert order[-1] == "card-open", order
    assert order.index("search") < order.index("drop") < order.index("browse") < len(order) - 1  # reading order
    card = tab.page.evaluate("document.activeElement.closest('.card').dataset.id")
    assert card == tab.ids()[0]
    focus_ring = tab.page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert focus_ring != "none"
    assert tab.axe() == [], "results"
    tab.shot(shots, "11-keyboard-focus-on-first-card")

    tab.page.keyboard.press("Enter")
    tab.page.wait_for_selector("#viewer-panel:not([hidden])")
    tab.wait("() => window.conchdb.tilesLoaded > 0 && document.getElementById('tile-outline')")
    assert tab.page.evaluate("document.getElementById('viewer-panel').contains(document.activeElement)")
    assert tab.axe() == [], "the open viewer"
    tab.page.keyboard.press("Escape")
    tab.page.wait_for_selector("#viewer-panel[hidden]", state="attached")
    assert tab.page.evaluate("document.activeElement.closest('.card')?.dataset.id") == card
    tab.page.keyboard.press("Space")
    tab.page.wait_for_selector("#viewer-panel:not([hidden])")
    tab.page.keyboard.press("Escape")
    tab.page.wait_for_selector("#viewer-panel[hidden]", state="attached")
    tab.page.evaluate("document.body.append(Object.assign(document.createElement('img'), {src: '/static/x.png'}))")
    assert "image-alt" in {v["id"] for v in tab.axe()}  # the audit does see a serious violation
    tab.close()


def _plain_words(text: str, fields: set[str]) -> None:
    assert "None" not in text and "object at 0x" not in text and "<" not in text and "Traceback" not in text, text
    named = set(re.findall(r'"([a-z_]+)":', text)) - set(OPERATORS)
    assert named <= fields, named - fields


@pytest.mark.parametrize("case", ["wrong-type filter", "not an image", "unknown point"])
def test_error_banners_speak_plainly(browser, server, shots, tmp_path, case):
    fields = {f["name"] for f in httpx.get(f"{server.url}/v1/schema", headers={"X-API-Key": KEY}, trust_env=False)
              .json()["fields"]}
    tab = Page(browser, server)
    if case == "wrong-type filter":
        tab.open("/?q=tumor&f=" + quote(json.dumps({"grade": None})))
    elif case == "not an image":
        tab.open("/")
        fake = tmp_path / "scan.png"
        fake.write_text("this is a text file, not a picture")
        tab.page.set_input_files("#file", str(fake))
    else:
        tab.open("/?like=00000000-0000-0000-0000-000000000000")
    banner = tab.page.locator("#banner")
    banner.wait_for(state="visible", timeout=WAIT)
    text = banner.inner_text()
    _plain_words(text, fields)
    assert "What to do:" in text
    tab.wait("() => document.body.dataset.busy === 'no'")
    assert tab.page.locator(".card").count() == 0 and tab.page.locator("#pager").is_hidden()  # no stale results
    tab.shot(shots, f"12-error-{case.replace(' ', '-')}")
    tab.close()


def test_a_hits_viewer_url_opens_its_slide_centred_on_the_tile(browser, server):
    hit = api_hits(server, "/v1/search/text", {"query": "mucosa", "top_k": 1})[0]
    tab = Page(browser, server).open(hit["viewer_url"])
    tab.wait("() => window.conchdb.tilesLoaded > 0 && document.getElementById('tile-outline')")
    assert hit["slide_id"] in tab.page.locator("#viewer-title").inner_text()
    assert tab.page.locator("#tile-outline").get_attribute("data-id") == hit["id"]
    tab.close()


def test_the_page_says_clearly_when_the_server_refuses(browser, server):
    page = browser.new_page()
    page.on("dialog", lambda d: d.accept("not-the-key"))
    page.goto(server.url + "/")
    page.wait_for_selector("#banner:not([hidden])", timeout=WAIT)
    text = page.locator("#banner").inner_text()
    assert "(401)" in text and "API key" in text
    page.close()
