"""A texts collection: captions, report sentences or terms that image -> text ranks.

`conchdb texts add FILE` reads a .txt file (one text per line) or a CSV file (a `text`
column, every other column kept as typed metadata, read by the rules of
`conchdb.tabular`, as manifests are), embeds the texts and upserts them.
A text's id depends on the text alone, so adding a file twice, or two files that share a
sentence, stores each text once; the last file's metadata wins.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conchdb.catalog import TEXT_RESERVED, texts_layout
from conchdb.errors import ConchdbError
from conchdb.store import CollectionSpec, Point, Store, stable_id
from conchdb.tabular import ColumnType, parse_table

if TYPE_CHECKING:
    from conchdb.model.encoder import Encoder

TEXT_COLUMN = "text"
BATCH = 256

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
    columns: dict[str, ColumnType] = field(default_factory=dict)


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
    table = parse_table(content, path, parameter="path")
    if table is None:
        raise _fail(path, "the file is empty")
    text_col = table.index(TEXT_COLUMN)
    if text_col is None:
        raise _fail(path, f"no `{TEXT_COLUMN}` column (columns: {', '.join(table.header)})")
    kinds = table.column_types([i for i in range(len(table.header)) if i != text_col])
    records = []
    for n, cells in table.rows:
        if not cells[text_col]:
            raise _fail(path, f"line {n}: the `{TEXT_COLUMN}` cell is empty")
        records.append(TextRecord(cells[text_col], n, table.typed(cells, kinds)))
    return TextFile(path, records, {table.header[i]: kind for i, kind in kinds.items()})


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
    clash = TEXT_RESERVED & set(texts.columns)
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
    metadata = {**encoder.describe(), "kind": "texts"}
    layout = asdict(texts_layout(texts.columns))
    store.ensure_collection(CollectionSpec(collection, encoder.dim, metadata, **layout, model_aliases=encoder.aliases))
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
