"""Several slides in flight: the next slides are planned and their tiles read while the current
one is embedded, so a small slide, a slide's tissue mask or a reader's start-up does not
leave the model waiting.

`slides_in_flight` walks a list of slides and yields each with its plan and a reader that is
already decoding: `depth` readers run at once (the slide being embedded and `depth - 1`
after it), and one more slide is planned beyond them. Each reader has its own worker
processes, so up to `depth × readers` processes exist; the ones ahead stop once their
shared slots are full, which bounds their memory like the current slide's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from conchdb.slides.reader import TileReader

Item = TypeVar("Item")
Plan = TypeVar("Plan")


class _Ahead(Generic[Plan]):
    """One slide ahead of the current one: its plan (a future) and whether a reader was asked for."""

    def __init__(self, future: Future[tuple[Plan, TileReader | None]], reading: bool):
        self.future, self.reading = future, reading


def _close(ahead: _Ahead) -> None:
    try:
        _, reader = ahead.future.result()
    except BaseException:  # a plan that failed holds no reader
        return
    if reader is not None:
        reader.close()


def slides_in_flight(
    items: Sequence[Item],
    plan: Callable[[Item], Plan],
    open_reader: Callable[[Item, Plan], TileReader | None],
    depth: int = 1,
) -> Iterator[tuple[Item, Plan, TileReader | None]]:
    """Each item in order with its plan and a started reader (`open_reader(item, plan)`; None
    where it gives none: a slide that failed to open or has no tissue). The consumer closes each reader it
    receives; readers not yet handed out are closed when the iteration ends or is left."""
    if depth < 1:
        raise ValueError("depth (slides in flight) must be ≥ 1")

    def planned(item: Item, reading: bool) -> tuple[Plan, TileReader | None]:
        result = plan(item)
        return result, _started(item, result) if reading else None

    def _started(item: Item, result: Plan) -> TileReader | None:
        reader = open_reader(item, result)
        if reader is not None:
            reader.start()
        return reader

    def upgraded(item: Item, earlier: Future[tuple[Plan, TileReader | None]]) -> tuple[Plan, TileReader | None]:
        result, _ = earlier.result()  # done: the one planner thread ran it first
        return result, _started(item, result)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conchdb-planner")
    ahead: deque[_Ahead] = deque()
    submitted = 0
    try:
        for index, item in enumerate(items):
            # Slides inside the window get a reader; the one just beyond it is only planned.
            for position, entry in enumerate(ahead):
                if not entry.reading and position < depth:
                    entry.future = pool.submit(upgraded, items[index + position], entry.future)
                    entry.reading = True
            while submitted < min(len(items), index + depth + 1):
                reading = submitted < index + depth
                ahead.append(_Ahead(pool.submit(planned, items[submitted], reading), reading))
                submitted += 1
            entry = ahead.popleft()
            result, reader = entry.future.result()
            yield item, result, reader
    finally:
        for entry in ahead:
            _close(entry)
        pool.shutdown(wait=True, cancel_futures=False)
