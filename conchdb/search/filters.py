"""`--where` expressions: the one place where filter text becomes a typed store `Filter`.

Users type filters; the store takes typed conditions only. Parsing here, against the
collection's payload types, means a typo or a wrong type is caught before any search, with
a message that shows the expression and the grammar, instead of a filter that silently
matches nothing (`grade=high` on an integer field, `site>3` on a text field).

Grammar (one condition per expression; several expressions are AND-combined):

    field=value        equal                 field!=value      not equal (field must exist)
    field=a,b,c        any of                field!=a,b        none of
    field>x  field>=x  field<x  field<=x     numeric ranges

Values are split on commas; put a value that holds a comma in double quotes
(`diagnosis="adenoma, tubular"`). Booleans are the words of `conchdb.tabular.BOOLEAN_WORDS`
(true/false, yes/no, 1/0), as in a manifest.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from conchdb.catalog import FieldType
from conchdb.errors import QueryError
from conchdb.store import Condition, Filter
from conchdb.tabular import parse_bool, value_type

GRAMMAR = (
    "field=value | field!=value | field=a,b,c (any of) | field!=a,b (none of) | "
    "field>x | field>=x | field<x | field<=x; several expressions combine with AND"
)

OPERATORS: dict[str, str] = {"=": "eq", "!=": "ne", ">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}
_EXPR = re.compile(r"^\s*(?P<field>[A-Za-z_][A-Za-z0-9_.\-]*)\s*(?P<op>[=!<>~]+)\s*(?P<value>.*?)\s*$", re.S)


@dataclass(frozen=True)
class FieldTypes:
    """The payload fields of a collection and their types.

    `declared` is True when the types come from the collection's record (`payload_schema`),
    False when they were inferred from a sample of points; only a declared schema can say
    that a field does not exist.
    """

    types: Mapping[str, FieldType]
    declared: bool = True

    def get(self, field: str) -> FieldType | None:
        return self.types.get(field)


def infer_types(payloads: Iterable[Mapping[str, Any]]) -> dict[str, FieldType]:
    """Field types seen in sample payloads; a field with both ints and floats is float,
    and one with conflicting kinds (text and numbers) is left untyped."""
    seen: dict[str, set[FieldType]] = {}
    for payload in payloads:
        for key, value in payload.items():
            kind = value_type(value)
            if kind is not None:
                seen.setdefault(key, set()).add(kind)
    out: dict[str, FieldType] = {}
    for key, kinds in seen.items():
        if len(kinds) == 1:
            out[key] = next(iter(kinds))
        elif kinds == {"integer", "float"}:
            out[key] = "float"
    return out


def _fail(expr: str, problem: str, fix: str | None = None) -> QueryError:
    return QueryError(f"filter {expr!r}: {problem}", fix=fix or f"the grammar is: {GRAMMAR}", parameter="where")


def _split_values(expr: str, text: str) -> list[str]:
    """Comma-separated values, double quotes protecting commas; every value non-empty."""
    try:
        cells = next(csv.reader([text], skipinitialspace=True, strict=True))
    except (csv.Error, StopIteration):
        raise _fail(expr, f"cannot read the value list {text!r}") from None
    values = [c.strip() for c in cells]
    if not values or any(v == "" for v in values):
        raise _fail(expr, "a value is missing (empty value or stray comma)")
    return values


def _typed(expr: str, field: str, text: str, kind: FieldType | None, numeric: bool) -> Any:
    """`text` read as the field's type; an untyped field takes the literal's own type."""
    if kind is None:
        kind = _literal_type(text)
    if numeric and kind not in ("integer", "float"):
        raise _fail(
            expr,
            f"'{field}' holds {kind} values, which have no order",
            fix=f"compare '{field}' with = or != (grammar: {GRAMMAR})",
        )
    if kind == "keyword":
        return text
    if kind == "bool":
        value = parse_bool(text)
        if value is None:
            raise _type_error(expr, field, text, kind)
        return value
    try:
        number = float(text)
    except ValueError:
        raise _type_error(expr, field, text, kind) from None
    if not math.isfinite(number):
        raise _type_error(expr, field, text, kind)
    if kind == "integer":
        if number.is_integer():
            return int(number)
        if numeric:  # `grade < 2.5` on an integer field is a fine range
            return number
        raise _type_error(expr, field, text, kind)
    return number


def _literal_type(text: str) -> FieldType:
    try:
        number = float(text)
    except ValueError:
        return "bool" if parse_bool(text) is not None else "keyword"
    return "integer" if number.is_integer() and re.fullmatch(r"[+-]?\d+", text) else "float"


def _type_error(expr: str, field: str, text: str, kind: FieldType) -> QueryError:
    examples = {"integer": "an integer such as 3", "float": "a number such as 0.5", "bool": "true or false"}
    return _fail(
        expr,
        f"{text!r} is not {'an' if kind == 'integer' else 'a'} {kind} value, but '{field}' holds {kind} values",
        fix=f"compare '{field}' with {examples.get(kind, 'text')} (grammar: {GRAMMAR})",
    )


def parse_condition(expr: str, types: FieldTypes | None = None) -> list[Condition]:
    """The conditions of one expression (one, or several for `!=a,b`)."""
    match = _EXPR.match(expr)
    if not match:
        raise _fail(expr, "not of the form field<operator>value")
    field, op_text, value_text = match["field"], match["op"], match["value"]
    op = OPERATORS.get(op_text)
    if op is None:
        raise _fail(expr, f"unknown operator {op_text!r}; operators are {', '.join(OPERATORS)}")
    if value_text == "":
        raise _fail(expr, f"no value after {op_text!r}")
    kind = types.get(field) if types else None
    if types is not None and types.declared and kind is None:
        known = ", ".join(sorted(types.types)) or "none"
        raise _fail(expr, f"no field '{field}' in this collection", fix=f"fields that can be filtered: {known}")
    values = _split_values(expr, value_text)
    numeric = op in ("gt", "gte", "lt", "lte")
    if len(values) > 1 and op not in ("eq", "ne"):
        raise _fail(expr, f"{op_text!r} takes one value, got {len(values)}")
    typed = [_typed(expr, field, v, kind, numeric) for v in values]
    if op == "eq" and len(typed) > 1:
        return [Condition(field, "in", typed)]
    return [Condition(field, op, v) for v in typed]  # `!=a,b`: none of them


def parse_where(expressions: Sequence[str], types: FieldTypes | None = None) -> Filter:
    """All `--where` expressions as one AND filter; `types` makes values typed and checked."""
    must: list[Condition] = []
    for expr in expressions:
        must += parse_condition(expr, types)
    return Filter(tuple(must))


def filter_fields(flt: Filter | None) -> list[str]:
    """The fields a filter tests, in order, once each (the columns a result table shows)."""
    return list(dict.fromkeys(c.field for c in flt.must)) if flt else []
