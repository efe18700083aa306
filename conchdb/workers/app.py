"""The Celery application, configured for tasks that take minutes and must not be lost.

Built by a function, not at import, so the broker URL and timeouts come from the caller
(settings read once per command) and tests can point it at their own Redis.

Why each setting:
- `task_acks_late`: a slide's message is acknowledged after the slide is finished, so a
  worker that dies mid-slide leaves it to be delivered again;
- `task_reject_on_worker_lost`: the same when a pool child dies, at once: the message goes
  back to the queue (`conchdb worker` runs tasks in its main process or in threads, but the
  setting keeps its meaning for any pool; tests/workers/test_lost.py kills a prefork child);
- `worker_prefetch_multiplier = 1`: a worker holds only the slide it is working on, so
  other workers take the rest instead of waiting behind one long slide;
- the transport's `visibility_timeout`: how long Redis waits for the acknowledgement before
  it hands the slide to another worker. A lost worker is found sooner by its heartbeat
  (`dispatch`), so this is the last resort, for when the ingesting process is gone too. It
  must exceed the longest slide; a slide that takes longer is delivered a second time and
  done twice, harmless because point ids are deterministic, and bounded by
  `max_deliveries` (checked by the task);
- results are not kept: the outcome of a slide travels on the run's events list.
"""

from __future__ import annotations

from celery import Celery

TASK_NAME = "conchdb.ingest_slide"


def make_app(broker_url: str, queue: str, visibility_timeout: int) -> Celery:
    """A Celery app on `broker_url` whose tasks go to `queue`."""
    app = Celery("conchdb", broker=broker_url, set_as_current=False)
    # Look for messages whose acknowledgement is overdue often enough that a short test
    # timeout works, rarely enough that a six-hour one costs nothing.
    restore_every = max(1, min(60, visibility_timeout // 4))
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": restore_every,
            "socket_connect_timeout": 5,
            "health_check_interval": 15,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker outlives a broker restart
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return app
