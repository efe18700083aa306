"""What the workers are doing, read from the broker: who is online, on which device, what runs.

Read from the workers' heartbeat keys and the queue itself rather than by asking the
workers over Celery's control channel: a worker busy with a slide in the `solo` pool does
not answer control messages until the slide is done, but its heartbeat thread does.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from conchdb.workers import broker


def online_workers(client: redis.Redis, queue: str | None = None) -> list[dict[str, Any]]:
    """The heartbeats of the workers alive now (optionally only those on `queue`), by name."""
    found = []
    for key in client.scan_iter(match=broker.worker_pattern(), count=100):
        raw = client.get(key)
        if raw is None:  # expired between the scan and the read
            continue
        doc = json.loads(raw)
        if queue is None or doc.get("queue") == queue:
            found.append(doc)
    return sorted(found, key=lambda d: d["node"])


def queued(client: redis.Redis, queue: str) -> int:
    """Tasks waiting in `queue` (Celery's Redis transport keeps a queue as a list of that name)."""
    return int(client.llen(queue))


def unacknowledged(client: redis.Redis) -> int:
    """Tasks delivered to a worker and not finished yet, on every queue."""
    return int(client.hlen(broker.UNACKED_KEY))


def workers_status(client: redis.Redis, queue: str) -> dict[str, Any]:
    """The `workers status` document: workers online with device, model and tasks, and the queue."""
    workers = online_workers(client, queue)
    return {
        "queue": queue,
        "queued": queued(client, queue),
        "running": sum(len(w["running"]) for w in workers),
        "delivered_unfinished": unacknowledged(client),
        "workers": [
            {
                "node": w["node"], "host": w["host"], "pid": w["pid"], "device": w["device"],
                "model_fingerprint": w["model"]["model_fingerprint"],
                "running": [{"slide": r["slide"], "tiles": r["tiles"], "done": r["done"], "since": r["since"]}
                            for r in w["running"]],
            }
            for w in workers
        ],
    }
