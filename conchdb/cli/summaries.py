"""Summaries printed by the commands: what a slide's tiling, an ingest run and a store look like."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conchdb.cli.app import out_console


def print_ingest_summary(doc: dict[str, Any]) -> None:
    lines = [
        ("store", f"{doc['store']}  (collection {doc['collection']})"),
        ("slides", f"{doc['slides']}: {doc['ingested']} ingested, {doc['skipped']} already done, "
                   f"{doc['no_tissue']} without tissue, {len(doc['failed'])} failed"),
        ("not slides", f"{doc['not_slides']} file(s) skipped"),
        ("tiles", f"{doc['tiles_written']} written in {doc['seconds']:.1f} s ({doc['tiles_per_s']:.2f} tiles/s)"),
    ]
    if doc["manifest"]:
        lines.append(("manifest", f"{doc['manifest']}: {len(doc['manifest_rows_unmatched'])} row(s) naming no "
                                  f"slide, {len(doc['slides_without_manifest_row'])} slide(s) without a row"))
    lines += archive_lines(doc)
    for name, value in lines:
        out_console.print(f"{name:<11} {value}", highlight=False, soft_wrap=True)
    for row in doc["manifest_rows_unmatched"]:
        out_console.print(f"[yellow]manifest row names no slide:[/] {row}", highlight=False, soft_wrap=True)
    for failure in doc["failed"]:
        out_console.print(f"[red]failed[/] {failure['error']}", highlight=False, soft_wrap=True)
    for resent in doc.get("resent", []):
        out_console.print(f"[yellow]re-sent[/] {resent['slide']}: {resent['reason']}", highlight=False,
                          soft_wrap=True)
    for item in doc.get("passed_over", []):
        out_console.print(f"[yellow]passed over[/] {item['series']}: {item['reason']}", highlight=False,
                          soft_wrap=True)



def archive_lines(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """What a rerun changed in place: relabelled and moved slides, and stored slides whose file is gone."""
    lines = []
    if doc.get("relabelled"):
        lines.append(("relabelled", f"{len(doc['relabelled'])} slide(s) got their manifest's new values "
                                    "(no tile embedded again): " + ", ".join(doc["relabelled"])))
    if doc.get("moved"):
        moves = ", ".join(m["to"] if m["from"] == m["to"] else f"{m['from']} -> {m['to']}" for m in doc["moved"])
        lines.append(("moved", f"{len(doc['moved'])} slide(s) found at a new path (not embedded again): {moves}"))
    if doc.get("missing"):
        lines.append(("missing", f"{len(doc['missing'])} stored slide(s) whose file is gone, kept in the store "
                                 "(`conchdb remove --missing` removes them): "
                                 + ", ".join(f"{m['slide_id']} (last at {m['path']})" for m in doc["missing"])))
    return lines


def print_tiling(
    info: dict[str, Any], grid: Any, source: str, dimensions: str, levels: Sequence[str], min_tissue: float
) -> None:
    """`conchdb tiles`: the slide, its pixel size and its source, the tile geometry and count."""
    mpp = "unknown" if info["mpp"] is None else f"{info['mpp']:.4g} µm/px"
    read_px = f"{grid.read_size} px read" + ("" if grid.read_size == grid.tile_px else f", resized to {grid.tile_px}")
    lines = [
        ("slide", source),
        ("dimensions", dimensions),
        ("levels", f"{len(levels)}: " + ", ".join(levels)),
        ("pixel size", f"{mpp}  (source: {info['mpp_source']})"),
        ("tile", f"{grid.tile_px} px at {grid.target_mpp:g} µm/px = {grid.tile_size_level0} level-0 px, "
                 f"stride {grid.stride_level0}"),
        ("read level", f"{grid.read_level} ({read_px})"),
        ("tiles", f"{len(grid.tiles)} with tissue ≥ {min_tissue:g}"),
    ]
    for name, value in lines:
        out_console.print(f"{name:<11} {value}", highlight=False, soft_wrap=True)



def print_stats(doc: dict[str, Any]) -> None:
    """`conchdb stats`: the store, then each collection's points, model, tiling and slides."""
    size = doc["size_on_disk_bytes"]
    out_console.print(f"store       {doc['location']}" + ("" if size is None else f"  ({size / 1e6:.1f} MB on disk)"),
                      highlight=False)
    if not doc["collections"]:
        out_console.print("no collections yet: run `conchdb ingest FOLDER`")
    for col in doc["collections"]:
        meta = col["metadata"]
        out_console.print(f"\n[bold]{col['name']}[/]  {col['points']} points", highlight=False)
        if meta.get("model_fingerprint"):
            out_console.print(f"  model      {meta.get('model')} (fingerprint {meta['model_fingerprint']})",
                              highlight=False)
        if meta.get("tiling"):
            t = meta["tiling"]
            out_console.print(f"  tiling     {t.get('tile_px')} px at {t.get('target_mpp')} µm/px, "
                              f"min tissue {t.get('min_tissue')}", highlight=False)
        if col.get("slides_by_status"):
            counts = ", ".join(f"{n} {status}" for status, n in sorted(col["slides_by_status"].items()))
            out_console.print(f"  slides     {counts}", highlight=False)
        if col.get("slides_missing"):
            out_console.print(f"  [red]missing[/]    {col['slides_missing']} slide(s) whose file is gone "
                              "(`conchdb slides --status missing` lists them)", highlight=False)



def print_import_summary(doc: dict[str, Any]) -> None:
    """What `conchdb import-features` did, with the slides imported without their slide file."""
    lines = [
        ("store", f"{doc['store']}  (collection {doc['collection']})"),
        ("files", f"{doc['feature_files']} {doc['source']} file(s): {doc['ingested']} imported, "
                  f"{doc['skipped']} already done, {doc['no_tissue']} without patches, {len(doc['failed'])} refused"),
        ("tiles", f"{doc['tiles_written']} written in {doc['seconds']:.1f} s"),
    ]
    if doc["not_feature_files"]:
        lines.append(("other", f"{doc['not_feature_files']} file(s) passed over"))
    if doc["manifest"]:
        lines.append(("manifest", f"{doc['manifest']}: {len(doc['manifest_rows_unmatched'])} row(s) naming no "
                                  f"slide, {len(doc['slides_without_manifest_row'])} slide(s) without a row"))
    missing = doc["slides_without_slide_file"]
    if missing:
        lines.append(("no slide", f"{len(missing)} slide(s) without their slide file: stored with the level-0 "
                                  "patch size and magnification of the file, pixel size unknown, no tile images "
                                  "or heatmaps (import again with --slides): " + ", ".join(missing)))
    lines += archive_lines(doc)
    for name, value in lines:
        out_console.print(f"{name:<9} {value}", highlight=False, soft_wrap=True)
    for failure in doc["failed"]:
        out_console.print(f"[red]refused[/] {failure['error']}", highlight=False, soft_wrap=True)
