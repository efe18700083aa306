"""Steering on the web page, in Chromium: thumbs up and down re-rank at once, a concept's slider
changes the results, weak hits are dimmed with a line saying why. Screenshots of each state are
kept beside the page tests' (`$CONCHDB_TEST_ARTIFACTS/page/steer-*.png`)."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import KEY
from tests.api.test_page import Page, browser, gate, server, shots  # noqa: F401 - fixtures

QUERY = "adenocarcinoma"


def api(server, path: str, body: dict) -> dict:  # noqa: F811
    answer = httpx.post(f"{server.url}{path}", json=body, headers={"X-API-Key": KEY}, trust_env=False)
    assert answer.status_code == 200, answer.text
    return answer.json()


def ids(hits: list[dict]) -> list[str]:
    return [h["id"] for h in hits]


def settled(tab: Page, url_part: str) -> None:
    """Until the URL holds `url_part` and the search it names is shown with its images."""
    tab.wait(f"() => decodeURIComponent(location.search).includes({url_part!r})")
    tab.wait_cards(24)


def test_thumbs_up_and_down_rank_again_at_once(browser, server, shots):  # noqa: F811
    tab = Page(browser, server).open(f"/?q={QUERY}")
    tab.wait_cards(24)
    first = tab.ids()
    assert tab.page.locator(".card .thumb.up").count() == 24
    liked = first[5]
    tab.page.locator(f".card[data-id='{liked}'] .thumb.up").click()
    settled(tab, f"up={liked}")
    want = ids(api(server, "/v1/search/refine", {"query": QUERY, "top_k": 24, "like": [liked]})["hits"])
    assert tab.ids() == want and want != first and liked not in want
    assert tab.page.locator("#steer-marks .chip.mark.up").count() == 1
    disliked = tab.ids()[0]
    tab.page.locator(f".card[data-id='{disliked}'] .thumb.down").click()
    settled(tab, f"down={disliked}")
    body = {"query": QUERY, "top_k": 24, "like": [liked], "unlike": [disliked]}
    assert tab.ids() == ids(api(server, "/v1/search/refine", body)["hits"])
    tab.shot(shots, "steer-01-thumbs")
    tab.page.locator("#steer-marks .chip.mark.up .chip-remove").click()  # unmark: refined by the ✗ alone
    tab.wait("() => !location.search.includes('up=') && location.search.includes('down=')")
    tab.wait_cards(24)
    assert tab.ids() == ids(api(server, "/v1/search/refine", {"query": QUERY, "top_k": 24,
                                                             "unlike": [disliked]})["hits"])
    tab.search("mucosa")  # a new query starts unsteered
    tab.wait("() => document.getElementById('summary').textContent.includes('mucosa')")
    tab.wait_cards(24)
    assert "down=" not in tab.page.url and tab.page.locator("#steer-marks .chip").count() == 0
    tab.close()


def test_a_concept_and_its_slider_change_the_results(browser, server, shots):  # noqa: F811
    tab = Page(browser, server).open(f"/?q={QUERY}")
    tab.wait_cards(24)
    plain = tab.ids()
    tab.page.select_option("#concept-kind", "more")
    tab.page.fill("#concept-text", "necrosis")
    tab.page.click("#concept-add")
    settled(tab, "more=necrosis:0.5")
    half = ids(api(server, "/v1/search/text", {"query": QUERY, "top_k": 24,
                                               "more": [{"text": "necrosis", "weight": 0.5}]})["hits"])
    assert tab.ids() == half and half != plain
    slider = tab.page.locator("#steer-concepts .chip.more input[type=range]")
    slider.fill("2")  # moving the slider to 2 and letting go
    settled(tab, "more=necrosis:2")
    strong = ids(api(server, "/v1/search/text", {"query": QUERY, "top_k": 24,
                                                 "more": [{"text": "necrosis", "weight": 2}]})["hits"])
    assert tab.ids() == strong and strong != half
    assert tab.page.locator("#steer-concepts .chip.more output").inner_text() == "2.0"
    tab.shot(shots, "steer-02-concept-slider")
    tab.page.locator("#steer-concepts .chip.more .chip-remove").click()
    tab.wait("() => !location.search.includes('more=')")
    tab.wait_cards(24)
    assert tab.ids() == plain
    tab.close()


def test_weak_hits_are_dimmed_with_a_line_saying_why(browser, server, searcher, shots):  # noqa: F811
    store = searcher.store
    point = sorted(store.scroll("conch_tiles"), key=lambda h: h.id)[7].id
    # "More like this" tile: an image query, held to the floor recorded at ingest.
    hits = api(server, "/v1/search/image", {"point_id": point, "top_k": 25})["hits"]
    shown = [h for h in hits if h["id"] != point][:24]
    before = store.collection_metadata("conch_tiles")["noise_floor"]
    floor = (shown[11]["score"] + shown[12]["score"]) / 2  # the first 12 above it, the rest below
    store.update_metadata("conch_tiles", noise_floor={**before, "value": floor})
    try:
        tab = Page(browser, server).open(f"/?like={point}")
        tab.wait_cards(24)
        assert tab.ids() == ids(shown)
        weak = tab.page.eval_on_selector_all(".card", "cs => cs.map(c => c.classList.contains('weak'))")
        assert weak == [h["score"] < floor for h in shown] and sum(weak) == 12
        note = tab.page.locator(".card.weak .weak-note").first.inner_text()
        assert "noise floor" in note and "unrelated tissue" in note and f"{floor:.3f}" in note
        assert tab.page.locator(".card:not(.weak) .weak-note").count() == 0
        assert "weak matches" in tab.page.locator("#weak-summary").inner_text()
        assert tab.axe() == []  # dimmed, still readable
        tab.page.locator(".card.weak").first.scroll_into_view_if_needed()
        tab.shot(shots, "steer-03-weak-hits")
        tab.close()
    finally:
        store.update_metadata("conch_tiles", noise_floor=before)


@pytest.fixture(autouse=True)
def _no_gate(gate):  # noqa: F811
    gate.open()
