"""Reading text files for `conchdb texts add`."""

from __future__ import annotations

import pytest

from conchdb.errors import ConchdbError
from conchdb.search.texts import read_text_file, text_id


def test_txt_one_text_per_line(tmp_path):
    file = tmp_path / "t.txt"
    file.write_text("\ufefffirst caption\n\n  second caption  \n")
    texts = read_text_file(file)
    assert [(r.text, r.line) for r in texts.records] == [("first caption", 1), ("second caption", 3)]
    assert texts.columns == {}


def test_csv_metadata_is_typed_and_empty_cells_left_out(tmp_path):
    file = tmp_path / "t.csv"
    file.write_text('id,text,grade,score,flag\n007,"a, b",2,0.5,yes\n008,c,,1,no\n')
    texts = read_text_file(file)
    assert texts.columns == {"id": "string", "grade": "int", "score": "float", "flag": "bool"}
    assert texts.records[0].text == "a, b"
    assert texts.records[0].metadata == {"id": "007", "grade": 2, "score": 0.5, "flag": True}
    assert texts.records[1].metadata == {"id": "008", "score": 1.0, "flag": False}


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("a.csv", "text,organ\nx,y,z\n", "line 2: 3 cells but 2 columns"),
        ("a.csv", 'text,organ\n"x,colon\n', r"line \d+: unparsable CSV"),
        ("a.csv", "text,Organ,organ\nx,y,z\n", "column 'organ' appears twice"),
        ("a.csv", "text,source\nx,y\n", "reserved"),
        ("a.csv", "text,organ\n,colon\n", "cell is empty"),
        ("a.csv", "", "empty"),
        ("a.txt", "   \n", "holds no texts"),
        ("missing.txt", None, "no such file"),
    ],
)
def test_bad_text_files(tmp_path, name, content, words):
    file = tmp_path / name
    if content is not None:
        file.write_text(content)
    with pytest.raises(ConchdbError, match=words):
        read_text_file(file)


def test_text_ids_depend_on_the_text_only():
    assert text_id("tumor") == text_id("tumor") != text_id("Tumor")


def test_csv_is_read_by_the_manifest_rules(tmp_path):
    """Delimiter from the header, quoted line breaks, short rows padded, column names in any case."""
    file = tmp_path / "t.csv"
    file.write_text('\nText;organ;grade\n"two\nlines";colon;2\nshort\n')
    texts = read_text_file(file)
    assert [(r.text, r.line, r.metadata) for r in texts.records] == [
        ("two\nlines", 4, {"organ": "colon", "grade": 2}), ("short", 5, {}),
    ]
    assert texts.columns == {"organ": "string", "grade": "int"}
