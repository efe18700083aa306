"""`conchdb search`, `describe`, `classify` and `heatmap`: queries over a store.

Each command opens one `Searcher` as a context manager: the store is opened and the model
loaded (only the tower the query needs) when a query first needs them, and the store is
closed when the command is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conchdb.cli.app import Options, app, err_console, handles_errors, out_console, print_json, uses_options
from conchdb.errors import ConchdbError, QueryError

ImageQueryOpt = Annotated[
    str | None, typer.Option("--image", help="An image file, or a slide region PATH+x,y,w,h (level-0 pixels).")
]
WhereOpt = Annotated[
    list[str], typer.Option("--where", help="Filter: field=v, field!=v, field=a,b,c, field>=x, field<x ...; repeat.")
]
EnsembleOpt = Annotated[
    bool, typer.Option("--ensemble", help="Average the text over CONCH-style prompt templates.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
LikeOpt = Annotated[
    list[str], typer.Option("--like", help="Refine: id of a hit that is what you want; repeat.")
]
UnlikeOpt = Annotated[
    list[str], typer.Option("--unlike", help="Refine: id of a hit that is not what you want; repeat.")
]
MoreOpt = Annotated[
    list[str], typer.Option("--more", help="Move the query toward a text: TEXT or TEXT:WEIGHT (default 0.5); repeat.")
]
LessOpt = Annotated[
    list[str], typer.Option("--less", help="Move the query away from a text: TEXT or TEXT:WEIGHT; repeat.")
]
CandidatesOpt = Annotated[
    int | None,
    typer.Option("--candidates", help="Slide search: slides scored exactly per query (more is slower and surer)."),
]


@app.command()
@handles_errors
@uses_options(store=True, collection=True, model=True)
def search(
    options: Options,
    query: Annotated[str | None, typer.Argument(help="Text to search for.")] = None,
    image: ImageQueryOpt = None,
    point: Annotated[str | None, typer.Option("--point", help="Id of a stored tile: find tiles like it.")] = None,
    region: Annotated[
        str | None, typer.Option("--region", help="A stored slide's rectangle: SLIDE_ID:x,y,w,h (level-0 pixels).")
    ] = None,
    like: LikeOpt = [],  # noqa: B006
    unlike: UnlikeOpt = [],  # noqa: B006
    more: MoreOpt = [],  # noqa: B006
    less: LessOpt = [],  # noqa: B006
    slide: Annotated[str | None, typer.Option("--slide", help="A stored slide id: find slides like it.")] = None,
    slide_file: Annotated[
        Path | None, typer.Option("--slide-file", help="A slide file (not stored): find stored slides like it.")
    ] = None,
    exclude_same: Annotated[
        list[str], typer.Option("--exclude-same", help="Slide search: leave out slides sharing the query's value.")
    ] = [],  # noqa: B006
    candidates: CandidatesOpt = None,
    where: WhereOpt = [],  # noqa: B006
    top_k: Annotated[int, typer.Option("--top-k", help="Results per page, 1 to 1000.")] = 10,
    page: Annotated[int, typer.Option("--page", help="Page of results; 2 is results top-k+1 to 2×top-k.")] = 1,
    group_by: Annotated[
        str | None, typer.Option("--group-by", help="'slide' (or a payload field): one result per slide.")
    ] = None,
    group_size: Annotated[int, typer.Option("--group-size", help="Tiles kept per group.")] = 3,
    ensemble: EnsembleOpt = False,
    min_score: Annotated[float | None, typer.Option("--min-score", help="Leave out hits below this cosine.")] = None,
    as_json: JsonOpt = False,
    export: Annotated[Path | None, typer.Option("--export", help="Write hit JPEGs and index.html here.")] = None,
    export_geojson: Annotated[
        Path | None, typer.Option("--export-geojson", help="Write one QuPath GeoJSON file per slide with hits here.")
    ] = None,
    slide_mpp: Annotated[
        float | None,
        typer.Option("--slide-mpp", help="Level-0 µm/px of a region's or --slide-file's slide (not in the store)."),
    ] = None,
) -> None:
    """Search tiles by text, by image, by a stored tile or a stored slide's region, or slides by
    a slide, with filters; exactly one of QUERY, --image, --point, --region, --slide,
    --slide-file. Steer a tile search with --like/--unlike (hits by id) and --more/--less
    (texts); hits below the collection's noise floor are marked weak."""
    from conchdb.search.filters import filter_fields
    from conchdb.search.searcher import require_text
    from conchdb.search.steer import parse_concept

    if slide is not None or slide_file is not None:
        from conchdb.cli.slide_search import search_slides_command

        steering = [n for n, v in (("like", like), ("unlike", unlike), ("more", more), ("less", less),
                                   ("region", region), ("export_geojson", export_geojson)) if v]
        if steering:
            raise QueryError("refining, regions and GeoJSON export apply to tile searches",
                             fix="leave them out of a slide search, or search tiles", parameter=steering[0])

        return search_slides_command(
            options, slide=slide, slide_file=slide_file, slide_mpp=slide_mpp,
            other_queries=sum(q is not None for q in (query, image, point)), where=where, top_k=top_k,
            exclude_same=exclude_same, candidates=candidates, as_json=as_json, export=export,
        )
    if exclude_same or candidates is not None:
        raise QueryError("leaving out slides and scoring candidates apply to slide searches",
                         fix="give --slide or --slide-file", parameter="exclude_same" if exclude_same else "candidates")

    if sum(q is not None for q in (query, image, point, region)) != 1:
        raise QueryError("give exactly one query", fix="QUERY text, --image PATH, --point ID or --region SLIDE:x,y,w,h")
    concepts_more = [parse_concept(c, parameter="more") for c in more]
    concepts_less = [parse_concept(c, parameter="less") for c in less]
    if query is not None:
        require_text(query)
    if page < 1:
        raise QueryError(f"--page {page} is not a page number", fix="pages start at 1")
    if slide_mpp is not None and image is None:
        raise QueryError("a slide pixel size applies to a slide region query", fix="give --image PATH+x,y,w,h")
    with options.searcher() as searcher:
        flt = searcher.parse_where(where)
        # The image is read before the model loads, which loads only the tower the query needs.
        if region is not None:
            pixels = searcher.stored_region(region)
        else:
            pixels = searcher.load_image(image, slide_mpp=slide_mpp) if image is not None else None
        vector = searcher.query_vector(text=query, image=pixels, point=point, ensemble=ensemble)
        vector = searcher.steer(vector, more=concepts_more, less=concepts_less, like=like, unlike=unlike)
        modality = "text" if query is not None else "image"
        hits = searcher.search(vector, top_k, flt, min_score, (page - 1) * top_k, group_by, group_size,
                               exclude=[*like, *unlike], modality=modality)
        floor = searcher.noise_floor(modality)
    if export is not None:
        from conchdb.search.export import export_hits

        title = (f"text: {query}" if query is not None else f"image: {image}" if image is not None
                 else f"region: {region}" if region is not None else f"point: {point}")
        done = export_hits(hits, export, title)
        for tile in done.failures:
            err_console.print(f"[yellow]warning:[/] hit {tile.label}: {tile.error}", highlight=False, soft_wrap=True)
        err_console.print(f"export: {len(done.tiles) - len(done.failures)} images and {done.index}", highlight=False)
    if export_geojson is not None:
        from conchdb.search.geojson import export_hits_geojson

        written = export_hits_geojson(hits, export_geojson)
        err_console.print(f"geojson: {len(written)} slide file(s) in {export_geojson}", highlight=False)
    if as_json:
        print_json([h.to_dict() for h in hits])
        return
    from conchdb.cli.tables import hits_table

    if not hits:
        out_console.print("no results")
        return
    out_console.print(hits_table(hits, filter_fields(flt), noise_floor=floor.value if floor else None))


@app.command()
@handles_errors
@uses_options(store=True, collection=True, model=True)
def describe(
    options: Options,
    image: Annotated[str, typer.Argument(help="An image file, or a slide region PATH+x,y,w,h (level-0 pixels).")],
    top_k: Annotated[int, typer.Option("--top-k", help="Number of texts, 1 to 1000.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Image -> text: the added texts (conchdb texts add) closest to an image, else built-in histopathology terms."""
    with options.searcher() as searcher:
        pixels = searcher.load_image(image)
        matches = searcher.describe(searcher.image_vector(pixels), top_k)
    if as_json:
        print_json([m.to_dict() for m in matches])
        return
    from conchdb.cli.tables import texts_table

    out_console.print(texts_table(matches))


@app.command()
@handles_errors
@uses_options(store=True, collection=True, model=True)
def classify(
    options: Options,
    image: Annotated[
        str | None, typer.Argument(help="A tile or ROI image, or a slide region PATH+x,y,w,h.")
    ] = None,
    slide: Annotated[
        str | None, typer.Option("--slide", help="A stored slide id: MI-Zero over its stored tiles.")
    ] = None,
    label: Annotated[list[str], typer.Option("--label", help="A class name; repeat, at least two.")] = [],  # noqa: B006
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="Classes and templates in CONCH's prompts/*.json format.")
    ] = None,
    ensemble: Annotated[
        bool, typer.Option("--ensemble", help="Put each --label into CONCH-style templates.")
    ] = False,
    topk: Annotated[str, typer.Option("--topk", help="MI-Zero: k values of top-k mean pooling.")] = "1,5,10,50,100",
    where: WhereOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """Zero-shot classification of an image, or of a slide (--slide) from its stored tile vectors."""
    from conchdb.search import classes_from_labels, load_prompt_file
    from conchdb.search.zeroshot import parse_ks

    if (image is None) == (slide is None):
        raise QueryError("give an IMAGE or --slide SLIDE_ID (one of them)")
    if bool(label) == (prompts is not None):
        raise QueryError("give the classes with --label TEXT (repeated) or --prompts FILE.json (one of them)")
    classes = load_prompt_file(prompts) if prompts is not None else classes_from_labels(label, ensemble)
    try:
        ks = parse_ks(topk)
    except ValueError as exc:
        raise QueryError(f"--topk {topk!r}: {exc}", fix="give k values such as 1,5,10,50,100") from None
    if image is not None:
        with options.searcher(with_store=False) as searcher:
            pixels = searcher.load_image(image)
            searcher.require("vision", "text")  # one load for the image and the class prompts
            scores = searcher.classify(searcher.image_vector(pixels), classes)
        if as_json:
            print_json({"image": image, **scores.to_dict()})
            return
        from conchdb.cli.tables import classes_table

        out_console.print(classes_table(scores, title=f"{image}: {scores.prediction}"))
        return
    with options.searcher() as searcher:
        flt = searcher.parse_where(where)
        n_tiles, results = searcher.classify_slide(slide, classes, ks, flt)
    if as_json:
        print_json({"slide_id": slide, "tiles": n_tiles, "results": [r.to_dict() for r in results]})
        return
    from conchdb.cli.tables import mi_zero_table

    out_console.print(mi_zero_table(results, title=f"{slide}: MI-Zero over {n_tiles} stored tiles"))


@app.command()
@handles_errors
@uses_options(store=True, collection=True, model=True)
def heatmap(
    options: Options,
    slide_id: Annotated[str, typer.Argument(help="A stored slide id.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    query: Annotated[str | None, typer.Argument(help="Text query (or give --image).")] = None,
    image: ImageQueryOpt = None,
    ensemble: EnsembleOpt = False,
    where: WhereOpt = [],  # noqa: B006
    size: Annotated[int, typer.Option("--size", help="Longest side of the thumbnail, pixels.")] = 1024,
    geojson: Annotated[
        Path | None, typer.Option("--geojson", help="Also write the tiles as QuPath GeoJSON, similarity measured.")
    ] = None,
) -> None:
    """Similarity of each stored tile of a slide to a text or image query, over the slide's thumbnail
    (and, with --geojson, as tile polygons QuPath colours by their similarity)."""
    from conchdb.search.heatmap import slide_heatmap
    from conchdb.search.searcher import require_text

    if (query is None) == (image is None):
        raise QueryError("give a text QUERY or --image PATH (one of them)")
    if query is not None:
        require_text(query)
    if not 64 <= size <= 8192:
        raise QueryError(f"--size {size} is outside 64..8192")
    with options.searcher() as searcher:
        flt = searcher.parse_where(where)
        searcher.slide_tiles(slide_id, flt)  # an unknown slide fails before the model loads
        pixels = searcher.load_image(image) if image is not None else None
        vector = searcher.query_vector(text=query, image=pixels, ensemble=ensemble)
        tiles, scores = searcher.slide_similarity(slide_id, vector, flt)
    result = slide_heatmap(tiles, scores, f"{slide_id}: {query if query is not None else image}", size)
    try:
        result.image.save(out, "PNG")
    except (OSError, ValueError) as exc:
        raise ConchdbError(f"cannot write {out}: {exc}", fix="give --out a writable .png path") from None
    if geojson is not None:
        from conchdb.search.geojson import heatmap_collection, write_geojson

        write_geojson(heatmap_collection(tiles, scores), geojson)
        out_console.print(f"wrote {geojson}: {len(tiles)} tile polygons (measurement: similarity)", highlight=False)
    best = result.best.payload
    out_console.print(
        f"wrote {out}: {result.tiles} tiles, scores {result.low:.4f} to {result.high:.4f}, "
        f"best at ({best.get('x')}, {best.get('y')})",
        highlight=False,
        soft_wrap=True,
    )


