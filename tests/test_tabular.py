"""Typed CSV: the one set of reading rules, the one list of boolean words, value types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conchdb.errors import ConchdbError
from conchdb.ingest.cohort import discover
from conchdb.ingest.manifest import read_manifest
from conchdb.search.filters import FieldTypes, parse_where
from conchdb.search.texts import read_text_file
from conchdb.store import Condition, Filter
from conchdb.store.filters import Dialect, translate
from conchdb.tabular import BOOLEAN_WORDS, convert, infer_type, parse_bool, parse_table, value_type

WORDS = [*BOOLEAN_WORDS, *(w.upper() for w in BOOLEAN_WORDS if not w.isdigit())]
# A dialect that spells filters as tuples, to see the values the store would be given.
RECORDING = Dialect(
    match=lambda key, value: ("match", key, value),
    match_any=lambda key, values: ("any", key, values),
    range=lambda key, bounds: ("range", key, bounds),
    is_empty=lambda key: ("empty", key),
    filter=lambda must, must_not, should: (must, must_not, should),
)


@pytest.mark.parametrize("word", WORDS)
def test_one_list_of_boolean_words_for_manifests_texts_and_both_filter_parsers(tmp_path: Path, word: str):
    truth = BOOLEAN_WORDS[word.lower()]
    (tmp_path / "a.svs").write_bytes(b"a")
    (tmp_path / "b.svs").write_bytes(b"b")
    (tmp_path / "manifest.csv").write_text(f"slide,flag\na.svs,{word}\nb.svs,true\n")
    manifest = read_manifest(None, discover(tmp_path))
    assert manifest.columns["flag"] == "bool" and manifest.payload_for("a.svs") == {"flag": truth}

    (tmp_path / "t.csv").write_text(f"text,flag\nfirst,{word}\nsecond,true\n")
    texts = read_text_file(tmp_path / "t.csv")
    assert texts.columns == {"flag": "bool"} and texts.records[0].metadata == {"flag": truth}

    assert parse_where([f"flag={word}"], FieldTypes({"flag": "bool"})).must == (Condition("flag", "eq", truth),)
    must, _, _ = translate(Filter((Condition("flag", "eq", word),)), RECORDING, {"flag": "bool"})
    assert must == [("match", "flag", truth)]


def test_other_words_are_no_booleans_anywhere():
    assert parse_bool("maybe") is None and parse_bool("y") is None and parse_bool("") is None
    assert infer_type(["yes", "maybe"]) == "string"
    with pytest.raises(ConchdbError, match="not a bool"):
        parse_where(["flag=maybe"], FieldTypes({"flag": "bool"}))
    with pytest.raises(ConchdbError, match="not a bool"):
        translate(Filter((Condition("flag", "eq", "maybe"),)), RECORDING, {"flag": "bool"})


def test_an_untyped_filter_value_is_read_as_a_cell_would_be():
    assert parse_where(["seen=yes", "n=7", "site=lung"]).must == (
        Condition("seen", "eq", True), Condition("n", "eq", 7), Condition("site", "eq", "lung"),
    )


@pytest.mark.parametrize(
    ("cells", "kind"),
    [
        (["1", "-2", ""], "int"),
        (["0", "1", "1"], "int"),  # numbers before booleans
        (["1", "2.5", "1e3"], "float"),
        (["007", "12"], "string"),  # identifiers keep their zeros
        (["nan", "1.0"], "string"),
        (["yes", "0", "FALSE"], "bool"),
        (["", ""], "string"),
    ],
)
def test_a_column_gets_the_narrowest_type_of_its_cells(cells, kind):
    assert infer_type(cells) == kind
    assert all(convert(c, kind) is not None for c in cells if c)


def test_values_of_each_field_type_numpy_scalars_included():
    assert [value_type(v) for v in (True, np.bool_(False), 3, np.int64(3), 0.5, np.float32(0.5), "x")] == [
        "bool", "bool", "integer", "integer", "float", "float", "keyword",
    ]
    assert value_type(None) is None and value_type([1]) is None and value_type({"a": 1}) is None


def test_one_reading_rule_set(tmp_path: Path):
    text = '\n\ntext;Note;n\n"two\nlines";a;1\n\nshort\n'
    table = parse_table(text, tmp_path / "x.csv")
    assert table is not None
    assert table.header == ["text", "Note", "n"] and table.header_line == 3
    assert table.rows == [(5, ["two\nlines", "a", "1"]), (7, ["short", "", ""])]  # line where a record ends
    assert table.index("note") == 1 and table.index("NOTE") == 1 and table.index("other") is None
    kinds = table.column_types([1, 2])
    assert kinds == {1: "string", 2: "int"}
    assert [table.typed(cells, kinds) for _, cells in table.rows] == [{"Note": "a", "n": 1}, {}]
    assert parse_table("\n  \n", tmp_path / "x.csv") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b\n1,2,3\n", r"x\.csv, line 2: 3 cells but 2 columns"),
        ("a,A\n", r"line 1: column 'A' appears twice"),
        ("a,,b\n", r"line 1, column 2: empty column name"),
        ('a,b\n1,"open\n', r"unparsable CSV"),
    ],
)
def test_malformed_tables_raise_the_callers_error(tmp_path: Path, text: str, message: str):
    class OwnError(ConchdbError):
        pass

    with pytest.raises(OwnError, match=message) as caught:
        parse_table(text, tmp_path / "x.csv", OwnError)
    assert caught.value.fix
