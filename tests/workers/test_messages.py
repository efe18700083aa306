"""What travels through the broker, and the Celery settings for long tasks (no Redis needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import qdrant_client.http.exceptions as qdrant_errors
import redis

from conchdb.catalog import SlideStatus
from conchdb.errors import ConchdbError, SlideError, StoreError
from conchdb.ingest.cohort import CohortSlide
from conchdb.ingest.pipeline import SlideJob
from conchdb.slides.grid import TilingParams
from conchdb.slides.tissue import TissueParams
from conchdb.workers.app import make_app
from conchdb.workers.broker import is_transient, redact
from conchdb.workers.messages import (
    Batch,
    Embedded,
    Finished,
    MessageError,
    SlideTask,
    Started,
    decode_event,
    event_from_dict,
)


def _job() -> SlideJob:
    slide = CohortSlide("a/b.svs", Path("/slides/a/b.svs"), "sha:1", (Path("/slides/a/b.svs"),))
    params = TilingParams(0.25, 224, 112, 0.4, TissueParams(mask_mpp=4.0))
    return SlideJob(slide, "cohort", "run1", params, {"grade": 2, "frozen": False}, 0.26, "manifest", 16, 3)


def test_a_slide_task_survives_json():
    task = SlideTask(job=_job(), collection="tiles", fingerprint="sha256:ab", previous="failed",
                     qdrant_url="http://q:6333", sent_before=2)
    back = SlideTask.from_dict(json.loads(json.dumps(task.to_dict())))
    assert back == task and back.job.tiling == task.job.tiling and back.job.tiling.key == "0.25um-224px-s112"
    assert back.job.params.tissue == TissueParams(mask_mpp=4.0)


def test_tiling_params_from_dict_is_the_inverse_of_to_dict():
    params = TilingParams(0.25, 224, 112, 0.4, TissueParams(mask_mpp=4.0, hysteresis=0.7))
    assert TilingParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params
    doc = params.to_dict()
    del doc["stride_px"]
    with pytest.raises(ConchdbError, match="missing stride_px"):
        TilingParams.from_dict(doc)
    doc = params.to_dict()
    doc["tissue"]["gamma"] = 2
    with pytest.raises(ConchdbError, match=r"tiling\.tissue: unknown gamma"):
        TilingParams.from_dict(doc)


def test_a_message_with_a_field_missing_or_unknown_is_refused_naming_it():
    doc = SlideTask(job=_job(), collection="tiles", fingerprint="f").to_dict()
    del doc["fingerprint"]
    with pytest.raises(MessageError, match="slide task: missing fingerprint"):
        SlideTask.from_dict(doc)
    doc = SlideTask(job=_job(), collection="tiles", fingerprint="f").to_dict()
    doc["job"]["priority"] = 1
    with pytest.raises(MessageError, match="slide job: unknown priority"):
        SlideTask.from_dict(doc)
    doc = SlideTask(job=_job(), collection="tiles", fingerprint="f").to_dict()
    doc["job"]["params"]["tile_px"] = "big"
    del doc["job"]["params"]["tissue"]
    with pytest.raises(MessageError, match="missing tissue"):
        SlideTask.from_dict(doc)
    with pytest.raises(MessageError, match="unknown kind 'paused'"):
        event_from_dict({"kind": "paused", "task": "t"})
    with pytest.raises(MessageError, match="progress event: missing n"):
        event_from_dict({"kind": "progress", "task": "t"})
    with pytest.raises(MessageError, match="expected a JSON object"):
        SlideTask.from_dict(["job"])


def test_every_event_survives_json():
    mean = np.arange(512, dtype=np.float32) / 512
    events = [
        Started(task="t", tiles=12, size=1024, info={"mpp": 0.25, "width": 5}),
        Started(task="t", tiles=12),
        Embedded(task="t", n=2),
        Finished(task="t", status=SlideStatus.DONE, tiles=12, info={"mpp": 0.25}, mean=mean),
        Finished(task="t", status=SlideStatus.FAILED, error="a.svs: Bogus marker length", recorded=True),
        Finished(task="t", status=SlideStatus.NO_TISSUE),
    ]
    for event in events:
        back = decode_event(event.encode())
        assert type(back) is type(event) and back.task == "t"
        for name, value in vars(event).items():
            got = getattr(back, name)
            assert np.array_equal(got, value) if isinstance(value, np.ndarray) else got == value, name
    assert json.loads(events[3].encode())["kind"] == "done"
    with pytest.raises(MessageError, match="cannot finish as 'in_progress'"):
        Finished(task="t", status=SlideStatus.IN_PROGRESS)


def test_a_batch_survives_json_bit_for_bit():
    rng = np.random.default_rng(0)
    tiles = [{"x": i, "y": 2 * i, "tissue": 0.5} for i in range(3)]
    vectors = rng.normal(size=(3, 512)).astype(np.float32)
    back = decode_event(Batch(task="task", tiles=tiles, vectors=vectors).encode())
    assert isinstance(back, Batch) and back.tiles == tiles
    assert back.vectors.dtype == np.float32 and np.array_equal(back.vectors, vectors)
    with pytest.raises(MessageError, match="a batch of 3 tiles came with 2 vectors"):
        Batch(task="task", tiles=tiles, vectors=vectors[:2])


def test_long_task_settings():
    conf = make_app("redis://127.0.0.1:1/0", "gpu", 7200).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 7200
    assert conf.task_default_queue == "gpu" and conf.accept_content == ["json"]


def test_only_unreachable_services_are_transient():
    assert is_transient(redis.ConnectionError("down"))
    wrapped = StoreError("cannot reach http://qdrant:6333")
    wrapped.__cause__ = qdrant_errors.ResponseHandlingException(OSError("refused"))
    assert is_transient(wrapped)
    assert not is_transient(SlideError("/s.svs: Bogus marker length"))
    assert not is_transient(ValueError("bad"))


def test_passwords_never_printed():
    assert redact("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_heartbeat_carries_the_workers_aliases_and_a_collection_records_none():
    """Workers of this version recognise a collection an earlier version fingerprinted
    (the same weights), and what the run records of their model is the fingerprint alone."""
    from conchdb.model.conch import ConchModel
    from conchdb.model.config import ConchConfig
    from conchdb.model.encoder import Encoder
    from conchdb.workers.dispatch import RemoteModel
    from conchdb.workers.status import ALIASES, heartbeat_model

    encoder = Encoder.from_model(ConchModel(ConchConfig.tiny()))
    doc = json.loads(json.dumps(heartbeat_model(encoder)))  # as it travels
    model = RemoteModel(doc)
    assert model.fingerprint == encoder.fingerprint and model.aliases == encoder.aliases
    assert model.answers_to(encoder.aliases[0]) and not model.answers_to("sha:another")
    assert ALIASES not in model.describe() and model.describe() == encoder.describe()
    assert RemoteModel(encoder.describe()).aliases == ()  # a collection's record stands in: no aliases
