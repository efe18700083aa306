"""The Redis broker as conchdb uses it besides Celery's queue: connections, key names, retries.

Celery carries the tasks; these keys carry what Celery does not: the events a slide's
work sends back to the ingesting process (progress, and with the embedded store the
vectors), worker heartbeats (`workers status`, the model the ingest records), whether a
run still wants its tasks done, and how often a task was delivered. Every key name is
spelled here and nowhere else.
"""

from __future__ import annotations

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
HEARTBEAT_TTL_S = 20
DELIVERIES_TTL_S = 7 * 24 * 3600
# Celery's Redis transport keeps delivered, not yet acknowledged messages in this hash.
UNACKED_KEY = "unacked"


class BrokerError(ConchdbError):
    """The broker cannot be reached, or refused the connection."""


def worker_key(node: str) -> str:
    return f"{PREFIX}:worker:{node}"


def worker_pattern() -> str:
    return f"{PREFIX}:worker:*"


def events_key(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:events"


def alive_key(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:alive"


def deliveries_key(task_id: str, retries: int) -> str:
    return f"{PREFIX}:task:{task_id}:try{retries}:deliveries"


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
