"""Text queries that arrive together are encoded together, and repeated ones not at all.

The text tower costs about the same for one text as for a small batch, so while one
encode runs, the queries that arrive wait, and the first of them to get the model takes all
that are waiting as one batch. No thread of its own: the requests' threads take turns.
Vectors are cached by (model fingerprint, text), so a server that is handed other weights
never serves a vector of the old ones.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np


class TextBatcher:
    """`vectors(texts)`: unit vectors of texts, batched across concurrent callers and cached."""

    def __init__(
        self,
        encode: Callable[[Sequence[str]], np.ndarray],
        fingerprint: str,
        model_lock: threading.Lock,
        max_batch: int = 64,
        cache_size: int = 4096,
    ):
        self._encode = encode
        self.fingerprint = fingerprint
        self._model_lock = model_lock
        self._max_batch = max_batch
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._pending: dict[str, Future[np.ndarray]] = {}
        self._state = threading.Lock()
        self.batches: list[int] = []
        """Size of each batch encoded (what the tests and the benchmark look at)."""

    def _cached(self, text: str) -> np.ndarray | None:
        key = (self.fingerprint, text)
        with self._state:
            vector = self._cache.get(key)
            if vector is not None:
                self._cache.move_to_end(key)
            return vector

    def _store(self, text: str, vector: np.ndarray) -> None:
        with self._state:
            self._cache[(self.fingerprint, text)] = vector
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) vectors of `texts`, in order."""
        futures: list[Future[np.ndarray]] = []
        for text in texts:
            vector = self._cached(text)
            future: Future[np.ndarray] = Future()
            if vector is not None:
                future.set_result(vector)
            else:
                with self._state:
                    future = self._pending.setdefault(text, future)
            futures.append(future)
        while not all(f.done() for f in futures):
            with self._model_lock:
                self._run_pending()
        return np.stack([f.result() for f in futures])

    def _run_pending(self) -> None:
        """Encode what is waiting (called with the model lock held)."""
        with self._state:
            batch = list(self._pending.items())[: self._max_batch]
            for text, _ in batch:
                del self._pending[text]
        if not batch:
            return
        try:
            out = self._encode([text for text, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                future.set_exception(exc)
            raise
        self.batches.append(len(batch))
        for (text, future), vector in zip(batch, out, strict=True):
            vector = np.asarray(vector, dtype=np.float32)
            self._store(text, vector)
            future.set_result(vector)
