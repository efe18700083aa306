"""What only the server store does: bulk-load HNSW switching, quantization, server errors."""

from __future__ import annotations

import pytest
from qdrant_client import QdrantClient, models

from conchdb.errors import StoreError
from conchdb.store import StoreTuning, open_store
from conchdb.store.server import META_KEY, ServerStore
from tests.store.conftest import QUIET_LOCAL_MODE, make_data, spec

pytestmark = QUIET_LOCAL_MODE


@pytest.fixture
def client() -> QdrantClient:
    return QdrantClient(":memory:")


def test_bulk_load_starts_without_hnsw_and_switches_it_on(client, monkeypatch):
    # Local mode reports its default HNSW config whatever was asked for, so the requests are checked.
    asked, updated = {}, {}
    create, update = client.create_collection, client.update_collection
    monkeypatch.setattr(client, "create_collection", lambda *a, **kw: asked.update(kw) or create(*a, **kw))
    monkeypatch.setattr(client, "update_collection", lambda *a, **kw: updated.update(kw) or update(*a, **kw))
    store = ServerStore(client=client, tuning=StoreTuning(hnsw_m=24))
    store.ensure_collection(spec("tiles"))
    assert asked["hnsw_config"].m == 0
    assert isinstance(asked["quantization_config"], models.ScalarQuantization)
    config = client.get_collection("tiles").config
    assert config.metadata[META_KEY]["metadata"]["model_fingerprint"] == spec("tiles").metadata["model_fingerprint"]
    store.upsert("tiles", make_data(n=10).points())
    store.finish_bulk_load("tiles")
    assert updated["hnsw_config"].m == 24


def test_filtered_searches_ask_for_acorn_a_wider_beam_and_exact_small_sets(client, monkeypatch):
    """Local mode searches exhaustively whatever it is asked, so what is asked of a server is checked."""
    from conchdb.store import Condition, Filter

    asked: list = []
    query, batch, create = client.query_points, client.query_batch_points, client.create_collection
    monkeypatch.setattr(client, "query_points", lambda *a, **kw: asked.append(kw["search_params"]) or query(*a, **kw))
    monkeypatch.setattr(client, "query_batch_points",
                        lambda *a, **kw: asked.extend(r.params for r in kw["requests"]) or batch(*a, **kw))
    made: dict = {}
    monkeypatch.setattr(client, "create_collection", lambda *a, **kw: made.update(kw) or create(*a, **kw))
    store = ServerStore(client=client, tuning=StoreTuning(hnsw_ef=100, hnsw_ef_filtered=300, hnsw_ef_acorn=200))
    store.ensure_collection(spec("tiles"))  # site is a graph field: its values have links of their own
    store.upsert("tiles", make_data(n=20).points())
    lung = Filter((Condition("site", "eq", "lung"),))
    lung_or_colon = Filter((Condition("site", "ne", "breast"), Condition("site", "ne", "skin")))
    lung_tissue = Filter((Condition("site", "eq", "lung"), Condition("tissue", "gte", 0.5)))
    vector = make_data(n=1).vectors[0]
    store.query("tiles", vector, k=5)
    store.query("tiles", vector, k=5, flt=lung)
    store.query("tiles", vector, k=400, offset=100, flt=lung)
    store.query("tiles", vector, k=5, flt=lung_or_colon)
    store.query("tiles", vector, k=5, flt=lung_tissue)
    store.query_batch("tiles", make_data(n=3).vectors, k=5, flts=[None, lung, lung_tissue])
    assert [p.hnsw_ef for p in asked] == [100, 300, 500, 300, 200, 100, 300, 200]
    # ACORN where no one field's links cover the filter
    assert [p.acorn.enable for p in asked] == [False, False, False, False, True, False, False, True]
    assert all(p.acorn.max_selectivity == 1.0 for p in asked)
    assert made["hnsw_config"].full_scan_threshold == StoreTuning().full_scan_kb


def test_quantization_can_be_switched_off(client):
    ServerStore(client=client, tuning=StoreTuning(quantization=False)).ensure_collection(spec("tiles"))
    assert client.get_collection("tiles").config.quantization_config is None


def test_a_second_writer_joins_an_existing_collection(client):
    ServerStore(client=client).ensure_collection(spec("tiles"))
    other = ServerStore(client=client)
    other.ensure_collection(spec("tiles"))
    with pytest.raises(StoreError, match="fingerprint"):
        other.ensure_collection(spec("tiles", fingerprint="sha256:b"))


def test_collections_not_made_by_conchdb_are_left_alone(client):
    client.create_collection("theirs", vectors_config=models.VectorParams(size=32, distance=models.Distance.COSINE))
    store = ServerStore(client=client)
    store.ensure_collection(spec("ours"))
    assert store.collections() == ["ours"]
    with pytest.raises(StoreError, match="not created by conchdb"):
        store.ensure_collection(spec("theirs"))


def test_passed_client_stays_open(client):
    ServerStore(client=client).close()
    assert client.get_collections().collections == []


def test_unreachable_server_is_a_store_error_with_the_fix():
    with pytest.raises(StoreError, match="cannot reach Qdrant server http://127.0.0.1:9") as err:
        open_store(qdrant_url="http://127.0.0.1:9")
    assert err.value.parameter == "qdrant_url" and "CONCHDB_QDRANT_URL" in err.value.fix


def test_only_graph_fields_get_per_value_hnsw_links(client, monkeypatch):
    schemas = {}
    create = client.create_payload_index

    def spy(name, key, field_schema=None, **kw):
        schemas[key] = field_schema
        return create(name, key, field_schema=field_schema, **kw)

    monkeypatch.setattr(client, "create_payload_index", spy)
    ServerStore(client=client).ensure_collection(spec("tiles"))
    assert {k for k, v in schemas.items() if v.enable_hnsw} == {"slide_id", "site", "flag"}
    assert isinstance(schemas["x"], models.IntegerIndexParams)


def test_a_cluster_collection_gets_the_shards_and_replicas_asked_for(client, monkeypatch):
    asked = {}
    create = client.create_collection
    monkeypatch.setattr(client, "create_collection", lambda *a, **kw: asked.update(kw) or create(*a, **kw))
    ServerStore(client=client, shard_number=6, replication_factor=2).ensure_collection(spec("tiles"))
    assert (asked["shard_number"], asked["replication_factor"]) == (6, 2)
