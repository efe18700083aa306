"""Translate conchdb's `Filter` into a backend's typed filter, once for both backends.

qdrant-edge and qdrant-client spell the same Qdrant filter language with different
classes, so the logic (which op becomes a match, a set match, a range or an exclusion,
and how a value is read as the field's type) lives here and each backend supplies a
`Dialect`: the five constructors that differ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

from conchdb.catalog import FieldType
from conchdb.errors import QueryError
from conchdb.store.types import Condition, Filter
from conchdb.tabular import parse_bool, value_type

RANGE_OPS = ("gt", "gte", "lt", "lte")


@dataclass(frozen=True)
class Dialect:
    """How one backend builds the pieces of a filter.

    `match(key, value)` is an exact match of a str, int or bool; `match_any(key, values)`
    of any of a list of str or of int; `range(key, bounds)` takes `{"gt": 1.0, ...}`;
    `is_empty(key)` matches points without the field; `filter(must, must_not, should)`
    builds a filter, which both engines also accept as a condition inside another.
    """

    match: Callable[[str, Any], Any]
    match_any: Callable[[str, list], Any]
    range: Callable[[str, dict[str, float]], Any]
    is_empty: Callable[[str], Any]
    filter: Callable[[list, list, list], Any]


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _kind_of(value: Any) -> FieldType:
    """The field type a value implies when the collection declares none (numpy scalars too);
    a value of no field type is tried as text, and refused there if it is none."""
    return value_type(value) or "keyword"


def _coerce(field: str, value: Any, kind: FieldType) -> Any:
    """`value` as the field's type, or a QueryError that names the field and the type."""
    try:
        if kind == "keyword" and isinstance(value, (str, Integral)) and not _is_bool(value):
            return str(value)
        if kind == "bool":
            if _is_bool(value):
                return bool(value)
            word = parse_bool(value) if isinstance(value, str) else None
            if word is not None:
                return word
        if kind == "integer" and not _is_bool(value):
            number = float(value)
            return int(number) if number.is_integer() else number
        if kind == "float" and not _is_bool(value):
            return float(value)
    except (TypeError, ValueError):
        pass
    raise QueryError(
        f"filter on field '{field}': {value!r} is not a {kind} value",
        fix=f"'{field}' holds {kind} values; compare it with a {kind}",
        parameter="where",
    )


def _equals(field: str, value: Any, dialect: Dialect) -> Any:
    """Exact match; floats are compared as a closed one-point range, which also matches ints."""
    if isinstance(value, float):
        return dialect.range(field, {"gte": value, "lte": value})
    return dialect.match(field, value)


def _one_of(field: str, values: list, kind: FieldType | None, dialect: Dialect) -> Any:
    """`in`: one set match per value type (the engines want homogeneous lists), OR-ed."""
    typed = [_coerce(field, v, kind or _kind_of(v)) for v in values]
    if not typed:
        return dialect.match_any(field, [])
    strings = [v for v in typed if isinstance(v, str)]
    ints = [v for v in typed if isinstance(v, int) and not isinstance(v, bool)]
    conds = [dialect.match_any(field, group) for group in (strings, ints) if group]
    conds += [_equals(field, v, dialect) for v in typed if isinstance(v, float)]
    conds += [dialect.match(field, v) for v in dict.fromkeys(v for v in typed if isinstance(v, bool))]
    return conds[0] if len(conds) == 1 else dialect.filter([], [], conds)


def _translate_condition(cond: Condition, kind: FieldType | None, dialect: Dialect) -> tuple[list, list]:
    """The (must, must_not) parts for one condition."""
    field, op, value = cond.field, cond.op, cond.value
    if op == "in":
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
            raise QueryError(
                f"filter on field '{field}': 'in' needs a list of values, got {value!r}", parameter="where"
            )
        return [_one_of(field, list(value), kind, dialect)], []
    if value is None or isinstance(value, (list, tuple, set, dict)):
        raise QueryError(f"filter on field '{field}': '{op}' needs one value, got {value!r}", parameter="where")
    kind = kind or _kind_of(value)
    if op in RANGE_OPS:
        if kind not in ("integer", "float"):
            raise QueryError(
                f"filter on field '{field}': '{op}' compares numbers but the field is {kind}",
                fix="use eq, ne or in for text and true/false fields",
                parameter="where",
            )
        return [dialect.range(field, {op: float(_coerce(field, value, kind))})], []
    typed = _coerce(field, value, kind)
    if op == "eq":
        return [_equals(field, typed, dialect)], []
    if op == "ne":
        # NOT equal AND NOT missing: a point without the field does not match.
        return [], [_equals(field, typed, dialect), dialect.is_empty(field)]
    raise QueryError(
        f"filter on field '{field}': unknown operator {op!r}",
        fix="use one of eq, ne, in, gt, gte, lt, lte",
        parameter="where",
    )


def translate(flt: Filter | None, dialect: Dialect, types: Mapping[str, FieldType] | None = None) -> Any:
    """The backend filter for `flt` (None for no filter), conditions AND-combined.

    `types` are the collection's indexed field types; they decide how a value is read
    (an int compared with a keyword field is matched as its text, a numeric string with a
    numeric field as its number). Fields without a declared type are read by value.
    """
    if not flt:
        return None
    must: list = []
    must_not: list = []
    for cond in flt.must:
        yes, no = _translate_condition(cond, (types or {}).get(cond.field), dialect)
        must += yes
        must_not += no
    return dialect.filter(must, must_not, [])
