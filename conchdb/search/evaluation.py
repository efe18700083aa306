"""How well CONCH works on a labelled cohort: slide retrieval and zero-shot, from stored vectors.

Retrieval (`evaluate_retrieval`) is leave-one-group-out slide search: every labelled slide
queries the others with its mosaic (slides sharing its group, e.g. its patient, left out,
so a patient's other slides cannot give the answer away), and the labels of the top 5 give
top-1 accuracy, MV@5 (the majority label of the top 5), mMV@5 (MV@5 averaged over classes,
so that a large class does not hide a small one) and the macro-F1 of MV@5: the figures
that SISH, Yottixel, RetCCL and the foundation-model retrieval studies report.

Zero-shot (`evaluate_zeroshot`) runs MI-Zero over every labelled slide's stored tiles with
the label names (or prompt files) as classes, for each top-k pooling, or classifies every
labelled tile; it reports balanced accuracy, weighted F1 and the confusion matrix.

Only stored vectors are read. A slide that carries two labels (stored twice with different
manifests) or none, or that lacks the group field, is reported and left out of the
figures, never counted silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conchdb.catalog import MOSAIC_FIELD
from conchdb.errors import QueryError
from conchdb.search import metrics
from conchdb.search.slide_search import QueryTile, SlideQuery, rank_slides
from conchdb.search.zeroshot import topk_mean
from conchdb.store import Condition, Filter, Hit, Store

RETRIEVAL_K = 5
NO_LABEL = "(none)"


@dataclass
class LabelledSlides:
    """Slides sorted by what their tiles say about `label` (and `group`)."""

    labels: dict[str, str] = field(default_factory=dict)  # counted: slide id -> its one label
    groups: dict[str, Any] = field(default_factory=dict)
    unlabelled: list[str] = field(default_factory=list)
    conflicting: dict[str, list[str]] = field(default_factory=dict)  # slide id -> the labels found
    ungrouped: list[str] = field(default_factory=list)

    def problems(self) -> dict[str, Any]:
        return {
            "unlabelled": sorted(self.unlabelled),
            "conflicting_labels": {k: self.conflicting[k] for k in sorted(self.conflicting)},
            "without_group": sorted(self.ungrouped),
        }


def sort_slides(
    tiles: Iterable[Hit], label: str, group: str | None = None
) -> tuple[LabelledSlides, dict[str, list[Hit]]]:
    """Tiles grouped by slide, and each slide's label: one label, none, or several (conflicting)."""
    by_slide: dict[str, list[Hit]] = {}
    for tile in tiles:
        slide = tile.payload.get("slide_id")
        if slide is not None:
            by_slide.setdefault(str(slide), []).append(tile)
    out = LabelledSlides()
    for slide, group_tiles in sorted(by_slide.items()):
        found = {_label_text(t.payload.get(label)) for t in group_tiles}
        if found == {NO_LABEL}:
            out.unlabelled.append(slide)
            continue
        if len(found) > 1:
            out.conflicting[slide] = sorted(found)
            continue
        if group is not None:
            values = {t.payload.get(group) for t in group_tiles}
            if None in values or len(values) > 1:
                out.ungrouped.append(slide)
                continue
            out.groups[slide] = values.pop()
        out.labels[slide] = found.pop()
    return out, by_slide


def _label_text(value: Any) -> str:
    if value is None or isinstance(value, (list, dict)):
        return NO_LABEL
    return str(value)


@dataclass
class RetrievalRow:
    """One class: its slides, top-1 accuracy, and MV@5 accuracy (recall), precision and F1."""

    label: str
    slides: int
    top1: float
    mv5: float
    precision: float
    f1: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "slides": self.slides, "top1": self.top1, "mv5": self.mv5,
                "mv5_precision": self.precision, "mv5_f1": self.f1}


@dataclass
class RetrievalReport:
    """`evaluate retrieval`'s figures (`to_dict()` is its `--json`)."""

    label: str
    group: str | None
    k: int
    slides: int
    top1: float
    mv5: float
    mmv5: float
    macro_f1: float
    classes: list[RetrievalRow]
    problems: dict[str, Any]
    queries: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "group": self.group,
            "k": self.k,
            "slides": self.slides,
            "top1": self.top1,
            "mv5": self.mv5,
            "mmv5": self.mmv5,
            "macro_f1_mv5": self.macro_f1,
            "classes": [c.to_dict() for c in self.classes],
            **self.problems,
            "queries": self.queries,
        }


def mosaic_tiles(store: Store, collection: str, flt: Filter | None) -> list[Hit]:
    """Every stored mosaic tile matching `flt`, with vectors; an error naming the fix when there are none."""
    scope = Filter((Condition(MOSAIC_FIELD, "eq", True), *(flt.must if flt else ())))
    tiles = list(store.scroll(collection, scope, with_vectors=True))
    if not tiles:
        raise QueryError(
            f"no mosaic tiles in collection '{collection}'" + (" that match the filter" if flt else ""),
            fix="give the stored slides mosaics first (the mosaic command), or widen the filter",
            parameter="where",
        )
    return tiles


def retrieval_scores(
    truth: Sequence[str], ranked: Sequence[Sequence[str]], k: int = RETRIEVAL_K
) -> tuple[float, float, float, float, list[RetrievalRow]]:
    """top-1, MV@k, mMV@k and macro-F1 of MV@k, and per-class rows, from each query's true
    label and the labels of its results, best first."""
    top1 = [r[0] for r in ranked]
    votes = [metrics.majority_vote(list(r[:k])) for r in ranked]
    classes = sorted(set(truth) | set(votes))
    matrix = metrics.confusion(truth, votes, classes)
    rows = []
    for c, m in zip(classes, metrics.per_class(matrix, classes), strict=True):
        if not m.support:
            continue
        mine = [i for i, t in enumerate(truth) if t == c]
        rows.append(RetrievalRow(c, m.support, float(np.mean([top1[i] == c for i in mine])), m.recall,
                                 m.precision, m.f1))
    return (metrics.accuracy(truth, top1), metrics.accuracy(truth, votes), metrics.balanced_accuracy(matrix),
            metrics.macro_f1(matrix, classes), rows)


def evaluate_retrieval(
    store: Store,
    collection: str,
    *,
    label: str,
    group: str | None = None,
    flt: Filter | None = None,
    k: int = RETRIEVAL_K,
    on_slide: Callable[[str], None] | None = None,
    candidates: int | None = None,
) -> RetrievalReport:
    """Leave-one-group-out retrieval over the stored slides labelled by `label` (see the module docstring).

    Each counted slide is a query (its stored mosaic) over the other counted slides
    (matching `flt`), without the slides of its `group` value; a query left with no
    candidate is reported in `queries` without results and not counted. `candidates` is
    `rank_slides`'s: how many slides each query scores exactly (None: the default).
    """
    labelled, by_slide = sort_slides(mosaic_tiles(store, collection, flt), label, group)
    if not labelled.labels:
        raise QueryError(
            f"no stored slide has one value of '{label}'",
            fix=f"check the field name ('{label}' must be a manifest column) and the filter",
            parameter="label",
        )
    scope = Filter((*(flt.must if flt else ()), Condition("slide_id", "in", sorted(labelled.labels))))
    truth, ranked, queries = [], [], []
    for slide, true_label in labelled.labels.items():
        tiles = sorted(by_slide[slide], key=lambda t: t.id)
        query = SlideQuery([QueryTile(t.vector, t.payload.get("x"), t.payload.get("y"), id=t.id) for t in tiles],
                           slide, slide, dict(tiles[0].payload))
        found = rank_slides(store, collection, query, k=k, flt=scope, exclude_same=(group,) if group else (),
                            candidates=candidates)
        result = [labelled.labels[m.slide_id] for m in found]
        queries.append({"slide_id": slide, "label": true_label, "results": [m.slide_id for m in found],
                        "result_labels": result})
        if result:
            truth.append(true_label)
            ranked.append(result)
        if on_slide:
            on_slide(slide)
    if not truth:
        raise QueryError("no query slide had a candidate left", fix="the group field leaves out every other slide",
                         parameter="group")
    top1, mv5, mmv5, f1, rows = retrieval_scores(truth, ranked, k)
    return RetrievalReport(label, group, k, len(truth), top1, mv5, mmv5, f1, rows, labelled.problems(), queries)


# -- zero-shot ------------------------------------------------------------------------------


@dataclass
class ZeroShotRow:
    """The figures of one pooling (`k`, or None for tiles)."""

    k: int | None
    balanced_accuracy: float
    weighted_f1: float
    accuracy: float
    confusion: np.ndarray

    def to_dict(self, classes: Sequence[str]) -> dict[str, Any]:
        return {
            "k": self.k,
            "balanced_accuracy": self.balanced_accuracy,
            "weighted_f1": self.weighted_f1,
            "accuracy": self.accuracy,
            "confusion": {"classes": list(classes), "matrix": self.confusion.tolist()},
        }


@dataclass
class ZeroShotReport:
    """`evaluate zeroshot`'s figures (`to_dict()` is its `--json`)."""

    label: str
    level: str  # "slide" or "tile"
    classes: list[str]
    samples: int
    rows: list[ZeroShotRow]
    problems: dict[str, Any]

    def best(self) -> ZeroShotRow:
        """The pooling with the highest balanced accuracy (the smallest k on a tie)."""
        return max(self.rows, key=lambda r: (r.balanced_accuracy, -(r.k or 0)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "level": self.level,
            "classes": self.classes,
            "samples": self.samples,
            "results": [r.to_dict(self.classes) for r in self.rows],
            **self.problems,
        }


def _row(k: int | None, truth: list[str], predicted: list[str], classes: Sequence[str]) -> ZeroShotRow:
    matrix = metrics.confusion(truth, predicted, classes)
    return ZeroShotRow(k, metrics.balanced_accuracy(matrix), metrics.weighted_f1(matrix, classes),
                       metrics.accuracy(truth, predicted), matrix)


def label_values(store: Store, collection: str, label: str, flt: Filter | None, tiles: bool) -> list[str]:
    """The values `label` takes: on the mosaic tiles (one per slide's kinds of tissue) for a
    slide label, on every tile for a tile label."""
    scope = flt if tiles else Filter((Condition(MOSAIC_FIELD, "eq", True), *(flt.must if flt else ())))
    values = {_label_text(h.payload.get(label)) for h in store.scroll(collection, scope)}
    return sorted(values - {NO_LABEL})


def evaluate_zeroshot(
    store: Store,
    collection: str,
    class_vectors: np.ndarray,
    classes: Sequence[str],
    logit_scale: float,
    *,
    label: str,
    ks: Sequence[int] = (1, 5, 10, 50, 100),
    flt: Filter | None = None,
    tiles: bool = False,
) -> ZeroShotReport:
    """MI-Zero over every slide labelled by `label` (or, with `tiles`, a prediction for every
    labelled tile), against `class_vectors` whose names `classes` are the label's values.

    One pass over the stored tiles: each tile's class logits are kept (a few numbers), its
    vector is not. A sample whose label is not among `classes` is reported, not counted.
    """
    names = list(classes)
    matrix = np.asarray(class_vectors, dtype=np.float64)
    logits_of: dict[str, list[np.ndarray]] = {}
    labels_of: dict[str, set[str]] = {}
    truth_tiles: list[str] = []
    predicted_tiles: list[str] = []
    outside: dict[str, int] = {}
    page: list[Hit] = []

    def flush() -> None:
        vectors = np.stack([np.asarray(h.vector, dtype=np.float64) for h in page])
        logits = logit_scale * (vectors @ matrix.T)
        for hit, row in zip(page, logits, strict=True):
            value = _label_text(hit.payload.get(label))
            if tiles:
                if value == NO_LABEL:
                    outside[NO_LABEL] = outside.get(NO_LABEL, 0) + 1
                elif value not in names:
                    outside[value] = outside.get(value, 0) + 1
                else:
                    truth_tiles.append(value)
                    predicted_tiles.append(names[int(np.argmax(row))])
                continue
            slide = str(hit.payload.get("slide_id"))
            logits_of.setdefault(slide, []).append(row)
            labels_of.setdefault(slide, set()).add(value)
        page.clear()

    for hit in store.scroll(collection, flt, with_vectors=True):
        page.append(hit)
        if len(page) >= 2048:
            flush()
    if page:
        flush()
    if tiles:
        problems = {"labels_not_in_classes": outside}
        if not truth_tiles:
            raise QueryError(f"no stored tile has a value of '{label}' among the classes",
                             fix="check the label field and the class names", parameter="label")
        rows = [_row(None, truth_tiles, predicted_tiles, names)]
        return ZeroShotReport(label, "tile", names, len(truth_tiles), rows, problems)
    sorted_out = LabelledSlides()
    counted: dict[str, str] = {}
    for slide in sorted(labels_of):
        found = labels_of[slide]
        if found == {NO_LABEL}:
            sorted_out.unlabelled.append(slide)
        elif len(found) > 1:
            sorted_out.conflicting[slide] = sorted(found)
        elif next(iter(found)) not in names:
            outside[slide] = next(iter(found))
        else:
            counted[slide] = next(iter(found))
    if not counted:
        raise QueryError(f"no stored slide has one value of '{label}' among the classes",
                         fix="check the label field and that the class names are its values",
                         parameter="label")
    truth = list(counted.values())
    rows = []
    for k in ks:
        predicted = [names[int(np.argmax(topk_mean(np.stack(logits_of[s]), k)))] for s in counted]
        rows.append(_row(k, truth, predicted, names))
    problems = {**sorted_out.problems(), "labels_not_in_classes": outside}
    problems.pop("without_group")
    return ZeroShotReport(label, "slide", names, len(counted), rows, problems)
