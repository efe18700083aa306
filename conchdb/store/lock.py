"""One process per embedded store, with an error that says who holds it.

qdrant-edge owns the files of its shards and cannot share them between processes; if a
second process opened them it would fail deep inside the engine with a WAL error. So the
store takes an exclusive `flock` on `conchdb.lock` in its folder before it opens any shard,
and writes its pid and command into that file so that the next process can say which
process holds the store. The kernel drops the lock when the holder exits, even on a crash,
so a stale file never blocks anyone: its content is only read when the lock is held.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conchdb.errors import StoreError

LOCK_FILE = "conchdb.lock"


@dataclass
class StoreLock:
    """A held lock; `release` it (closing the file descriptor also releases it)."""

    path: Path
    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _holder(fd: int) -> dict:
    """What the holding process wrote; empty if it has not written yet or wrote garbage."""
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data.decode("utf-8")) if data else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    pid = holder.get("pid")
    if pid is None:
        return "another process (it has not written its pid yet)"
    if pid == os.getpid() and holder.get("host") == socket.gethostname():
        return f"this process (pid {pid}), through another open store object"
    where = f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"process {pid}{where}{command}{since}"


def acquire(store_dir: Path) -> StoreLock:
    """Lock `store_dir` for this process, or raise a StoreError naming the holder."""
    path = store_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(
            f"cannot open the lock file of the embedded store {store_dir}: {exc.strerror}",
            fix="check that the store folder is writable, or choose another store folder",
            parameter="store",
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        raise StoreError(
            f"the embedded store {store_dir} is in use by {_describe(holder)}; "
            "an embedded store can be open in one process at a time",
            fix="wait for that process to finish (or stop it), or run a Qdrant server and give its URL "
            "(or set CONCHDB_QDRANT_URL): a server lets many processes read and write at once",
            parameter="qdrant_url",
        ) from exc
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "",
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
    return StoreLock(path, fd)
