"""The one store interface: both backends implement it, and query arguments go by name."""

from __future__ import annotations

import inspect
import json

import pytest

from conchdb.store import Store, StoreTuning
from conchdb.store.edge import EdgeStore
from conchdb.store.server import ServerStore


@pytest.mark.parametrize("backend", [EdgeStore, ServerStore])
def test_both_backends_implement_the_whole_interface(backend):
    assert issubclass(backend, Store) and not inspect.isabstract(backend)
    for name in ("ensure_collection", "upsert", "delete", "query", "query_groups", "count", "retrieve", "scroll"):
        wanted = list(inspect.signature(getattr(Store, name)).parameters.values())
        got = list(inspect.signature(getattr(backend, name)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in got] == [(p.name, p.kind, p.default) for p in wanted], name


@pytest.mark.parametrize("method", ["query", "query_groups"])
def test_everything_after_the_query_vector_is_passed_by_name(method):
    params = list(inspect.signature(getattr(Store, method)).parameters.values())
    assert [p.name for p in params[:3]] == ["self", "name", "vector"]
    assert params[3:] and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])


def test_a_store_without_the_engine_hooks_cannot_be_made():
    class Half(Store):
        location = "nowhere"

    with pytest.raises(TypeError, match="abstract"):
        Half()


def test_the_tuning_reaches_the_engine(tmp_path):
    from conchdb.store import CollectionSpec

    with EdgeStore(tmp_path / "s", tuning=StoreTuning(hnsw_m=8, hnsw_ef_construct=40, quantization=False)) as store:
        store.ensure_collection(CollectionSpec("tiles", 8))
    config = json.loads((tmp_path / "s" / "collections" / "tiles" / "shard" / "edge_config.json").read_text())
    assert (config["hnsw_config"]["m"], config["hnsw_config"]["ef_construct"]) == (8, 40)
    assert config.get("quantization_config") is None
