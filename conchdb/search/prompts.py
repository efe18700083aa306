"""Text prompts: templates, class definitions, and their averaged text vectors.

CONCH's zero-shot results come from prompt ensembles: each class is described by several
names, each put into several sentence templates, and the class vector is the normalized
mean of all those sentences' vectors. The same averaging serves a free-text search with
`--ensemble`, where the query is the only "class name".

Prompt files follow the layout of the `prompts/*.json` files published with CONCH: an
object of prompt sets (keys "0", "1", ...), each with `classnames` (class -> list of
names) and `templates` (sentences holding the placeholder `CLASSNAME`). A bare set
(an object with `classnames` and `templates`) is accepted too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from conchdb.errors import QueryError

PLACEHOLDER = "CLASSNAME"

TEMPLATES: tuple[str, ...] = (
    "CLASSNAME.",
    "an H&E image of CLASSNAME.",
    "an H&E stained section showing CLASSNAME.",
    "a histology image of CLASSNAME.",
    "a microscopy image showing CLASSNAME.",
    "a tissue section with CLASSNAME.",
    "histopathology of CLASSNAME.",
    "a photomicrograph of CLASSNAME.",
    "this slide shows CLASSNAME.",
    "CLASSNAME is seen in this field.",
    "a high-power view of CLASSNAME.",
    "CLASSNAME, hematoxylin and eosin.",
)
"""CONCH-style sentence templates, written for conchdb; `CLASSNAME` is replaced by a name."""


class TextEncoder(Protocol):
    """What prompt averaging needs from `conchdb.model.Encoder`."""

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class ClassPrompts:
    """One class: its label and the sentences whose vectors are averaged into its vector."""

    label: str
    prompts: tuple[str, ...]


def fill(templates: Sequence[str], name: str) -> list[str]:
    """`name` put into every template."""
    return [t.replace(PLACEHOLDER, name) for t in templates]


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows left as they are)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def ensemble_vector(encoder: TextEncoder, texts: Sequence[str]) -> np.ndarray:
    """The normalized mean of the texts' normalized vectors: one direction for all of them."""
    return normalize(encoder.encode_texts(list(texts)).mean(axis=0))


def class_vectors(encoder: TextEncoder, classes: Sequence[ClassPrompts]) -> np.ndarray:
    """(C, 512) class vectors, all prompts embedded in one batch run."""
    texts = [p for c in classes for p in c.prompts]
    vectors = encoder.encode_texts(texts)
    out, start = [], 0
    for c in classes:
        out.append(normalize(vectors[start : start + len(c.prompts)].mean(axis=0)))
        start += len(c.prompts)
    return np.stack(out).astype(np.float32)


def classes_from_labels(labels: Sequence[str], ensemble: bool = False) -> list[ClassPrompts]:
    """Classes named on the command line: each label as it is, or put into `TEMPLATES`."""
    cleaned = [label.strip() for label in labels]
    if len(cleaned) < 2:
        raise QueryError(
            "zero-shot classification needs at least two classes", fix="give two or more labels", parameter="labels"
        )
    if any(not label for label in cleaned):
        raise QueryError("a label is empty", fix="give each class a name, e.g. 'tumor'", parameter="labels")
    if len(set(cleaned)) != len(cleaned):
        raise QueryError("the same label is given twice", fix="give each class once", parameter="labels")
    return [ClassPrompts(label, tuple(fill(TEMPLATES, label)) if ensemble else (label,)) for label in cleaned]


def _prompt_sets(data: Any, path: Path) -> list[dict[str, Any]]:
    if isinstance(data, dict) and "classnames" in data:
        return [data]
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return list(data.values())
    raise QueryError(
        f"{path}: not a CONCH prompt file",
        fix='expected {"0": {"classnames": {"CLASS": ["name", ...]}, "templates": ["an image of CLASSNAME.", ...]}}',
        parameter="prompts",
    )


def _strings(value: Any, what: str, path: Path) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise QueryError(f"{path}: {what} must be a non-empty list of non-empty strings", parameter="prompts")
    return [v.strip() for v in value]


def load_prompt_file(path: str | Path) -> list[ClassPrompts]:
    """Classes from a CONCH-format prompt file; several sets add their sentences to the same classes."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QueryError(f"prompt file not found: {path}", fix="check the path", parameter="prompts") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QueryError(
            f"{path}: cannot read it as JSON: {exc}", fix="give a CONCH prompts/*.json file", parameter="prompts"
        ) from None
    prompts: dict[str, list[str]] = {}
    for number, prompt_set in enumerate(_prompt_sets(data, path)):
        names = prompt_set.get("classnames")
        if not isinstance(names, dict) or len(names) < 2:
            raise QueryError(
                f"{path}: set {number}: `classnames` must map at least two classes to their names", parameter="prompts"
            )
        templates = _strings(prompt_set.get("templates", [PLACEHOLDER]), f"set {number}: `templates`", path)
        missing = [t for t in templates if PLACEHOLDER not in t]
        if missing:
            raise QueryError(
                f"{path}: set {number}: template {missing[0]!r} has no {PLACEHOLDER}",
                fix=f"write {PLACEHOLDER} where the class name goes",
                parameter="prompts",
            )
        if prompts and set(names) != set(prompts):
            raise QueryError(
                f"{path}: set {number} names other classes than set 0",
                fix="use the same class keys",
                parameter="prompts",
            )
        for label, synonyms in names.items():
            for name in _strings(synonyms, f"set {number}: the names of class {label!r}", path):
                prompts.setdefault(label, []).extend(fill(templates, name))
    return [ClassPrompts(label, tuple(texts)) for label, texts in prompts.items()]
