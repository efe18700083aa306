"""Search: text -> image, image -> image and image -> text over a conchdb store.

`Searcher` is the entry point shared by the CLI, the HTTP API and notebooks; the modules
beside it each do one job (filter parsing, prompts, vocabulary, zero-shot maths, slide
pixels, export, heatmaps) and can be used on their own.
"""

from conchdb.search.filters import GRAMMAR, FieldTypes, parse_where
from conchdb.search.prompts import ClassPrompts, classes_from_labels, load_prompt_file
from conchdb.search.searcher import Searcher, SearchHit, TextMatch

__all__ = [
    "GRAMMAR",
    "ClassPrompts",
    "FieldTypes",
    "SearchHit",
    "Searcher",
    "TextMatch",
    "classes_from_labels",
    "load_prompt_file",
    "parse_where",
]
