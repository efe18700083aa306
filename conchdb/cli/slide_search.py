"""`conchdb mosaic`, `conchdb evaluate retrieval|zeroshot`, and the body of
`conchdb search --slide / --slide-file` (which `search.py` hands over to).

Thin like the other commands: parse, call `conchdb.search` / `conchdb.archive.marks`, render.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from conchdb.cli.app import Options, app, err_console, handles_errors, out_console, print_json, uses_options
from conchdb.cli.search import CandidatesOpt, JsonOpt, WhereOpt
from conchdb.errors import ConchdbError, QueryError

evaluate_app = typer.Typer(help="How well CONCH works on a labelled cohort, from stored vectors.",
                           no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")


def search_slides_command(
    options: Options,
    *,
    slide: str | None,
    slide_file: Path | None,
    slide_mpp: float | None,
    other_queries: int,
    where: list[str],
    top_k: int,
    exclude_same: list[str],
    candidates: int | None,
    as_json: bool,
    export: Path | None,
) -> None:
    """`conchdb search --slide ID | --slide-file PATH`: stored slides ranked by their match to its mosaic."""
    if other_queries or (slide is not None and slide_file is not None):
        raise QueryError("give exactly one query", fix="QUERY text, --image, --point, --slide or --slide-file")
    if slide_mpp is not None and slide_file is None:
        raise QueryError("a slide pixel size applies to a slide that is not stored", fix="give --slide-file PATH")
    with options.searcher() as searcher:
        flt = searcher.parse_where(where)
        if slide is not None:
            query = searcher.slide_query(slide)
        else:
            assert slide_file is not None
            query = searcher.slide_file_query(slide_file, slide_mpp=slide_mpp)
        matches = searcher.search_slides(query, top_k, flt, exclude_same, candidates)
        gallery = None
        if export is not None:
            from conchdb.search.slide_export import export_slide_matches

            gallery = export_slide_matches(searcher.require_store(), searcher.collection, query, matches, export)
    if not query.mosaic_stored and slide is not None:
        err_console.print(f"note: slide '{slide}' has no stored mosaic; one was chosen from its stored tiles "
                          "(the mosaic command stores them)", highlight=False, soft_wrap=True)
    if gallery is not None:
        for failure in gallery.failures:
            err_console.print(f"[yellow]warning:[/] {failure}", highlight=False, soft_wrap=True)
        err_console.print(f"export: {gallery.images} images and {gallery.index}", highlight=False)
    if as_json:
        print_json([m.to_dict() for m in matches])
        return
    if not matches:
        out_console.print("no results")
        return
    from conchdb.cli.tables import slide_matches_table

    out_console.print(slide_matches_table(matches, f"slides like {query.source} ({len(query.tiles)} mosaic tiles)"))


@app.command()
@handles_errors
@uses_options(store=True, collection=True)
def mosaic(
    options: Options,
    slide: Annotated[list[str], typer.Option("--slide", help="Only this stored slide id; repeat for more.")] = [],  # noqa: B006
    where: WhereOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """Give stored slides their mosaics (k-means over their stored tile vectors; no slide is read).

    Ingest marks a slide's mosaic when the slide completes; this is for collections
    ingested before, and rerunning it changes nothing.
    """
    from conchdb.archive.marks import build_mosaics

    with options.searcher() as searcher:
        flt = searcher.parse_where(where)
        store, name = searcher.require_store(), searcher.collection
        summary = build_mosaics(store, name, slide_ids=slide or None,
                                flt=flt or None)
        store.finish_bulk_load(name)
    if as_json:
        print_json(summary.to_dict())
        return
    out_console.print(
        f"{summary.slides} slides, {summary.tiles} tiles: {summary.mosaic_tiles} mosaic tiles "
        f"({summary.marked} newly marked, {summary.unmarked} unmarked) in '{summary.collection}'",
        highlight=False, soft_wrap=True,
    )


@evaluate_app.command("retrieval")
@handles_errors
@uses_options(store=True, collection=True)
def evaluate_retrieval(
    options: Options,
    label: Annotated[str, typer.Option("--label", help="The slide label field, e.g. diagnosis.")],
    group: Annotated[
        str | None, typer.Option("--group", help="Leave out the query's group (e.g. patient_id) from its results.")
    ] = None,
    where: WhereOpt = [],  # noqa: B006
    candidates: CandidatesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Leave-one-group-out slide retrieval: top-1, MV@5, mMV@5 and macro-F1 of MV@5, per class."""
    from rich.progress import Progress

    from conchdb.search.evaluation import evaluate_retrieval as run

    with options.searcher() as searcher:
        flt = searcher.parse_where(where)
        store = searcher.require_store()
        with Progress(console=err_console, transient=True, disable=as_json) as bar:
            task = bar.add_task("queries", total=None)
            report = run(store, searcher.collection, label=label, group=group, flt=flt or None,
                         on_slide=lambda _: bar.advance(task), candidates=candidates)
    doc = report.to_dict()
    if as_json:
        print_json(doc)
        return
    from rich.table import Table

    title = (f"retrieval of '{label}' over {report.slides} slides"
             + (f", leaving out the query's '{group}'" if group else ", leaving out the query slide"))
    table = Table(title=title, title_justify="left")
    for name in ("class", "slides", "top-1", "MV@5", "MV@5 precision", "MV@5 F1"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for row in report.classes:
        table.add_row(row.label, str(row.slides), f"{row.top1:.3f}", f"{row.mv5:.3f}", f"{row.precision:.3f}",
                      f"{row.f1:.3f}")
    table.add_row("[bold]all[/]", str(report.slides), f"[bold]{report.top1:.3f}[/]", f"[bold]{report.mv5:.3f}[/]",
                  "", f"[bold]{report.macro_f1:.3f}[/] (macro)")
    out_console.print(table)
    out_console.print(f"mMV@5 {report.mmv5:.3f}   macro-F1 (MV@5) {report.macro_f1:.3f}", highlight=False)
    _print_problems(doc)


def _print_problems(doc: dict[str, Any]) -> None:
    """The slides left out of the figures, and why."""
    if doc.get("unlabelled"):
        err_console.print(f"[yellow]not counted, no label:[/] {', '.join(doc['unlabelled'])}", soft_wrap=True)
    for slide, labels in (doc.get("conflicting_labels") or {}).items():
        err_console.print(f"[yellow]not counted, several labels:[/] {slide}: {', '.join(labels)}", soft_wrap=True)
    if doc.get("without_group"):
        err_console.print(f"[yellow]not counted, no single group value:[/] {', '.join(doc['without_group'])}",
                          soft_wrap=True)
    outside = doc.get("labels_not_in_classes") or {}
    if outside:
        items = ", ".join(f"{k}: {v}" for k, v in outside.items())
        err_console.print(f"[yellow]not counted, label not among the classes:[/] {items}", soft_wrap=True)


@evaluate_app.command("zeroshot")
@handles_errors
@uses_options(store=True, collection=True, model=True)
def evaluate_zeroshot(
    options: Options,
    label: Annotated[str, typer.Option("--label", help="The label field, e.g. diagnosis.")],
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="Classes in CONCH's prompts/*.json format (keys = label values).")
    ] = None,
    ensemble: Annotated[bool, typer.Option("--ensemble", help="Put each label into CONCH-style templates.")] = False,
    topk: Annotated[str, typer.Option("--topk", help="MI-Zero: k values of top-k mean pooling.")] = "1,5,10,50,100",
    tiles: Annotated[bool, typer.Option("--tiles", help="Classify every labelled tile instead of slides.")] = False,
    png: Annotated[Path | None, typer.Option("--png", help="Write the confusion matrix here (PNG).")] = None,
    where: WhereOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """MI-Zero over every labelled slide (or tile) with the label names as classes: balanced
    accuracy and weighted F1 per top-k pooling, and the confusion matrix."""
    from conchdb.search import classes_from_labels, load_prompt_file
    from conchdb.search.evaluation import evaluate_zeroshot as run
    from conchdb.search.evaluation import label_values
    from conchdb.search.zeroshot import parse_ks

    try:
        ks = parse_ks(topk)
    except ValueError as exc:
        raise QueryError(f"--topk {topk!r}: {exc}", fix="give k values such as 1,5,10,50,100") from None
    classes = load_prompt_file(prompts) if prompts is not None else None
    with options.searcher() as searcher:
        flt = searcher.parse_where(where)
        store = searcher.require_store()
        if classes is None:
            values = label_values(store, searcher.collection, label, flt or None, tiles)
            if len(values) < 2:
                raise QueryError(f"'{label}' takes {len(values)} value(s) in this collection; zero-shot needs two",
                                 fix="check the label field and the filter", parameter="label")
            classes = classes_from_labels(values, ensemble)
        searcher.check_model(tower="text")
        vectors = searcher.class_vectors(classes)
        scale = searcher.require("text").logit_scale
        report = run(store, searcher.collection, vectors, [c.label for c in classes], scale, label=label, ks=ks,
                     flt=flt or None, tiles=tiles)
    best = report.best()
    if png is not None:
        from conchdb.search.confusion import confusion_image

        what = "tiles" if tiles else f"slides, top-{best.k} pooling"
        try:
            confusion_image(best.confusion, report.classes, f"{label}: {report.samples} {what}").save(png, "PNG")
        except (OSError, ValueError) as exc:
            raise ConchdbError(f"cannot write {png}: {exc}", fix="give a writable .png path", parameter="png") from None
        err_console.print(f"wrote {png}", highlight=False)
    doc = report.to_dict()
    if as_json:
        print_json(doc)
        return
    from rich.table import Table

    table = Table(title=f"zero-shot '{label}' over {report.samples} {report.level}s", title_justify="left")
    for name in ("pooling", "balanced accuracy", "weighted F1", "accuracy"):
        table.add_column(name, justify="left" if name == "pooling" else "right")
    for row in report.rows:
        table.add_row("tile" if row.k is None else f"top-{row.k}", f"{row.balanced_accuracy:.3f}",
                      f"{row.weighted_f1:.3f}", f"{row.accuracy:.3f}")
    out_console.print(table)
    matrix = Table(title="confusion (rows true, columns predicted)" + ("" if best.k is None else f", top-{best.k}"),
                   title_justify="left")
    matrix.add_column("true \\ predicted")
    for name in report.classes:
        matrix.add_column(name, justify="right", overflow="fold")
    for name, counts in zip(report.classes, best.confusion, strict=True):
        matrix.add_row(name, *(str(int(c)) for c in counts))
    out_console.print(matrix)
    _print_problems(doc)

