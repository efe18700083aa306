"""The Redis broker as conchdb uses it besides Celery's queue: connections, key names, retries.

Celery carries the tasks; these keys carry what Celery does not: the events a slide's
work sends back to the ingesting process (progress, and with the embedded store the
vectors), worker heartbeats (`workers status`, the model the ingest records), whether a
run still wants its tasks done, and how often a task was delivered. Every key name is
spelled here and nowhere else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis

from conchdb.errors import ConchdbError

T = TypeVar("T")

PREFIX = "conchdb"
# How long a run's events and alive mark outlive the last write to them. The alive mark is
# refreshed every second by the ingesting process; it lapses soon after that process dies,
# and the workers then drop the run's remaining tasks instead of doing work nobody stores.
ALIVE_TTL_S = 60
EVENTS_TTL_S = 24 * 3600
# A worker rewrites its heartbeat every few seconds (`HEARTBEAT_PERIOD_S`), stamped with the
# broker's clock; readers call it lost once it is older than their bound (`worker_lost_s`).
# The key outlives a lost worker by an hour, so `workers status` can say which slides it
# held; a worker that stops cleanly deletes it.
HEARTBEAT_PERIOD_S = 5.0
HEARTBEAT_KEEP_S = 3600
DELIVERIES_TTL_S = 7 * 24 * 3600
# Celery's Redis transport keeps delivered, not yet acknowledged messages in this hash.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


class BrokerError(ConchdbError):
    """The broker cannot be reached, or refused the connection."""


def worker_key(node: str) -> str:
    return f"{PREFIX}:worker:{node}"


def workers_key() -> str:
    """The set of the names of workers whose heartbeats may still be kept: read with one
    `SMEMBERS` and one `MGET` instead of a `SCAN` of the whole keyspace every few seconds."""
    return f"{PREFIX}:workers"


def events_key(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:events"


def alive_key(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:alive"


def live_key(run_id: str) -> str:
    """A run's hash of slide id -> the id of the task that does that slide now: a task sent
    again under a new id makes the older one stale, and its worker stops on seeing that."""
    return f"{PREFIX}:run:{run_id}:live"


def deliveries_key(task_id: str, retries: int) -> str:
    return f"{PREFIX}:task:{task_id}:try{retries}:deliveries"


def server_time(client: redis.Redis) -> float:
    """The broker's clock, in seconds: heartbeats are stamped and aged by it, so the clocks of
    the machines involved need not agree."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def drop_unacked(client: redis.Redis, task_id: str) -> bool:
    """Forget the delivered, unacknowledged message of task `task_id` (its worker is lost and
    the slide was sent again under another id), so the visibility timeout does not hand it out
    once more. Reads Celery's Redis transport's bookkeeping: the hash `unacked` (delivery tag
    -> [message, exchange, routing key]) and its index, the sorted set `unacked_index`."""
    for tag, raw in client.hscan_iter(UNACKED_KEY, count=500):
        try:
            message = json.loads(raw)[0]
            found = message["headers"]["id"] == task_id
        except (ValueError, LookupError, TypeError):
            continue
        if found:
            pipe = client.pipeline()
            pipe.zrem(UNACKED_INDEX_KEY, tag)
            pipe.hdel(UNACKED_KEY, tag)
            pipe.execute()
            return True
    return False


def redact(url: str) -> str:
    """The URL with its password replaced, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def connect(url: str, timeout_s: float = 3.0) -> redis.Redis:
    """A checked connection to the broker: fails within `timeout_s`, naming the URL, instead of hanging."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise BrokerError(
            f"broker URL {redact(url)!r} is not a Redis URL",
            fix="give redis://[:PASSWORD@]HOST:PORT/DB, e.g. redis://:secret@127.0.0.1:6379/0",
            parameter="broker_url",
        )
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=max(timeout_s, 10.0), health_check_interval=15
        )
        client.ping()
    except redis.AuthenticationError as exc:
        raise BrokerError(
            f"the broker at {redact(url)} refused the password: {exc}",
            fix="put the Redis password (requirepass) in the URL: redis://:PASSWORD@HOST:PORT/DB",
            parameter="broker_url",
        ) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as exc:
        raise BrokerError(
            f"cannot reach the broker at {redact(url)}: {exc}",
            fix="start Redis there, or point the broker URL (CONCHDB_BROKER_URL) at a running one",
            parameter="broker_url",
        ) from None
    return client


def is_transient(exc: BaseException) -> bool:
    """True for errors that go away by waiting: the broker or the Qdrant server unreachable.

    Walks the chain of causes, because the store wraps the client's errors in its own.
    A slide that cannot be read is never transient: retrying it would fail the same way.
    """
    from qdrant_client.http.exceptions import ResponseHandlingException

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (redis.ConnectionError, redis.TimeoutError, ResponseHandlingException,
                             ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def with_reconnect(call: Callable[[], T], give_up_s: float, on_wait: Callable[[str], None] | None = None) -> T:
    """Run a Redis call, waiting out a broker restart for up to `give_up_s` seconds.

    Backs off from 0.25 s to 5 s between tries; the last error is raised once the time is up.
    """
    deadline = time.monotonic() + give_up_s
    delay = 0.25
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            if on_wait is not None:
                on_wait(str(exc))
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
