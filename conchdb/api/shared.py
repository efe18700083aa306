"""What concurrent requests share, made safe to share: the store, open slides, encoded images.

Requests run on threads. A Qdrant server is queried as it is, by every thread at once
(qdrant-client's HTTP client takes concurrent calls, and the server orders them). What runs
in-process is not made for concurrent callers: the embedded engine's handles, and
qdrant-client's local mode (plain dicts, no locks; the tests' stand-in for a server); their
operations take milliseconds, so `SerialStore` runs them one at a time (`shared_store`
chooses). Open slides are kept in a small LRU, each read under its own lock (`SlideCache`);
encoded tiles and pictures are kept in a bounded LRU (`BytesCache`), since an id fixes its pixels.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from conchdb.store import Store

T = TypeVar("T")


def shared_store(store: Store) -> Store:
    """`store` as concurrent requests may use it: a Qdrant server as it is, anything in-process serialized."""
    from conchdb.store.server import ServerStore

    if isinstance(store, ServerStore) and store.url:
        return store
    return SerialStore(store)  # type: ignore[return-value]  # a Store in all but name


class SerialStore:
    """A store whose operations run one at a time (scrolls are read whole under the lock)."""

    def __init__(self, store: Store):
        self._store = store
        self._lock = threading.RLock()
        self.location = store.location

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not callable(target):
            return target

        @functools.wraps(target)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                out = target(*args, **kwargs)
                return iter(list(out)) if name == "scroll" else out

        return call


class SlideCache:
    """Open slides by key, the least recently used closed beyond `size`; `use(key, opener, fn)`."""

    def __init__(self, size: int):
        self._size = size
        self._entries: OrderedDict[Any, tuple[Any, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    def use(self, key: Any, opener: Callable[[], Any], fn: Callable[[Any], T]) -> T:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is None:
            opened = opener()
            with self._lock:
                entry = self._entries.setdefault(key, (opened, threading.Lock()))
                if entry[0] is not opened:
                    opened.close()
                evicted = []
                while len(self._entries) > self._size:
                    evicted.append(self._entries.popitem(last=False)[1])
            for handle, lock in evicted:
                with lock:
                    handle.close()
        handle, lock = entry
        with lock:
            return fn(handle)

    def close(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), OrderedDict()
        for handle, lock in entries:
            with lock:
                handle.close()


class BytesCache:
    """A bounded LRU of encoded images."""

    def __init__(self, size: int):
        self._size = size
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key: Any, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                return data
        data = make()
        with self._lock:
            self._items[key] = data
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return data

    def clear(self) -> None:
        """Forget every image (after slides were removed from the store)."""
        with self._lock:
            self._items.clear()
