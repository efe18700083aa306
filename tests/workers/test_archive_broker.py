"""A rerun through `ingest --broker` brings the store up to date like an in-process rerun: the
dispatcher relabels, moves and reports missing slides itself, and no slide goes to a worker."""

from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pytest
from PIL import Image

from conchdb.catalog import slides_collection
from conchdb.ingest.cohort import discover
from conchdb.ingest.manifest import read_manifest
from conchdb.ingest.pipeline import IngestOptions
from conchdb.store import Condition, Filter
from conchdb.store.edge import EdgeStore
from conchdb.workers.broker import BrokerError
from conchdb.workers.dispatch import BrokerIngest, BrokerOptions
from conchdb.workers.status import ALIASES, online_workers
from tests.workers.conftest import BATCH

COLLECTION = "conch_tiles"
OPTIONS = IngestOptions(batch_size=BATCH, readers=1)


def _rerun(root, store_path, url, **opts) -> dict:
    found = discover(root)
    store = EdgeStore(store_path)
    try:
        run = BrokerIngest(found, read_manifest(None, found), store, COLLECTION, OPTIONS, BrokerOptions(url, **opts))
        return run.run().to_dict()
    finally:
        store.close()


def _points(store_path) -> dict:
    store = EdgeStore(store_path)
    try:
        return {h.id: (h.payload, h.vector) for h in store.scroll(COLLECTION, with_vectors=True)}
    finally:
        store.close()


def test_relabel_move_and_missing_through_the_broker(redis_server, workers, cohort, tmp_path):
    workers.ensure(1)
    root = tmp_path / "cohortW"
    shutil.copytree(cohort, root)
    (root / "unreadable.svs").unlink()
    store = tmp_path / "store"
    first = _rerun(root, store, redis_server.url)
    assert first["ingested"] == 2
    before = _points(store)
    (root / "manifest.csv").write_text(textwrap.dedent("""\
        slide,patient_id,grade,diagnosis
        cmu_small_region.svs,P001,3,melanoma
        boxes.png,P002,1,normal
        """))
    (root / "sub").mkdir()
    (root / "cmu_small_region.svs").rename(root / "sub" / "cmu_small_region.svs")
    (root / "boxes.png").unlink()
    # No worker serves this queue: a rerun with nothing to embed needs none.
    again = _rerun(root, store, redis_server.url, queue="nobody-here", worker_wait_s=1.0)
    assert again["tiles_written"] == 0 and again["ingested"] == 0
    assert [(m["from"], m["to"]) for m in again["moved"]] == [("cmu_small_region.svs", "sub/cmu_small_region.svs")]
    assert again["relabelled"] == ["sub/cmu_small_region.svs"]
    assert [m["slide_id"] for m in again["missing"]] == ["boxes.png"]
    after = _points(store)
    assert after.keys() == before.keys()
    for pid, (payload, vector) in after.items():
        assert np.array_equal(vector, before[pid][1])
        if before[pid][0]["slide_id"] == "cmu_small_region.svs":
            assert (payload["slide_id"], payload["grade"], payload["diagnosis"]) == ("sub/cmu_small_region.svs", 3,
                                                                                     "melanoma")
    opened = EdgeStore(store)
    try:
        assert opened.count(COLLECTION, Filter((Condition("grade", "eq", 2),))) == 0
    finally:
        opened.close()
    # A slide to embed and still no worker: the wait ends in the broker's error, nothing written.
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)).save(root / "new.png")
    with pytest.raises(BrokerError, match="no worker is online on queue 'nobody-here'"):
        _rerun(root, store, redis_server.url, queue="nobody-here", worker_wait_s=1.0)
    assert _points(store).keys() == after.keys()


def test_a_collection_an_earlier_version_fingerprinted_is_taken_up_by_the_workers(redis_server, workers, cohort,
                                                                                  tmp_path):
    """A store written before the fingerprint stopped depending on the thread count records
    the workers' weights under their earlier fingerprint: the run accepts it, renames the
    record, and the workers embed the new slide."""
    workers.ensure(1)
    root = tmp_path / "cohortW"
    shutil.copytree(cohort, root)
    (root / "unreadable.svs").unlink()
    (root / "boxes.png").unlink()
    store_path = tmp_path / "store"
    assert _rerun(root, store_path, redis_server.url)["ingested"] == 1
    model = online_workers(redis_server.client(), "conchdb")[0]["model"]
    earlier = model[ALIASES][0]
    store = EdgeStore(store_path)
    try:
        for name in (COLLECTION, slides_collection(COLLECTION)):
            record = store._read_record(name)
            record.metadata["model_fingerprint"] = earlier  # as the earlier version wrote it
            store._save_record(record)
    finally:
        store.close()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)).save(root / "new.png")
    again = _rerun(root, store_path, redis_server.url)
    assert again["ingested"] == 1 and not again["failed"]
    store = EdgeStore(store_path)
    try:
        for name in (COLLECTION, slides_collection(COLLECTION)):
            assert store.collection_metadata(name)["model_fingerprint"] == model["model_fingerprint"] != earlier
            assert ALIASES not in store.collection_metadata(name)
        assert store.count(COLLECTION, Filter((Condition("slide_id", "eq", "new.png"),))) > 0
    finally:
        store.close()
