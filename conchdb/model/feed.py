"""Feeding uint8 tile batches to the encoder's device so the accelerator never waits on the host.

On CUDA a batch goes through three overlapping steps:
- its pixels are copied to the device on a side stream (`non_blocking` from page-locked
  host memory: the readers' shared slots registered with CUDA, or a pinned staging
  buffer), while the previous batch still runs on the compute stream;
- the compute stream waits only for that copy, then resizes and normalizes on the device
  (`preprocess_batch`, the batched path that matches the reference) and runs the vision
  tower under autocast (bf16 by default), optionally `torch.compile`d;
- the vectors come back with `non_blocking` copies into pinned host buffers, each with an
  event, and are handed out a batch or two later, so reading back never stalls the next
  launch.

`submit` returns as soon as the batch's host memory may be reused (its copy has landed),
which is what lets a reader hand out views into its shared memory instead of copies. On
the CPU the same calls run synchronously, so the tests exercise this code and get the
same vectors as `Encoder.encode_tiles`.

Attention is fused on both parts of the tower: timm's ViT blocks call
`F.scaled_dot_product_attention` (timm's `fused_attn`), and the attentional pooler's
`nn.MultiheadAttention`, called with `need_weights=False`, does too.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from conchdb.model.encoder import Encoder
from conchdb.model.preprocess import preprocess_batch

IN_FLIGHT = 2
"""Batches whose vectors may still be on their way back when the next one is launched."""


def device_batch_size(device: torch.device, fallback: int = 32) -> int:
    """A batch size for the vision tower on `device`: large enough to fill a big GPU's
    cores (ViT-B/16 at 448 px needs a few hundred tiles a launch), small enough for its
    memory; `fallback` on the CPU, where larger batches only add latency."""
    if device.type != "cuda":
        return fallback
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    if total_gib >= 40:
        return 256
    if total_gib >= 16:
        return 128
    return 64


def pin_host_array(array: np.ndarray) -> Callable[[], None] | None:
    """Page-lock an existing host array (e.g. a reader's shared-memory slots) in place, so
    copies from it to the GPU are asynchronous DMA; returns the function that undoes it, or
    None when CUDA is absent or refuses (the caller then stages through a pinned buffer)."""
    if not torch.cuda.is_available() or array.nbytes == 0:
        return None
    pointer = array.ctypes.data
    try:
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(pointer, array.nbytes, 0)) != 0:
            return None
    except (AttributeError, RuntimeError, TypeError):  # a build without these bindings
        return None

    def unpin() -> None:
        cudart.cudaHostUnregister(pointer)

    return unpin


@dataclass
class _Pending:
    tag: Any
    host: torch.Tensor
    done: torch.cuda.Event | None
    count: int


@dataclass
class DeviceFeed:
    """Embeds uint8 tile batches (N, H, W, 3) on `encoder.device`, overlapping copies and compute.

    Hand model batches to `submit(tiles, tag)`; it returns the `(tag, vectors)` pairs that are
    finished by then, in submission order, and `drain()` returns the rest. `timings` gains
    `h2d_wait_s` (host waiting for a copy to land), `d2h_wait_s` (waiting for vectors) and,
    with `compile`, `compile_s` (the first, compiling call). `reset()` drops everything in
    flight, e.g. after a slide failed mid-way. `batch_size` is the model batch that
    `embed_batches` assembles on the device from smaller reader batches (default: the
    encoder's); see `device_batch_size` for a GPU.
    """

    encoder: Encoder
    compile: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0

    def __post_init__(self) -> None:
        self.device = self.encoder.device
        self.batch_size = self.batch_size or self.encoder.batch_size
        self._cuda = self.device.type == "cuda"
        model = self.encoder.model
        self._forward: Callable[[torch.Tensor], torch.Tensor] = model.encode_image
        if self.compile:
            # Ingest pads its last batch, so one shape compiles; a caller varying the batch
            # size (the benchmark) gets one dynamic-shape recompile instead of one per size.
            self._forward = torch.compile(model.encode_image)
        self._compiled_sizes: set[int] = set()
        self._pending: deque[_Pending] = deque()
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._staging: torch.Tensor | None = None
        self._out_ring: list[torch.Tensor] = []
        self._out_next = 0

    def _add(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.encoder.dtype == torch.float32:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.encoder.dtype):
                yield

    def _run(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) already on the device to (N, dim) float32 vectors on the device.
        A compiled forward always sees the same batch size (the last, short batch is padded),
        so it compiles once."""
        count = len(pixels_u8)
        if self.compile and self._compiled_sizes and count not in self._compiled_sizes:
            size = max(self._compiled_sizes)
            if count < size:
                pad = pixels_u8.new_zeros((size - count, *pixels_u8.shape[1:]))
                pixels_u8 = torch.cat([pixels_u8, pad])
        with torch.inference_mode():
            pixels = preprocess_batch(pixels_u8, self.encoder.image_size, self.device)
            with self._autocast():
                first = self.compile and len(pixels_u8) not in self._compiled_sizes
                start = time.perf_counter()
                vectors = self._forward(pixels)
                if first:
                    if self._cuda:
                        torch.cuda.synchronize(self.device)
                    self._add("compile_s", time.perf_counter() - start)
                    self._compiled_sizes.add(len(pixels_u8))
            return vectors[:count].float()

    def to_device(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Start the batch's copy on the side stream and wait until it has landed (the GPU
        keeps computing the previous batch meanwhile); the host memory is then free."""
        if isinstance(tiles, torch.Tensor):
            host = tiles
            if host.device == self.device:
                return host
        else:
            host = torch.from_numpy(np.ascontiguousarray(tiles))
            if not self._cuda:  # the "device" is this memory: own it, the source reuses its buffer
                return host.clone()
        assert self._copy_stream is not None
        if not host.is_pinned():
            if self._staging is None or self._staging.numel() < host.numel():
                self._staging = torch.empty(host.numel(), dtype=torch.uint8, pin_memory=True)
            staged = self._staging[: host.numel()].view(host.shape)
            staged.copy_(host)
            host = staged
        with torch.cuda.stream(self._copy_stream):
            on_device = host.to(self.device, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record(self._copy_stream)
        start = time.perf_counter()
        landed.synchronize()
        self._add("h2d_wait_s", time.perf_counter() - start)
        torch.cuda.current_stream(self.device).wait_event(landed)
        on_device.record_stream(torch.cuda.current_stream(self.device))
        return on_device

    def _host_buffer(self, count: int, dim: int) -> torch.Tensor:
        """A pinned (count, dim) float32 buffer from a ring longer than what is in flight."""
        if len(self._out_ring) < IN_FLIGHT + 1 or self._out_ring[0].shape[0] < count:
            rows = max(count, self._out_ring[0].shape[0] if self._out_ring else 0)
            self._out_ring = [torch.empty((rows, dim), dtype=torch.float32, pin_memory=True)
                              for _ in range(IN_FLIGHT + 1)]
        buffer = self._out_ring[self._out_next % len(self._out_ring)]
        self._out_next += 1
        return buffer[:count]

    def submit(self, tiles: np.ndarray | torch.Tensor, tag: Any = None) -> list[tuple[Any, np.ndarray]]:
        """Launch one batch; return the batches finished so far as (tag, (N, dim) float32)."""
        if len(tiles) == 0:
            self._pending.append(_Pending(tag, torch.zeros((0, self.encoder.dim)), None, 0))
            return self._collect(IN_FLIGHT)
        on_device = self.to_device(tiles)
        vectors = self._run(on_device)
        if self._cuda:
            host = self._host_buffer(len(vectors), vectors.shape[1])
            host.copy_(vectors, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending.append(_Pending(tag, host, done, len(vectors)))
        else:
            self._pending.append(_Pending(tag, vectors, None, len(vectors)))
        return self._collect(IN_FLIGHT if self._cuda else 0)

    def _collect(self, keep: int) -> list[tuple[Any, np.ndarray]]:
        out = []
        while len(self._pending) > keep:
            item = self._pending.popleft()
            if item.done is not None:
                start = time.perf_counter()
                item.done.synchronize()
                self._add("d2h_wait_s", time.perf_counter() - start)
            out.append((item.tag, item.host.numpy().copy()))
        return out

    def drain(self) -> list[tuple[Any, np.ndarray]]:
        """Every batch still in flight, finished, in submission order."""
        return self._collect(0)

    def reset(self) -> None:
        """Forget what is in flight (its slide failed); the buffers stay for the next slide."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
        self._pending.clear()

    def warm_up(self, batch_size: int, tile_px: int) -> float:
        """Run one batch of blank tiles (compiling, when asked) and return its seconds; the
        benchmark reports this as the compile cost."""
        start = time.perf_counter()
        self.submit(np.zeros((batch_size, tile_px, tile_px, 3), dtype=np.uint8))
        self.drain()
        return time.perf_counter() - start


def embed_batches(
    batches: Iterable[Any], feed: DeviceFeed, timings: dict[str, float] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """`(start, vectors)` for consecutive runs of tiles from `batches` (objects with `.tiles`
    and `.start`, in grid order, as `TileReader` yields), each run `feed.batch_size` tiles
    but the last. Reader batches are copied to the device as they come and joined there, so
    readers can hand out small batches (bounded shared memory, short latency) while the
    model gets large ones.

    `timings` gains `read_wait_s` (waiting for the next reader batch) and `model_s` (time in
    the feed, which holds its `h2d_wait_s` and `d2h_wait_s`). A batch's `tiles` may be a view
    the source reuses once the next batch is asked for: its copy has landed by then. If the
    source raises (a dead reader, a damaged region), what is in flight is dropped and the
    error goes on."""
    timings = timings if timings is not None else feed.timings

    def add(key: str, since: float) -> None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - since

    source = iter(batches)
    staged: list[torch.Tensor] = []
    staged_rows, first = 0, 0
    try:
        while True:
            t = time.perf_counter()
            batch = next(source, None)
            add("read_wait_s", t)
            t = time.perf_counter()
            if batch is not None:
                if not staged:
                    first = batch.start
                staged.append(feed.to_device(batch.tiles))
                staged_rows += len(batch.tiles)
            finished: list[tuple[int, np.ndarray]] = []
            while staged_rows >= feed.batch_size or (batch is None and staged_rows):
                joined = staged[0] if len(staged) == 1 else torch.cat(staged)
                take = min(feed.batch_size, staged_rows)
                finished += feed.submit(joined[:take], first)
                rest = joined[take:]
                staged, staged_rows, first = ([rest] if len(rest) else []), len(rest), first + take
            if batch is None:
                finished += feed.drain()
            add("model_s", t)
            yield from finished
            if batch is None:
                return
    except BaseException:
        feed.reset()
        raise


@contextlib.contextmanager
def pinned(array: np.ndarray | None) -> Iterator[None]:
    """Page-lock `array` for the block when CUDA is present (a no-op otherwise or for None).
    Leave the block before the array's memory is freed (e.g. before closing its reader)."""
    unpin = pin_host_array(array) if array is not None else None
    try:
        yield
    finally:
        if unpin is not None:
            unpin()
