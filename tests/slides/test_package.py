"""`conchdb.slides` is the light bottom layer: what importing it loads, and what it exports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import conchdb.slides

HEAVY = ("torch", "qdrant_client", "qdrant_edge")


def _loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh interpreter has loaded after running `code`."""
    report = f"import json, sys\nprint(json.dumps([m for m in {modules!r} if m in sys.modules]))\n"
    script = textwrap.dedent(code) + "\n" + report
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_slides_and_using_every_name_loads_no_model_or_store():
    code = """
        import conchdb.slides
        for name in conchdb.slides.__all__:
            getattr(conchdb.slides, name)
    """
    assert _loaded_after(code, HEAVY) == []


def test_reader_workers_do_not_load_the_tissue_or_pyramid_code():
    # workers import conchdb.slides.reader (and with it the package): scikit-image and
    # tifffile stay out until a tissue mask or a pyramid is asked for
    assert _loaded_after("import conchdb.slides.reader", (*HEAVY, "skimage", "tifffile")) == []


def test_every_public_name_resolves_to_its_module():
    for name in conchdb.slides.__all__:
        value = getattr(conchdb.slides, name)
        module = conchdb.slides._EXPORTS[name]
        assert value is getattr(sys.modules[f"conchdb.slides.{module}"], name)
    assert sorted(conchdb.slides._EXPORTS) == sorted(conchdb.slides.__all__)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        conchdb.slides.no_such_name  # noqa: B018
