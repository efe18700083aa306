"""Deterministic point ids, so that writing the same thing twice overwrites it.

An id is a UUID5 of a canonical text of its parts. Re-running an ingest, or redoing a
slide whose worker was killed, therefore produces the very ids already in the store and
upserts replace points instead of adding duplicates. Changing any part that makes a
tile different (another model, another physical tile size) changes the id.
"""

from __future__ import annotations

import json
import math
import uuid
from numbers import Integral, Real

# Fixed forever: changing it would give every existing point a new id.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "conchdb:point-ids:v1")


def _canonical(part: object) -> object:
    """A JSON-ready form of one part that does not depend on how the number was typed.

    numpy scalars become Python numbers, and floats are written with 12 significant
    digits so that 0.5 computed two slightly different ways still gives one id.
    """
    if part is None or isinstance(part, (bool, str)):
        return part
    if isinstance(part, Integral):
        return int(part)
    if isinstance(part, Real):
        value = float(part)
        if not math.isfinite(value):
            raise ValueError(f"id part {part!r} is not a finite number")
        return float(f"{value:.12g}")
    raise TypeError(f"id part {part!r} has type {type(part).__name__}; use str, int, float, bool or None")


def stable_id(*parts: object) -> str:
    """UUID5 of the parts, for any record that must keep its id across runs.

    Use a first part that names the kind of record (`"slide"`, `"text"`), so that two
    kinds never share an id by accident.
    """
    text = json.dumps([_canonical(p) for p in parts], ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(NAMESPACE, text))


def tile_point_id(
    slide_identity: str, x: int, y: int, size: int, target_mpp: float | None, model_fingerprint: str
) -> str:
    """The id of one tile's point: the same slide, place, size, resolution and model give the same id.

    `x`, `y` and `size` are level-0 pixels; `target_mpp` is rounded to 6 significant digits
    first, so resolutions that differ only by float noise name the same tile. It is None for
    tiles imported from feature files whose slide, hence pixel size, is unknown: their
    pixels are then fixed by `size` and the tiling alone.
    """
    for label, value in (("x", x), ("y", y), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, Real) or float(value) != int(value):
            raise ValueError(f"tile {label}={value!r} must be a whole number of level-0 pixels")
    mpp = None if target_mpp is None else float(f"{float(target_mpp):.6g}")
    return stable_id("tile", str(slide_identity), int(x), int(y), int(size), mpp, str(model_fingerprint))
