"""`search --slide ... --export DIR`: a gallery of each result slide's best-matching tile pairs.

For every result slide, its best `pairs` matches are shown as the query tile beside the
stored tile it matched, with the cosine, so a user sees *why* a slide ranked where it did.
Pixels are cut from the slide files as ingest cut them (conchdb.search.regions); a pair
whose slide cannot be read shows the reason instead. One static `index.html`, images
beside it, no script.
"""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conchdb.errors import ConchdbError, SlideError
from conchdb.search.regions import open_source, read_hit_tile
from conchdb.search.slide_search import SlideMatch, SlideQuery
from conchdb.store import Store

PAIRS = 3
JPEG_QUALITY = 90
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class SlideGallery:
    """What `export_slide_matches` wrote, and the tiles it could not cut (with why)."""

    folder: Path
    index: Path
    images: int = 0
    failures: list[str] = field(default_factory=list)


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_")[-50:] or "slide"


class _Cutter:
    """Opens each source slide once and cuts tiles from it; failures become messages."""

    def __init__(self, stack: contextlib.ExitStack):
        self._stack = stack
        self._open: dict[tuple[str, Any], Any] = {}

    def cut(self, payload: Mapping[str, Any], out: Path) -> str | None:
        key = (str(payload.get("path")), payload.get("mpp"))
        if key not in self._open:
            try:
                self._open[key] = self._stack.enter_context(open_source(payload))
            except SlideError as exc:
                self._open[key] = exc.message
        slide = self._open[key]
        if isinstance(slide, str):
            return slide
        try:
            read_hit_tile(slide, payload).save(out, "JPEG", quality=JPEG_QUALITY)
        except (SlideError, KeyError, ValueError, TypeError, OSError) as exc:
            return exc.message if isinstance(exc, SlideError) else f"cannot cut the tile: {exc}"
        return None


def export_slide_matches(
    store: Store, collection: str, query: SlideQuery, matches: Sequence[SlideMatch], folder: str | Path,
    pairs: int = PAIRS,
) -> SlideGallery:
    """Write the query/match tile pairs of every result and `index.html` into `folder`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = f"cannot create the export folder {folder}: {exc}"
        raise ConchdbError(problem, fix="choose a writable folder", parameter="export") from None
    gallery = SlideGallery(folder, folder / "index.html")
    shown = [(m, p) for m in matches for p in m.matched_tiles[:pairs]]
    payloads = {h.id: h.payload for h in store.retrieve(collection, [p.id for _, p in shown])}
    sections: dict[int, list[str]] = {}
    with contextlib.ExitStack() as stack:
        cutter = _Cutter(stack)
        for n, (match, pair) in enumerate(shown):
            names = (f"{match.rank:03d}_{n:04d}_query.jpg", f"{match.rank:03d}_{n:04d}_{_safe(match.slide_id)}.jpg")
            query_payload = {**query.payload, "x": pair.query.x, "y": pair.query.y,
                             "size": pair.query.size or query.payload.get("size")}
            cells = []
            for name, payload, what in ((names[0], query_payload, "query"),
                                        (names[1], payloads.get(pair.id, {}), match.slide_id)):
                error = cutter.cut(payload, folder / name)
                if error is None:
                    gallery.images += 1
                    cells.append(f'<img src="{html.escape(name)}" alt="{html.escape(str(what))}">')
                else:
                    gallery.failures.append(f"{what} tile at ({payload.get('x')}, {payload.get('y')}): {error}")
                    cells.append(f'<div class="missing">{html.escape(error)}</div>')
            caption = (f"query ({pair.query.x}, {pair.query.y}) ↔ ({pair.x}, {pair.y}), "
                       f"cosine {pair.score:.4f}")
            sections.setdefault(match.rank, []).append(
                f'<figure>{"".join(cells)}<figcaption>{html.escape(caption)}</figcaption></figure>'
            )
    gallery.index.write_text(_page(query, matches, sections), encoding="utf-8")
    return gallery


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h2{font-size:1.05em;margin-top:1.6em} .meta{color:#666;font-size:.9em}
figure{display:inline-block;margin:0 12px 12px 0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
figure img,.missing{width:200px;height:200px;object-fit:contain;display:inline-block;background:#eee;margin-right:4px}
.missing{background:#f3e0e0;color:#922;font-size:.8em;padding:6px;box-sizing:border-box;vertical-align:top}
figcaption{font-size:.85em;margin-top:4px}
"""


def _page(query: SlideQuery, matches: Sequence[SlideMatch], sections: dict[int, list[str]]) -> str:
    parts = []
    for m in matches:
        fields = ", ".join(f"{k}={v}" for k, v in sorted(m.payload.items()) if k not in ("path", "ingest_run"))
        parts.append(
            f"<h2>#{m.rank} {html.escape(m.slide_id)} — score {m.score:.4f}</h2>"
            f'<p class="meta">{html.escape(fields)}</p>' + "".join(sections.get(m.rank, []))
        )
    title = f"slides like {query.source}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>conchdb: {html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="meta">{len(query.tiles)} mosaic tiles; each result shows its best-matching pairs</p>'
        + "\n".join(parts) + "</body></html>\n"
    )
