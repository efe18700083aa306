"""Typed CSV columns, as manifests and texts files hold them, and typed filter values.

Users write metadata in spreadsheets; the store wants one type per field, so that a
filter on `grade > 2` means the same for every slide. A CSV file here is read by one set
of rules: UTF-8 (an Excel BOM is fine), the delimiter (`,`, `;` or tab) taken from the
header line, strict quoting (a quoted cell may hold the delimiter or a line break),
blank lines skipped, cells stripped, column names non-empty and unique regardless of
case, a row with fewer cells than columns padded with empty cells (and one with more an
error). Each column gets the narrowest type that fits all its non-empty cells: int,
float, bool or string; empty cells stay out of the payload instead of being stored as "".

`BOOLEAN_WORDS` are the words read as true and false everywhere: in a CSV column, in a
`--where` value and in a filter condition on a bool field.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

import numpy as np

from conchdb.catalog import FieldType
from conchdb.errors import ConchdbError

ColumnType = Literal["int", "float", "bool", "string"]
COLUMN_TYPES: tuple[ColumnType, ...] = get_args(ColumnType)
BOOLEAN_WORDS: Mapping[str, bool] = MappingProxyType(
    {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
)
"""The words (any case) that mean true or false."""
DELIMITERS = (",", ";", "\t")

_INT = re.compile(r"^[+-]?(0|[1-9][0-9]*)$")
_FLOAT = re.compile(r"^[+-]?((0|[1-9][0-9]*)(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")


def parse_bool(text: str) -> bool | None:
    """The boolean a word means (`BOOLEAN_WORDS`, any case), or None for any other text."""
    return BOOLEAN_WORDS.get(text.strip().lower())


def infer_type(cells: Sequence[str]) -> ColumnType:
    """The narrowest of int, float, bool, string that fits every non-empty cell.

    Int is tried before bool, so a column of 0s and 1s is a number. Numbers with leading
    zeros (identifiers such as 007) and nan/inf stay strings."""
    values = [c for c in cells if c]
    if not values:
        return "string"
    if all(_INT.match(v) for v in values):
        return "int"
    if all(_FLOAT.match(v) for v in values):
        return "float"
    if all(parse_bool(v) is not None for v in values):
        return "bool"
    return "string"


def convert(cell: str, kind: ColumnType) -> Any:
    """A non-empty cell as a value of its column's type (one `infer_type` chose for it)."""
    if kind == "int":
        return int(cell)
    if kind == "float":
        return float(cell)
    if kind == "bool":
        value = parse_bool(cell)
        if value is None:
            raise ValueError(f"{cell!r} is not one of {', '.join(BOOLEAN_WORDS)}")
        return value
    return cell


def value_type(value: Any) -> FieldType | None:
    """The field type a payload or filter value has (numpy scalars too); None for lists,
    dicts, None and anything else no field type holds."""
    if isinstance(value, (bool, np.bool_)):  # numpy's bool is no bool, nor an int
        return "bool"
    if isinstance(value, Integral):
        return "integer"
    if isinstance(value, Real):
        return "float"
    if isinstance(value, str):
        return "keyword"
    return None


@dataclass(frozen=True)
class Table:
    """A CSV file's header and rows, every row as long as the header.

    `rows` holds (line, cells) of every non-blank record after the header, `line` being
    the file line where the record ends (what a user looks up)."""

    source: Path
    header: list[str]
    header_line: int
    rows: list[tuple[int, list[str]]]

    def index(self, name: str) -> int | None:
        """The position of the column called `name` (any case), or None."""
        lower = [h.lower() for h in self.header]
        return lower.index(name.lower()) if name.lower() in lower else None

    def column_types(self, columns: Sequence[int]) -> dict[int, ColumnType]:
        """The type of each of the given columns (by position), inferred from all rows."""
        return {i: infer_type([cells[i] for _, cells in self.rows]) for i in columns}

    def typed(self, cells: Sequence[str], types: Mapping[int, ColumnType]) -> dict[str, Any]:
        """One row's non-empty cells of the typed columns, by column name, as typed values."""
        return {self.header[i]: convert(cells[i], kind) for i, kind in types.items() if cells[i]}


def _delimiter(header: str) -> str:
    return next((d for d in DELIMITERS if d in header), ",")


def parse_table(
    text: str, source: Path, error: type[ConchdbError] = ConchdbError, parameter: str | None = None
) -> Table | None:
    """The table in CSV `text` read from `source` (named in errors), or None when it holds
    no records; a malformed file raises `error` naming the file, the line and the column,
    about `parameter` (the input that named the file)."""
    lines = text.splitlines(keepends=True)
    first = next((line for line in lines if line.strip()), "")
    reader = csv.reader(lines, delimiter=_delimiter(first), strict=True)
    records: list[tuple[int, list[str]]] = []
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                records.append((reader.line_num, [c.strip() for c in cells]))
    except csv.Error as exc:
        raise error(f"{source}, line {reader.line_num}: unparsable CSV: {exc}",
                    "check the quoting on that line", parameter=parameter) from None
    if not records:
        return None
    (header_line, header), body = records[0], records[1:]
    seen: dict[str, int] = {}
    for column, name in enumerate(header, start=1):
        if not name:
            raise error(
                f"{source}, line {header_line}, column {column}: empty column name",
                "give every column a name",
                parameter=parameter,
            )
        if name.lower() in seen:
            raise error(
                f"{source}, line {header_line}: column '{name}' appears twice "
                f"(columns {seen[name.lower()]} and {column})",
                "rename or remove one of them", parameter=parameter)
        seen[name.lower()] = column
    for line, cells in body:
        if len(cells) > len(header):
            raise error(f"{source}, line {line}: {len(cells)} cells but {len(header)} columns",
                        "quote cells that contain the delimiter", parameter=parameter)
        cells.extend([""] * (len(header) - len(cells)))
    return Table(source, header, header_line, body)


def read_table(
    path: Path, error: type[ConchdbError] = ConchdbError, noun: str = "file", parameter: str | None = None
) -> Table | None:
    """`parse_table` of a UTF-8 file; an unreadable file raises `error` naming it (as `noun`)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                    f"save the {noun} as UTF-8 CSV", parameter=parameter) from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {noun}: {exc.strerror}", "check the path", parameter=parameter) from None
    return parse_table(text, path, error, parameter)
