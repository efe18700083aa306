"""What a server is allowed to do: its key, its limits, and which origins may call it.

A plain dataclass built once by `conchdb serve` (or by a test) and handed to `create_app`;
routes read their bounds from it, never from the environment.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from conchdb.errors import ConchdbError
from conchdb.search.searcher import MAX_DEPTH, MAX_TOP_K

IMAGE_BATCH = 8
"""Image queries encoded as one batch on a GPU, where a batch of 8 costs little more than one
image. On a CPU the image tower costs as much per image in a batch as alone, or more (ATen
spreads only large operations over the cores, so a batch takes every core from the requests
that serve tiles), so there images are encoded one at a time unless `--image-batch` says otherwise."""
DEFAULT_MAX_UPLOAD_BYTES = 20_000_000
DEFAULT_MAX_PIXELS = 50_000_000
"""An upload with more pixels is refused before it is decoded: a small compressed file can
expand to gigabytes (a decompression bomb); 50 MP is a large ROI already (CONCH sees 448 px)."""


@dataclass(frozen=True)
class ApiSettings:
    """Security and limits of one server.

    `api_key`: when set, every endpoint but `/v1/health` (and the page's static files)
    needs it, as `Authorization: Bearer KEY` or `X-API-Key: KEY`. `admin_key`: the other key,
    the only one that may change the store (`DELETE /v1/slides/...`); with none, nothing can
    be deleted over HTTP. `cors_origins`: browser origins allowed to call the API from other
    pages (none: CORS off). `text_batch`, `image_batch`: the most queries of a kind encoded
    as one batch (1: one at a time; `image_batch` None: `IMAGE_BATCH` on a GPU, 1 on a CPU);
    `model_requests`: requests that use the model handled at once (their threads mostly wait
    for the model's; more wait for one of them).
    """

    api_key: str | None = None
    admin_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_top_k: int = MAX_TOP_K
    max_depth: int = MAX_DEPTH
    max_query_chars: int = 1000
    max_filters: int = 32
    max_labels: int = 64
    max_prompts: int = 1024
    tile_cache: int = 2048
    text_cache: int = 4096
    text_batch: int = 64
    image_batch: int | None = None
    model_requests: int = 64
    open_slides: int = 16

    def __post_init__(self) -> None:
        for name in ("text_batch", "image_batch", "model_requests"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConchdbError(f"{name} is {getattr(self, name)}", "give 1 or more (1: one at a time)",
                                   parameter=name)


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
