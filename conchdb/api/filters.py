"""JSON filters, `{"site": "colon", "grade": {"gte": 2}, "diagnosis": {"in": ["a", "b"]}}`, as a store `Filter`.

The operators are the command line's (`eq`, `ne`, `in`, `nin`, `gt`, `gte`, `lt`, `lte`);
a bare value means `eq`, several operators on one field are AND-combined. Values arrive
typed (JSON has numbers, strings and booleans), so each is checked against the field's type
in the collection: a typo or a wrong type is a 422 naming `filters.<field>`, never a filter
that silently matches nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from conchdb.api.errors import ApiError, shown
from conchdb.search.filters import FieldTypes
from conchdb.store import Condition, Filter

OPERATORS = ("eq", "ne", "in", "nin", "gt", "gte", "lt", "lte")
RANGE_OPERATORS = ("gt", "gte", "lt", "lte")
KIND_WORDS = {"keyword": "text", "integer": "whole-number", "float": "number", "bool": "yes/no (true or false)"}


def example(types: FieldTypes) -> str:
    """A filter written with this collection's own fields (never with fields it lacks)."""
    parts: list[str] = []
    keyword = next((n for n, k in sorted(types.types.items()) if k == "keyword" and n not in _BOOKKEEPING), None)
    number = next((n for n, k in sorted(types.types.items()) if k in ("integer", "float") and n not in _BOOKKEEPING),
                  None)
    if keyword:
        parts.append(f'"{keyword}": "a value"')
    if number:
        parts.append(f'"{number}": {{"gte": 1}}')
    if not parts:
        return "send an object of field names and values"
    return "e.g. {" + ", ".join(parts) + "}; operators: " + ", ".join(OPERATORS)


_BOOKKEEPING = frozenset({"path", "identity", "ingest_run", "tiling", "mpp_source", "x", "y", "size", "tile_px",
                          "target_mpp", "mpp", "cohort", "mosaic", "tissue", "slide_id"})


def _fail(field: str, problem: str, fix: str) -> ApiError:
    return ApiError(422, f"filter on '{field}': {problem}", fix, field=f"filters.{field}")


def _kind_of(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float" if math.isfinite(value) else None
    if isinstance(value, str):
        return "keyword"
    return None


def _value_fix(field: str, kind: str | None) -> str:
    if kind is None:
        return f"give '{field}' a text, a number, true or false"
    if kind == "keyword":
        return f"give '{field}' a text value in quotes, exactly as stored (case matters); GET /v1/fields lists them"
    if kind == "bool":
        return f"give '{field}' true or false"
    return f"give '{field}' a number, or a range such as {{\"gte\": 1, \"lte\": 3}}"


def _check(field: str, value: Any, kind: str | None, numeric: bool) -> Any:
    """`value` if it fits the field's type (integers are fine for float fields)."""
    got = _kind_of(value)
    if got is None:
        raise _fail(field, f"{shown(value)} is not a value to compare with", _value_fix(field, kind))
    if numeric and kind not in (None, "integer", "float"):
        raise _fail(field, f"'{field}' holds {KIND_WORDS[kind]} values, which have no order",
                    f"compare '{field}' with one value or a list of values (eq, ne, in, nin)")
    if numeric and got not in ("integer", "float"):
        raise _fail(field, f"a range needs a number, but got {shown(value)}", _value_fix(field, "float"))
    if kind is None or got == kind or (kind == "float" and got == "integer"):
        return value
    if kind == "integer" and got == "float" and numeric:
        return value  # `grade < 2.5` on an integer field is a fine range
    problem = f"{shown(value)} is {KIND_WORDS[got]}, but '{field}' holds {KIND_WORDS[kind]} values"
    raise _fail(field, problem, _value_fix(field, kind))


def parse_filters(spec: Mapping[str, Any] | None, types: FieldTypes, max_conditions: int) -> Filter:
    """A JSON filter object as one AND filter over the collection's fields."""
    if not spec:
        return Filter()
    if not isinstance(spec, Mapping):
        raise ApiError(422, "filters must be an object of field names and values", example(types), field="filters")
    must: list[Condition] = []
    for field, rule in spec.items():
        kind = types.get(field)
        if types.declared and kind is None:
            known = ", ".join(sorted(n for n in types.types if n not in ("path", "identity"))) or "none"
            raise _fail(field, f"this collection has no field '{field}'", f"filter on one of: {known}")
        ops = rule if isinstance(rule, Mapping) else {"eq": rule}
        if not ops:
            raise _fail(field, "no comparison given", example(types))
        for op, value in ops.items():
            if op not in OPERATORS:
                raise _fail(field, f"there is no comparison called '{op}'",
                            "use one of: " + ", ".join(OPERATORS))
            if op in ("in", "nin"):
                if not isinstance(value, list) or not value:
                    raise _fail(field, f"'{op}' takes a list of one or more values", _value_fix(field, kind))
                typed = [_check(field, v, kind, False) for v in value]
                if op == "in":
                    must.append(Condition(field, "in", typed))
                else:
                    must += [Condition(field, "ne", v) for v in typed]
            else:
                must.append(Condition(field, op, _check(field, value, kind, op in RANGE_OPERATORS)))  # type: ignore[arg-type]
            if len(must) > max_conditions:
                raise ApiError(
                    422, f"more than {max_conditions} filter conditions",
                    'combine the values of one field in a list: {"field": {"in": [...]}}', field="filters",
                )
    return Filter(tuple(must))
