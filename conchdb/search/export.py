"""`--export DIR`: each hit as a JPEG cut from its slide, and an `index.html` gallery.

The JPEG holds what was embedded: the tile's `size` level-0 square read at the tile's
own resolution and resized to `tile_px`. The gallery is one static HTML file with the
images beside it (relative links, inline style, no script), so it opens from disk in any
browser and can be zipped and sent to a colleague. A hit whose slide cannot be read (moved,
deleted) is shown in the gallery with the reason instead of failing the whole export.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conchdb.errors import ConchdbError, SlideError
from conchdb.search.regions import open_source, read_hit_tile
from conchdb.search.searcher import SearchHit
from conchdb.slides import Slide

JPEG_QUALITY = 90
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ExportedTile:
    """One tile of the gallery: its label ("3" or, grouped, "3.2"), the hit, and its file or error."""

    label: str
    hit: SearchHit
    file: str | None = None
    error: str | None = None


@dataclass
class Export:
    """What `export_hits` wrote."""

    folder: Path
    index: Path
    tiles: list[ExportedTile] = field(default_factory=list)

    @property
    def failures(self) -> list[ExportedTile]:
        return [t for t in self.tiles if t.error]


def file_name(label: str, hit: SearchHit) -> str:
    """A readable, unique, file-system-safe name: rank, slide and position."""
    slide = _UNSAFE.sub("_", str(hit.slide_id or "tile")).strip("_")[-60:] or "tile"
    return f"{label.replace('.', '-').zfill(4)}_{slide}_{hit.x}_{hit.y}.jpg"


def _labelled(hits: Sequence[SearchHit]) -> list[tuple[str, SearchHit]]:
    out = []
    for hit in hits:
        if hit.tiles is None:
            out.append((str(hit.rank), hit))
        else:
            out += [(f"{hit.rank}.{tile.rank}", tile) for tile in hit.tiles]
    return out


def export_hits(hits: Sequence[SearchHit], folder: str | Path, title: str) -> Export:
    """Write a JPEG per hit (every tile of each group when grouped) and `index.html` into `folder`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = f"cannot create the export folder {folder}: {exc}"
        raise ConchdbError(problem, fix="choose a writable folder", parameter="folder") from None
    result = Export(folder, folder / "index.html")
    slides: dict[tuple[str, object], Slide | str] = {}
    with contextlib.ExitStack() as stack:
        for label, hit in _labelled(hits):
            tile = ExportedTile(label, hit)
            result.tiles.append(tile)
            key = (str(hit.payload.get("path")), hit.payload.get("mpp"))
            if key not in slides:
                try:
                    slides[key] = stack.enter_context(open_source(hit.payload))
                except SlideError as exc:
                    slides[key] = exc.message
            slide = slides[key]
            if isinstance(slide, str):
                tile.error = slide
                continue
            try:
                image = read_hit_tile(slide, hit.payload)
                name = file_name(label, hit)
                image.save(folder / name, "JPEG", quality=JPEG_QUALITY)
                tile.file = name
            except (SlideError, KeyError, ValueError, OSError) as exc:
                tile.error = exc.message if isinstance(exc, SlideError) else f"cannot cut the tile: {exc}"
    result.index.write_text(gallery_html(title, result.tiles), encoding="utf-8")
    return result


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em} .meta{color:#666;font-size:.9em}
.grid{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;width:272px}
figure img{width:256px;height:256px;object-fit:contain;display:block;background:#eee}
.missing{width:256px;height:256px;background:#f3e0e0;color:#922;font-size:.85em;padding:6px;box-sizing:border-box}
figcaption{font-size:.85em;margin-top:6px} .score{font-weight:600}
table{border-collapse:collapse;font-size:.78em;margin-top:4px;width:100%}
td{border-top:1px solid #eee;padding:1px 3px;vertical-align:top;word-break:break-all}
td:first-child{color:#666;width:35%}
"""


def _cell(value: object) -> str:
    return html.escape(value if isinstance(value, str) else json.dumps(value))


def _figure(tile: ExportedTile) -> str:
    hit = tile.hit
    if tile.file:
        picture = f'<a href="{html.escape(tile.file)}"><img src="{html.escape(tile.file)}" alt="hit {tile.label}"></a>'
    else:
        picture = f'<div class="missing">no image: {html.escape(tile.error or "")}</div>'
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_cell(v)}</td></tr>" for k, v in sorted(hit.payload.items()))
    return (
        f"<figure>{picture}<figcaption>"
        f'<div><b>#{html.escape(tile.label)}</b> <span class="score">score {hit.score:.4f}</span></div>'
        f"<div>{html.escape(str(hit.slide_id))} @ ({hit.x}, {hit.y}), {hit.size} px</div>"
        f"<table>{rows}</table></figcaption></figure>"
    )


def gallery_html(title: str, tiles: Sequence[ExportedTile]) -> str:
    """The gallery page: a header with the query, then one card per tile."""
    written = sum(1 for t in tiles if t.file)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    cards = "\n".join(_figure(t) for t in tiles)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>conchdb: {html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="meta">{len(tiles)} hits, {written} images; exported by conchdb on {stamp}</p>'
        f'<div class="grid">\n{cards}\n</div></body></html>\n'
    )
