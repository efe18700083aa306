"""What the workers are doing, read from the broker: who is online, on which device, what runs,
and which workers are lost.

Read from the workers' heartbeat keys and the queue itself rather than by asking the
workers over Celery's control channel: a worker busy with a slide in the `solo` pool does
not answer control messages until the slide is done, but its heartbeat thread does.

A worker is **lost** when its heartbeat, rewritten every 5 s and stamped with the broker's
clock, is older than a bound (`CONCHDB_WORKER_LOST_S`, 30 s by default: several beats, so a
loaded machine is not taken for a dead one). Its heartbeat stays readable for an hour after
(`broker.HEARTBEAT_KEEP_S`), so the slides it held can be named and sent again; a worker that
stops cleanly deletes its heartbeat instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from conchdb.workers import broker

WORKER_LOST_S = 30.0
# A heartbeat's model names the fingerprints an earlier conchdb gave the same weights
# (`Encoder.aliases`), so that an ingest accepts the collections those versions recorded.
ALIASES = "model_fingerprint_aliases"


def heartbeat_model(encoder: Any) -> dict[str, Any]:
    """A worker's model as its heartbeat tells it: what a collection records of it, and its aliases."""
    return {**encoder.describe(), ALIASES: list(encoder.aliases)}


@dataclass
class Beat:
    """One worker's last heartbeat, and how long ago (by the broker's clock) it was written."""

    doc: dict[str, Any]
    age_s: float

    @property
    def node(self) -> str:
        return str(self.doc["node"])

    def lost(self, lost_s: float) -> bool:
        return self.age_s > lost_s

    def running(self) -> list[dict[str, Any]]:
        return list(self.doc.get("running", []))


def heartbeats(client: redis.Redis, queue: str | None = None) -> list[Beat]:
    """Every worker heartbeat still kept (alive or lost), optionally only those on `queue`, by name."""
    now = broker.server_time(client)
    nodes = sorted(n.decode() for n in client.smembers(broker.workers_key()))
    raws = client.mget([broker.worker_key(n) for n in nodes]) if nodes else []
    found = []
    for node, raw in zip(nodes, raws, strict=True):
        if raw is None:  # kept past its hour, or its worker stopped between the two reads
            client.srem(broker.workers_key(), node)
            continue
        doc = json.loads(raw)
        if queue is None or doc.get("queue") == queue:
            stamp = doc.get("beat_at", doc.get("updated_at", 0.0))
            found.append(Beat(doc, max(0.0, now - float(stamp))))
    return sorted(found, key=lambda b: b.node)


def online_workers(client: redis.Redis, queue: str | None = None,
                   lost_s: float = WORKER_LOST_S) -> list[dict[str, Any]]:
    """The heartbeats of the workers alive now (optionally only those on `queue`), by name."""
    return [b.doc for b in heartbeats(client, queue) if not b.lost(lost_s)]


def queued(client: redis.Redis, queue: str) -> int:
    """Tasks waiting in `queue` (Celery's Redis transport keeps a queue as a list of that name)."""
    return int(client.llen(queue))


def unacknowledged(client: redis.Redis) -> int:
    """Tasks delivered to a worker and not finished yet, on every queue."""
    return int(client.hlen(broker.UNACKED_KEY))


def _running(beat: Beat) -> list[dict[str, Any]]:
    return [{"slide": r["slide"], "tiles": r["tiles"], "done": r["done"], "since": r["since"], "task": r["task"]}
            for r in beat.running()]


def workers_status(client: redis.Redis, queue: str, lost_s: float = WORKER_LOST_S) -> dict[str, Any]:
    """The `workers status` document: workers online with device, model and tasks; workers lost
    (no heartbeat for more than `lost_s`) with the slides they held; the queue."""
    beats = heartbeats(client, queue)
    alive = [b for b in beats if not b.lost(lost_s)]
    lost = [b for b in beats if b.lost(lost_s)]
    return {
        "queue": queue,
        "queued": queued(client, queue),
        "running": sum(len(b.running()) for b in alive),
        "delivered_unfinished": unacknowledged(client),
        "worker_lost_s": lost_s,
        "workers": [
            {
                "node": b.node, "host": b.doc["host"], "pid": b.doc["pid"], "device": b.doc["device"],
                "model_fingerprint": b.doc["model"]["model_fingerprint"], "running": _running(b),
            }
            for b in alive
        ],
        "lost": [
            {"node": b.node, "host": b.doc["host"], "pid": b.doc["pid"], "device": b.doc["device"],
             "silent_s": round(b.age_s, 1), "held": _running(b)}
            for b in lost
        ],
    }
