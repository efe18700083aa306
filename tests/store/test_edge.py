"""What only the embedded store does: persistence in a folder, the one-process lock, the HNSW build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conchdb.errors import StoreError
from conchdb.store import Condition, Filter, Point, StoreTuning, open_store
from conchdb.store.edge import EdgeStore
from tests.store.conftest import FINGERPRINT, make_data, spec


def test_reopened_store_has_the_same_points_and_metadata(tmp_path):
    data = make_data(n=50)
    with EdgeStore(tmp_path / "s") as store:
        store.ensure_collection(spec("tiles"))
        store.upsert("tiles", data.points())
        before = [h.id for h in store.query("tiles", data.vectors[1], k=5)]
    with EdgeStore(tmp_path / "s") as store:
        assert store.collections() == ["tiles"]
        assert store.collection_metadata("tiles")["model_fingerprint"] == FINGERPRINT
        assert store.count("tiles") == 50
        assert [h.id for h in store.query("tiles", data.vectors[1], k=5)] == before
        assert store.count("tiles", Filter((Condition("flag", "eq", True),))) == sum(p["flag"] for p in data.payloads)
        assert store.size_on_disk() > 0


def test_second_process_is_told_who_holds_the_store(tmp_path):
    path = tmp_path / "s"
    script = textwrap.dedent(
        f"""
        from conchdb.errors import StoreError
        from conchdb.store.edge import EdgeStore
        try:
            EdgeStore({str(path)!r})
        except StoreError as exc:
            print(exc)
            raise SystemExit(3)
        """
    )
    with EdgeStore(path) as store:
        store.ensure_collection(spec("tiles"))
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 3, done.stderr
        assert f"in use by process {os.getpid()}" in done.stdout
        assert "Qdrant server" in done.stdout and "CONCHDB_QDRANT_URL" in done.stdout
        assert "Traceback" not in done.stdout + done.stderr
    # released on close: the next process gets in
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr


def test_second_open_in_the_same_process_is_refused(tmp_path):
    with EdgeStore(tmp_path / "s"), pytest.raises(StoreError, match="this process"):
        EdgeStore(tmp_path / "s")


def test_refuses_a_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(StoreError, match="not a conchdb store"):
        EdgeStore(tmp_path)
    with pytest.raises(StoreError, match="is a file"):
        EdgeStore(tmp_path / "holiday.jpg")


def test_closed_store_says_so(tmp_path):
    store = EdgeStore(tmp_path / "s")
    store.ensure_collection(spec("tiles"))
    store.close()
    store.close()  # twice is fine
    with pytest.raises(StoreError, match="closed"):
        store.count("tiles")


def test_interrupted_creation_is_redone(tmp_path):
    """A shard folder without its record is what a crash during creation leaves."""
    with EdgeStore(tmp_path / "s") as store:
        store.ensure_collection(spec("tiles"))
    (tmp_path / "s" / "collections" / "tiles" / "collection.json").unlink()
    with EdgeStore(tmp_path / "s") as store:
        assert store.collections() == []
        store.ensure_collection(spec("tiles"))
        store.upsert("tiles", make_data(n=5).points())
        assert store.count("tiles") == 5


def test_bulk_load_builds_hnsw_and_keeps_recall(tmp_path):
    """Past the indexing threshold, finish_bulk_load builds HNSW; search stays near-exact, filtered too."""
    rng = np.random.default_rng(7)
    n, dim = 4000, 32
    data = make_data(n=n, dim=dim, seed=3)
    with EdgeStore(tmp_path / "s", tuning=StoreTuning(hnsw_ef=64), indexing_threshold_kb=64) as store:
        store.ensure_collection(spec("tiles"))
        for start in range(0, n, 1000):
            store.upsert("tiles", data.points()[start : start + 1000])
        store.finish_bulk_load("tiles")
        assert store._shard("tiles").info().indexed_vectors_count >= n // 2
        flt = Filter((Condition("site", "eq", "lung"),))
        lung = np.array([p.get("site") == "lung" for p in data.payloads])
        found = total = 0
        for q in rng.normal(size=(20, dim)).astype(np.float32):
            scores = data.scores(q)
            for mask, f in ((None, None), (lung, flt)):
                s = scores if mask is None else np.where(mask, scores, -np.inf)
                want = {data.ids[i] for i in np.argsort(-s)[:10]}
                found += len(want & {h.id for h in store.query("tiles", q, k=10, flt=f)})
                total += 10
        assert found / total >= 0.95


def test_only_graph_fields_get_per_value_hnsw_links(tmp_path):
    with EdgeStore(tmp_path / "s") as store:
        default = spec("tiles")
        store.ensure_collection(default)
        chosen = spec("chosen")
        chosen.graph_fields = ("site",)
        store.ensure_collection(chosen)
        linked = {
            name: {k for k, v in store._shard(name).info().payload_schema.items() if v.params.enable_hnsw}
            for name in ("tiles", "chosen")
        }
    assert linked == {"tiles": {"slide_id", "site", "flag"}, "chosen": {"site"}}


def test_a_bulk_load_defers_the_indexes_it_does_not_filter_on(tmp_path):
    """A new collection is written with only its `load_indexed` fields indexed; finish_bulk_load
    builds the others with their per-value graphs, also when the loading process died first."""
    data = make_data(n=300)
    deferred = spec("tiles")
    deferred.load_indexed = ("slide_id",)
    lung = Filter((Condition("site", "eq", "lung"),))
    want = sum(p.get("site") == "lung" for p in data.payloads)
    with EdgeStore(tmp_path / "s") as store:
        store.ensure_collection(deferred)
        store.upsert("tiles", data.points())
        assert set(store._shard("tiles").info().payload_schema) == {"slide_id"}
        assert store.count("tiles", lung) == want  # meanwhile read from the payloads
    with EdgeStore(tmp_path / "s") as store:  # closed without finishing, as a crashed ingest leaves it
        store.ensure_collection(deferred)
        assert set(store._shard("tiles").info().payload_schema) == {"slide_id"}
        store.finish_bulk_load("tiles")
        schema = store._shard("tiles").info().payload_schema
        assert set(schema) == set(deferred.index_fields())
        assert {k for k, v in schema.items() if v.params.enable_hnsw} == {"slide_id", "site", "flag"}
        assert store.count("tiles", lung) == want
        store.finish_bulk_load("tiles")  # nothing left to build


def test_load_indexed_must_name_indexed_fields(tmp_path):
    bad = spec("tiles")
    bad.indexed, bad.load_indexed = ("slide_id",), ("site",)
    with EdgeStore(tmp_path / "s") as store, pytest.raises(StoreError, match="load_indexed names site"):
        store.ensure_collection(bad)
    assert not (tmp_path / "s" / "collections" / "tiles").exists()


def test_open_store_picks_the_embedded_store_for_a_path(tmp_path):
    store = open_store(store_path=tmp_path / "s")
    try:
        assert isinstance(store, EdgeStore) and str(tmp_path) in store.location
    finally:
        store.close()
    with pytest.raises(StoreError, match="no store given"):
        open_store()


_DIES_BETWEEN_WRITES = """
import os, sys
from conchdb.store.edge import EdgeStore
from conchdb.store import Point
from tests.store.conftest import make_data, spec

path, writes = sys.argv[1], int(sys.argv[2])
points = make_data(n=20).points()
store = EdgeStore(path)
store.ensure_collection(spec("tiles"))
store.upsert("tiles", [Point(p.id, p.vector, {"x": 1}) for p in points], {"slide_id": "s1", "site": "colon"})
store.close()
store = EdgeStore(path)
shard = store._shard("tiles")


class DiesAfter:  # the process is killed after `writes` engine writes: no cleanup runs
    def update(self, operation):
        global writes
        if writes == 0:
            os._exit(9)
        writes -= 1
        shard.update(operation)


store._shards["tiles"] = DiesAfter()
store.upsert("tiles", [Point(p.id, p.vector, {"x": 2}) for p in points], {"slide_id": "s1", "site": "lung"})
"""


@pytest.mark.parametrize("writes", [0, 1])
def test_an_upsert_cut_between_its_writes_lands_whole_or_not_at_all(tmp_path, writes):
    store_path = tmp_path / "s"
    run = subprocess.run(
        [sys.executable, "-c", _DIES_BETWEEN_WRITES, str(store_path), str(writes)],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 9, run.stderr
    note = store_path / "collections" / "tiles" / "pending.json"
    assert note.stat().st_size > 0
    data = make_data(n=20)
    with EdgeStore(store_path) as store:
        payloads = [h.payload for h in store.retrieve("tiles", data.ids)]
    expected = {"x": 1, "site": "colon"} if writes == 0 else {"x": 2, "site": "lung"}
    assert payloads == [{**expected, "slide_id": "s1"}] * 20
    assert note.stat().st_size == 0


class _FailingShard:
    """A shard whose `update` raises on the calls that `fails` picks (counted from 1)."""

    def __init__(self, shard, fails):
        self.shard, self.fails, self.calls = shard, fails, 0

    def update(self, operation):
        self.calls += 1
        if self.fails(self.calls):
            raise RuntimeError("engine error")
        self.shard.update(operation)

    def __getattr__(self, name):
        return getattr(self.shard, name)


def test_an_engine_error_in_the_second_write_still_completes_the_batch(tmp_path):
    data = make_data(n=10)
    with EdgeStore(tmp_path / "s") as store:
        store.ensure_collection(spec("tiles"))
        shard = store._shard("tiles")
        store._shards["tiles"] = _FailingShard(shard, lambda call: call == 2)
        with pytest.raises(RuntimeError):
            store.upsert("tiles", [Point(p.id, p.vector, {"x": 1}) for p in data.points()], {"site": "lung"})
        store._shards["tiles"] = shard
        assert [h.payload for h in store.retrieve("tiles", data.ids)] == [{"x": 1, "site": "lung"}] * 10
    assert (tmp_path / "s" / "collections" / "tiles" / "pending.json").stat().st_size == 0


def test_a_batch_left_half_written_goes_first_in_the_next_upsert(tmp_path):
    """If even completing a batch fails, its note stays, and the next upsert completes it
    before writing its own note over it."""
    data = make_data(n=10)
    points = data.points()
    with EdgeStore(tmp_path / "s") as store:
        store.ensure_collection(spec("tiles"))
        shard = store._shard("tiles")
        store._shards["tiles"] = _FailingShard(shard, lambda call: call > 1)  # only the first write lands
        with pytest.raises(RuntimeError):
            store.upsert("tiles", [Point(p.id, p.vector, {"x": 1}) for p in points[:5]], {"site": "lung"})
        store._shards["tiles"] = shard
        store.upsert("tiles", [Point(p.id, p.vector, {"x": 2}) for p in points[5:]], {"site": "colon"})
        payloads = [h.payload for h in store.retrieve("tiles", data.ids)]
    assert payloads == [{"x": 1, "site": "lung"}] * 5 + [{"x": 2, "site": "colon"}] * 5


def test_a_note_cut_while_being_written_is_dropped(tmp_path):
    data = make_data(n=5)
    with EdgeStore(tmp_path / "s") as store:
        store.ensure_collection(spec("tiles"))
        store.upsert("tiles", data.points())
    pending = tmp_path / "s" / "collections" / "tiles" / "pending.json"
    pending.write_text('{"ids": ["')
    with EdgeStore(tmp_path / "s") as store:
        assert [h.payload for h in store.retrieve("tiles", data.ids)] == data.payloads
    assert pending.stat().st_size == 0


def test_a_record_of_format_1_reads_every_field_as_indexed(tmp_path):
    with EdgeStore(tmp_path / "s") as store:
        store.ensure_collection(spec("tiles"))
    file = tmp_path / "s" / "collections" / "tiles" / "collection.json"
    record = json.loads(file.read_text())
    record["indexes"] = record.pop("fields")
    del record["indexed"]
    file.write_text(json.dumps({**record, "format": 1}))
    with EdgeStore(tmp_path / "s") as store:
        assert store.collection_metadata("tiles")["payload_schema"] == spec("tiles").fields
        store.ensure_collection(spec("tiles"))  # nothing new to index
    assert json.loads(file.read_text())["format"] == 1


def test_an_older_collection_gets_the_new_full_scan_threshold_and_its_next_build_uses_it(tmp_path):
    """A shard made with a lower threshold (older conchdb: 1,000 KB) is opened with the store's
    threshold, recorded in its config; the next finish_bulk_load rebuilds its segments with it."""
    data = make_data(n=1500, seed=5)
    shard = tmp_path / "s" / "collections" / "tiles" / "shard"

    def thresholds() -> set[int]:
        files = shard.glob("segments/*/segment.json")
        options = [json.loads(f.read_text())["config"]["vector_data"][""]["index"] for f in files]
        return {o["options"]["full_scan_threshold"] for o in options if o["type"] == "hnsw"}

    with EdgeStore(tmp_path / "s", tuning=StoreTuning(full_scan_kb=2), indexing_threshold_kb=64) as store:
        store.ensure_collection(spec("tiles"))
        store.upsert("tiles", data.points())
        store.finish_bulk_load("tiles")
    assert thresholds() == {2}
    with EdgeStore(tmp_path / "s", indexing_threshold_kb=64) as store:
        before = [h.id for h in store.query("tiles", data.vectors[3], k=5)]
        config = json.loads((shard / "edge_config.json").read_text())
        assert config["hnsw_config"]["full_scan_threshold"] == StoreTuning().full_scan_kb
        assert config["quantization_config"]  # kept as it was
        store.finish_bulk_load("tiles")
        assert thresholds() == {StoreTuning().full_scan_kb}
        assert [h.id for h in store.query("tiles", data.vectors[3], k=5)] == before
        assert store.count("tiles") == 1500


def test_warm_reads_the_collection_files_and_the_store_answers_as_before(tmp_path):
    data = make_data(n=300)
    with EdgeStore(tmp_path / "s") as store:
        store.ensure_collection(spec("tiles"))
        store.upsert("tiles", data.points())
        store.finish_bulk_load("tiles")
    with EdgeStore(tmp_path / "s") as store:
        assert store.warm("tiles") > 300 * 32 * 4  # every file of the shard, the vectors among them
        assert store.query("tiles", data.vectors[4], k=1)[0].id == data.ids[4]
        with pytest.raises(StoreError, match="no collection|does not exist"):
            store.warm("nothing")
