"""Rich tables for search results, so the commands only parse and print.

A hits table shows rank, score, slide and position, then the payload fields the filters
tested and the cohort's own metadata (manifest columns), which are what a user filters on
next; conchdb's bookkeeping fields (path, pixel sizes, run ids) are left to `--json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from conchdb.catalog import TILE_FIELDS
from conchdb.search.searcher import SearchHit, TextMatch
from conchdb.search.slide_search import SlideMatch
from conchdb.search.zeroshot import ClassScores, PooledScores

MAX_EXTRA_COLUMNS = 5


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def hit_columns(hits: Sequence[SearchHit], filter_fields: Sequence[str]) -> list[str]:
    """The payload columns to show: the filtered fields, then metadata columns, at most a few."""
    columns = [f for f in filter_fields if f not in ("slide_id", "x", "y")]
    for hit in hits:
        for key in hit.payload:
            if key not in TILE_FIELDS and key not in columns:
                columns.append(key)
    return columns[: max(MAX_EXTRA_COLUMNS, len(filter_fields))]


def hits_table(hits: Sequence[SearchHit], filter_fields: Sequence[str] = (), title: str | None = None, *,
               noise_floor: float | None = None) -> Table:
    """Rank, score, slide, x, y and the chosen payload columns; grouped hits add a tiles column.
    Weak hits (below the collection's noise floor) are dimmed, their score marked, and a
    caption says why."""
    grouped = any(h.tiles is not None for h in hits)
    columns = hit_columns(hits, filter_fields)
    weak = sum(bool(h.weak) for h in hits)
    caption = None
    if weak and noise_floor is not None:
        caption = (f"weak: {weak} hit(s) score below {noise_floor:.4f}, the collection's noise floor (how close "
                   "tiles of unrelated slides are): no closer to the query than unrelated tissue")
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("slide", overflow="fold", min_width=12)
    table.add_column("x", justify="right", no_wrap=True)
    table.add_column("y", justify="right", no_wrap=True)
    if grouped:
        table.add_column("tiles (score @ x,y)", overflow="fold")
    for name in columns:
        table.add_column(name, overflow="fold")
    for hit in hits:
        score = f"{hit.score:.4f} weak" if hit.weak else f"{hit.score:.4f}"
        row = [str(hit.rank), score, _fmt(hit.slide_id), _fmt(hit.x), _fmt(hit.y)]
        if grouped:
            row.append("  ".join(f"{t.score:.3f}@{t.x},{t.y}" for t in hit.flat()))
        row += [_fmt(hit.payload.get(name)) for name in columns]
        table.add_row(*row, style="dim" if hit.weak else None)
    return table


def slide_matches_table(matches: Sequence[SlideMatch], title: str | None = None) -> Table:
    """Rank, score, slide, its best tile pair (query x,y -> match x,y) and the slide's metadata columns."""
    columns = [k for k in dict.fromkeys(k for m in matches for k in m.payload) if k not in TILE_FIELDS]
    table = Table(title=title, title_justify="left")
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("slide", overflow="fold", min_width=12)
    table.add_column("best pair", overflow="fold")
    for name in columns[:MAX_EXTRA_COLUMNS]:
        table.add_column(name, overflow="fold")
    for m in matches:
        best = m.matched_tiles[0] if m.matched_tiles else None
        pair = f"{best.score:.3f} ({best.query.x},{best.query.y})→({best.x},{best.y})" if best else ""
        extra = [_fmt(m.payload.get(name)) for name in columns[:MAX_EXTRA_COLUMNS]]
        table.add_row(str(m.rank), f"{m.score:.4f}", str(m.slide_id), pair, *extra)
    return table


def texts_table(matches: Sequence[TextMatch], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in (("rank", "right"), ("score", "right"), ("text", "left"), ("from", "left")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for m in matches:
        where = m.metadata.get("kind") if m.source == "vocabulary" else m.metadata.get("source")
        table.add_row(str(m.rank), f"{m.score:.4f}", m.text, f"{m.source}" + (f" ({where})" if where else ""))
    return table


def classes_table(scores: ClassScores, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    table.add_column("probability", justify="right")
    table.add_column("logit", justify="right")
    for label, probability, logit in scores.ranked():
        table.add_row(label, f"{probability:.4f}", f"{logit:.3f}")
    return table


def mi_zero_table(results: Sequence[PooledScores], title: str | None = None) -> Table:
    """One row per class, one probability column per k, and the prediction for each k."""
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    for r in results:
        label = f"top-{r.k}" + (f" ({r.k_used})" if r.k_used != r.k else "")
        table.add_column(label, justify="right")
    for i, label in enumerate(results[0].scores.labels):
        table.add_row(label, *(f"{r.scores.probabilities[i]:.4f}" for r in results))
    table.add_row("[bold]prediction[/]", *(f"[bold]{r.scores.prediction}[/]" for r in results))
    return table


def print_slides(rows: Sequence[dict[str, Any]]) -> None:
    """`conchdb slides`: one row per stored slide copy, a missing file in red."""
    from conchdb.cli.app import out_console

    if not rows:
        out_console.print("no stored slides match")
        return
    labels = list(dict.fromkeys(k for r in rows for k in r["labels"]))[:MAX_EXTRA_COLUMNS]
    table = Table("slide", "status", "tiles", "file", "µm/px", *labels, "path")
    for r in rows:
        file = {"present": "there", "missing": "[red]missing[/]", "none": "none"}[r["file"]]
        mpp = "" if r["mpp"] is None else f"{_fmt(r['mpp'])} ({r['mpp_source']})"
        table.add_row(str(r["slide_id"]), str(r["status"]), _fmt(r["tiles"]), file, mpp,
                      *(_fmt(r["labels"].get(k)) for k in labels), _fmt(r["path"]))
    out_console.print(table)
