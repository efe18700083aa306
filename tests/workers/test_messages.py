"""What travels through the broker, and the Celery settings for long tasks (no Redis needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import qdrant_client.http.exceptions as qdrant_errors
import redis

from conchdb.errors import SlideError, StoreError
from conchdb.ingest.cohort import CohortSlide
from conchdb.ingest.pipeline import SlideJob
from conchdb.slides.grid import TilingParams
from conchdb.slides.tissue import TissueParams
from conchdb.workers.app import make_app
from conchdb.workers.broker import is_transient, redact
from conchdb.workers.messages import Event, batch_event, batch_tiles, job_from_dict, job_to_dict


def test_a_job_survives_json():
    slide = CohortSlide("a/b.svs", Path("/slides/a/b.svs"), "sha:1", (Path("/slides/a/b.svs"),))
    params = TilingParams(0.25, 224, 112, 0.4, TissueParams(mask_mpp=4.0))
    job = SlideJob(slide, "cohort", "run1", params, {"grade": 2, "frozen": False}, 0.26, "manifest", 16, 3)
    back = job_from_dict(Event.decode(Event("t", "job", job_to_dict(job)).encode()).data)
    assert back == job and back.tiling == job.tiling and back.tiling.key == "0.25um-224px-s112"


def test_a_batch_survives_json_bit_for_bit():
    rng = np.random.default_rng(0)
    tiles = [{"x": i, "y": 2 * i, "tissue": 0.5} for i in range(3)]
    vectors = rng.normal(size=(3, 512)).astype(np.float32)
    got, back = batch_tiles(Event.decode(batch_event("task", tiles, vectors).encode()))
    assert got == tiles and back.dtype == np.float32 and np.array_equal(back, vectors)


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
