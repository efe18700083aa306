"""A texts collection: captions, report sentences or terms that image -> text ranks.

`conchdb texts add FILE` reads a .txt file (one text per line) or a CSV file (a `text`
column, every other column kept as typed metadata), embeds the texts and upserts them.
A text's id depends on the text alone, so adding a file twice, or two files that share a
sentence, stores each text once; the last file's metadata wins.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conchdb.errors import ConchdbError
from conchdb.ingest.manifest import convert, infer_type
from conchdb.store import CollectionSpec, FieldType, Point, Store, stable_id

if TYPE_CHECKING:
    from conchdb.model.encoder import Encoder

TEXT_COLUMN = "text"
BATCH = 256
TYPE_NAMES: dict[str, FieldType] = {"int": "integer", "float": "float", "bool": "bool", "string": "keyword"}


def texts_collection(tiles_collection: str) -> str:
    """Name of the texts collection that goes with a tiles collection."""
    return f"{tiles_collection}_texts"


def text_id(text: str) -> str:
    """Deterministic id of a text: the same sentence is one point however often it is added."""
    return stable_id("text", text)


@dataclass
class TextRecord:
    """One text to store, with where it came from and its metadata."""

    text: str
    line: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextFile:
    """The texts of one file and the type of each metadata column."""

    path: Path
    records: list[TextRecord]
    columns: dict[str, str] = field(default_factory=dict)


def _fail(path: Path, problem: str, fix: str | None = None) -> ConchdbError:
    return ConchdbError(
        f"{path}: {problem}",
        fix or "give a .txt file (one text per line) or a CSV with a `text` column",
        parameter="path",
    )


def _read_txt(path: Path, content: str) -> TextFile:
    records = [TextRecord(line.strip(), n) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
    return TextFile(path, records)


def _read_csv(path: Path, content: str) -> TextFile:
    rows = list(csv.reader(content.splitlines()))
    if not rows:
        raise _fail(path, "the file is empty")
    header = [h.strip() for h in rows[0]]
    if TEXT_COLUMN not in header:
        raise _fail(path, f"no `{TEXT_COLUMN}` column (columns: {', '.join(header)})")
    if len(set(header)) != len(header) or any(not h for h in header):
        raise _fail(path, "column names must be unique and non-empty")
    body = [(n, row) for n, row in enumerate(rows[1:], 2) if any(cell.strip() for cell in row)]
    for n, row in body:
        if len(row) != len(header):
            raise _fail(path, f"line {n} has {len(row)} cells, the header {len(header)}")
    names = [h for h in header if h != TEXT_COLUMN]
    columns = {h: infer_type([row[header.index(h)].strip() for _, row in body]) for h in names}
    records = []
    for n, row in body:
        cells = dict(zip(header, (c.strip() for c in row), strict=True))
        if not cells[TEXT_COLUMN]:
            raise _fail(path, f"line {n}: the `{TEXT_COLUMN}` cell is empty")
        meta = {h: convert(cells[h], kind) for h, kind in columns.items() if cells[h]}
        records.append(TextRecord(cells[TEXT_COLUMN], n, meta))
    return TextFile(path, records, columns)


def read_text_file(path: str | Path) -> TextFile:
    """The texts of a .txt or .csv file; anything unreadable is an error naming the file."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise _fail(path, "no such file", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot read it as UTF-8 text: {exc}") from None
    texts = _read_csv(path, content) if path.suffix.lower() == ".csv" else _read_txt(path, content)
    if not texts.records:
        raise _fail(path, "holds no texts")
    clash = {"source", "line"} & set(texts.columns)
    if clash:
        raise _fail(path, f"column(s) {', '.join(sorted(clash))} are reserved", "rename those columns")
    return texts


def batches(records: list[TextRecord], size: int = BATCH) -> Iterator[list[TextRecord]]:
    for start in range(0, len(records), size):
        yield records[start : start + size]


def add_texts(texts: TextFile, encoder: Encoder, store: Store, collection: str) -> int:
    """Embed and upsert every text of `texts`; returns how many distinct texts were written.

    The collection is created on first use with the encoder's description (its fingerprint
    guards against mixing models), with indexes on `source` and on the CSV's columns.
    """
    fields: dict[str, FieldType] = {"source": "keyword", "line": "integer"}
    fields.update({name: TYPE_NAMES[kind] for name, kind in texts.columns.items()})
    metadata = {**encoder.describe(), "kind": "texts"}
    store.ensure_collection(CollectionSpec(collection, encoder.dim, metadata, fields))
    written: set[str] = set()
    for chunk in batches(texts.records):
        vectors = encoder.encode_texts([r.text for r in chunk])
        points = {}
        for record, vector in zip(chunk, vectors, strict=True):
            payload = {"text": record.text, "source": texts.path.name, "line": record.line, **record.metadata}
            points[text_id(record.text)] = Point(text_id(record.text), vector, payload)
        store.upsert(collection, list(points.values()))
        written.update(points)
    return len(written)
