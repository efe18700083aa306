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

from conchdb.api.errors import ApiError
from conchdb.search.filters import FieldTypes
from conchdb.store import Condition, Filter

OPERATORS = ("eq", "ne", "in", "nin", "gt", "gte", "lt", "lte")
RANGE_OPERATORS = ("gt", "gte", "lt", "lte")
FIX = (
    'give each field a value, or an object of operators: {"site": "colon", "grade": {"gte": 2}, '
    '"diagnosis": {"in": ["adenoma", "normal"]}}; operators: ' + ", ".join(OPERATORS)
)


def _fail(field: str, problem: str, fix: str = FIX) -> ApiError:
    return ApiError(422, f"filters.{field}: {problem}", fix, field=f"filters.{field}")


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


def _check(field: str, value: Any, kind: str | None, numeric: bool) -> Any:
    """`value` if it fits the field's type (integers are fine for float fields)."""
    got = _kind_of(value)
    if got is None:
        raise _fail(field, f"{value!r} is not a string, number or boolean")
    if numeric and got not in ("integer", "float"):
        raise _fail(field, f"a range needs a number, got {value!r}")
    if numeric and kind not in (None, "integer", "float"):
        raise _fail(field, f"'{field}' holds {kind} values, which have no order", "compare it with eq, ne, in or nin")
    if kind is None or got == kind or (kind == "float" and got == "integer"):
        return value
    if kind == "integer" and got == "float" and numeric:
        return value  # `grade < 2.5` on an integer field is a fine range
    article = "an" if kind == "integer" else "a"
    problem = f"{value!r} is {got}, but '{field}' holds {kind} values"
    raise _fail(field, problem, f"give '{field}' {article} {kind} value")


def parse_filters(spec: Mapping[str, Any] | None, types: FieldTypes, max_conditions: int) -> Filter:
    """A JSON filter object as one AND filter over the collection's fields."""
    if not spec:
        return Filter()
    if not isinstance(spec, Mapping):
        raise ApiError(422, "filters must be a JSON object", FIX, field="filters")
    must: list[Condition] = []
    for field, rule in spec.items():
        kind = types.get(field)
        if types.declared and kind is None:
            known = ", ".join(sorted(types.types)) or "none"
            raise _fail(field, f"no field '{field}' in this collection", f"fields that can be filtered: {known}")
        ops = rule if isinstance(rule, Mapping) else {"eq": rule}
        if not ops:
            raise _fail(field, "no operator given")
        for op, value in ops.items():
            if op not in OPERATORS:
                raise _fail(field, f"unknown operator {op!r}")
            if op in ("in", "nin"):
                if not isinstance(value, list) or not value:
                    raise _fail(field, f"'{op}' takes a non-empty list of values")
                typed = [_check(field, v, kind, False) for v in value]
                if op == "in":
                    must.append(Condition(field, "in", typed))
                else:
                    must += [Condition(field, "ne", v) for v in typed]
            else:
                must.append(Condition(field, op, _check(field, value, kind, op in RANGE_OPERATORS)))  # type: ignore[arg-type]
            if len(must) > max_conditions:
                raise ApiError(
                    422, f"more than {max_conditions} filter conditions", "combine values with 'in'", field="filters"
                )
    return Filter(tuple(must))
