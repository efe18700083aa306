"""Keys, binds, ids that look like paths, and bounded requests: what a server must refuse, and how."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conchdb.api import is_loopback
from conchdb.cli import app as cli_app
from tests.api.conftest import KEY, make_client

runner = CliRunner()
PATH_IDS = [
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "%252E%252E%252F%252E%252E%252Fetc%252Fpasswd",
    "%2Fetc%2Fpasswd",
    "..%5C..%5Cetc%5Cpasswd",
]


def is_error(response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "field", "fix"} and body["error"]
    assert "Traceback" not in response.text and "--" not in (body["fix"] or "")
    if field is not None:
        assert body["field"] == field
    return body


# -- keys --------------------------------------------------------------------------------------


def test_no_key_and_a_wrong_key_get_401_and_health_stays_open(keyed):
    for url in ("/v1/stats", "/v1/slides", "/v1/schema"):
        is_error(keyed.get(url), 401, "authorization")
        is_error(keyed.get(url, headers={"X-API-Key": "wrong"}), 401)
        is_error(keyed.get(url, headers={"Authorization": "Bearer wrong"}), 401)
    refused = keyed.post("/v1/search/text", json={"query": "tumor"})
    is_error(refused, 401)
    assert refused.headers["www-authenticate"] == "Bearer"
    is_error(keyed.get("/v1/tiles/6b1e0000-0000-0000-0000-000000000000.jpg"), 401)
    assert keyed.get("/v1/health").status_code == 200
    assert keyed.get("/").status_code == 200  # the page holds no data; it asks for the key


def test_the_key_as_bearer_or_header_is_accepted(keyed):
    assert keyed.get("/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert keyed.get("/v1/stats", headers={"X-API-Key": KEY}).status_code == 200
    ok = keyed.post("/v1/search/text", json={"query": "tumor", "top_k": 2}, headers={"X-API-Key": KEY})
    assert ok.status_code == 200 and len(ok.json()["hits"]) == 2


def test_serving_beyond_loopback_without_a_key_is_refused(monkeypatch):
    monkeypatch.delenv("CONCHDB_API_KEY", raising=False)
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        result = runner.invoke(cli_app, ["serve", "--host", host])
        assert result.exit_code == 2, result.output
        assert "without an API key" in result.output and "--api-key" in result.output
        assert "Traceback" not in result.output
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.org")


def test_an_embedded_store_held_by_another_user_gives_the_locks_message(store, monkeypatch):
    monkeypatch.delenv("CONCHDB_API_KEY", raising=False)
    result = runner.invoke(cli_app, ["serve", "--store", str(store.path)])  # `store` holds the lock
    assert result.exit_code == 2, result.output
    assert "is in use by" in result.output and "Qdrant server" in result.output


# -- ids that look like paths ------------------------------------------------------------------


@pytest.fixture
def opened_paths(monkeypatch) -> list[str]:
    """Every file a request asks a slide reader to open."""
    import openslide

    from conchdb.search import regions

    seen: list[str] = []
    real_open_slide, real_openslide = regions.open_slide, openslide.open_slide

    def spy(path, *args, **kwargs):
        seen.append(str(path))
        return real_open_slide(path, *args, **kwargs)

    def spy_openslide(path):
        seen.append(str(path))
        return real_openslide(path)

    monkeypatch.setattr(regions, "open_slide", spy)
    monkeypatch.setattr(openslide, "open_slide", spy_openslide)
    return seen


@pytest.mark.parametrize("slide_id", PATH_IDS)
def test_a_path_like_id_gets_404_and_reads_nothing(searcher, ingested, opened_paths, slide_id):
    with make_client(searcher) as client:
        urls = [
            f"/v1/slides/{slide_id}", f"/v1/slides/{slide_id}/thumbnail.jpg", f"/v1/slides/{slide_id}.dzi",
            f"/v1/slides/{slide_id}_files/0/0_0.jpeg", f"/v1/slides/{slide_id}/heatmap.png?query=tumor",
            f"/v1/tiles/{slide_id}.jpg",
        ]
        for url in urls:
            response = client.get(url)
            is_error(response, 404)
            assert "root:" not in response.text
        is_error(client.post("/v1/search/image", json={"slide_id": slide_id.replace("%2F", "/"), "x": 0, "y": 0,
                                                        "w": 8, "h": 8}), 404, "slide_id")
        is_error(client.post("/v1/search/image", json={"point_id": slide_id}), 404, "point_id")
    cohort = str(ingested.cohort.resolve())
    assert all(str(Path(p).resolve()).startswith(cohort) for p in opened_paths)


# -- bounded requests --------------------------------------------------------------------------


def upload(client, data: bytes, name: str = "q.png", kind: str = "image/png", **headers):
    return client.post("/v1/search/image", files={"image": (name, data, kind)}, headers={"X-API-Key": KEY, **headers})


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` × `height` pixels in a few bytes (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_non_image_upload_is_415(keyed):
    body = is_error(upload(keyed, b"%PDF-1.4 not an image at all", "report.pdf", "application/pdf"), 415, "image")
    assert "PNG, JPEG or TIFF" in body["fix"]
    is_error(upload(keyed, b""), 415, "image")
    is_error(upload(keyed, png_header_only(64, 64)[:40]), 415, "image")  # truncated
    is_error(keyed.post("/v1/search/image", content=b"x", headers={"X-API-Key": KEY, "Content-Type": "text/plain"}),
             415)


def test_an_oversized_upload_is_413_with_or_without_a_length(keyed):
    big = b"\x89PNG" + b"\0" * 300_000  # the keyed app takes 200 kB
    is_error(upload(keyed, big), 413, "image")

    def chunks():
        for _ in range(40):
            yield b"\0" * 10_000

    streamed = keyed.post("/v1/search/image", content=chunks(),
                          headers={"X-API-Key": KEY, "Content-Type": "multipart/form-data; boundary=x"})
    is_error(streamed, 413)


def test_a_decompression_bomb_is_refused_before_decoding(keyed, client):
    is_error(upload(keyed, png_header_only(100_000, 100_000)), 413, "image")
    is_error(upload(client, png_header_only(30_000, 30_000)), 413, "image")  # above Pillow's own limit too
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buffer, "PNG")  # 4 MP in a few kB; the keyed app takes 1 MP
    assert len(buffer.getvalue()) < 50_000
    body = is_error(upload(keyed, buffer.getvalue()), 413, "image")
    assert "2000×2000" in body["error"]


def test_bounds_and_malformed_requests_are_422_naming_the_field(client):
    is_error(client.post("/v1/search/text", json={"query": "tumor", "top_k": 100000}), 422, "top_k")
    is_error(client.post("/v1/search/text", json={"query": "tumor", "top_k": 0}), 422, "top_k")
    is_error(client.post("/v1/search/text", json={"query": "tumor", "top_k": 1000, "page": 11}), 422, "page")
    is_error(client.post("/v1/search/text", json={"query": "x" * 1001}), 422, "query")
    is_error(client.post("/v1/search/text", json={"query": "   "}), 422, "query")
    is_error(client.post("/v1/search/text", json={"query": "t", "bogus": 1}), 422, "bogus")
    is_error(client.post("/v1/search/text", json={"query": "t", "min_score": 3}), 422, "min_score")
    is_error(client.post("/v1/search/text", json={"query": "t", "group_by": "nope"}), 422, "group_by")
    is_error(client.post("/v1/search/text", content=b"{not json", headers={"Content-Type": "application/json"}), 422)
    malformed = {
        "grade": {"gte": "two"}, "site": {"gt": "a"}, "nope": 1, "diagnosis": {"in": []}, "age": {"between": 3},
        "consented": {"eq": [1]},
    }
    for field, rule in malformed.items():
        body = is_error(client.post("/v1/search/text", json={"query": "t", "filters": {field: rule}}), 422,
                        f"filters.{field}")
        assert field in body["error"]
    many = {"filters": {"grade": {"in": [1]}, **{f"x{i}": 1 for i in range(40)}}}
    is_error(client.post("/v1/search/text", json={"query": "t", **many}), 422)
    is_error(client.post("/v1/classify", json={"point_id": "6b1e0000-0000-0000-0000-000000000000",
                                               "labels": ["a"] * 65}), 422, "labels")
    is_error(client.post("/v1/search/image", json={"point_id": "x", "slide_id": "y"}), 422, "image")
    is_error(client.post("/v1/search/image", json={"slide_id": "case_a/s1.png", "x": 300, "y": 0, "w": 200,
                                                   "h": 10}), 422, "x")
    is_error(client.post("/v1/search/image", files={"nope": ("a", b"b")}), 422, "image")
    is_error(client.get("/v1/no/such/endpoint"), 404)
    is_error(client.delete("/v1/stats"), 405)


def test_cors_is_off_unless_origins_are_configured(searcher, client):
    preflight = {"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/search/text", headers=preflight).headers
    with make_client(searcher, cors_origins=("https://viewer.example.org",)) as allowed:
        answer = allowed.options("/v1/search/text", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == "https://viewer.example.org"
