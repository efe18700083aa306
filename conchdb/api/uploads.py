"""Request bodies that cannot hurt the server: bounded in bytes, bounded in pixels, and images.

The byte bound is enforced while the body streams in (an ASGI wrapper around `receive`),
so an oversized upload is refused at the limit instead of after it was spooled to disk.
The pixel bound is checked from the image header, before any pixel is decoded: a few
kilobytes of PNG can declare gigapixels (a decompression bomb).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conchdb.api.errors import ApiError

IMAGE_FIX = "upload a PNG, JPEG or TIFF image in the multipart field 'image'"


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"the request body is larger than {limit} bytes",
        "send a smaller image (crop or downscale it; the model sees 448 px)", field="image",
    )


class BodyLimit:
    """ASGI middleware: a request whose body exceeds `limit` bytes is answered 413."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large(self.limit)
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        from conchdb.api.errors import error_response

        response = error_response(too_large(self.limit))
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded image as RGB pixels: 415 when it is not an image, 413 when it has too many pixels."""
    if not data:
        raise ApiError(415, "the upload is empty", IMAGE_FIX, field="image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise _bomb(width, height, max_pixels)
                image.load()
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "the image has too many pixels", _bomb_fix(max_pixels), field="image") from None
    except UnidentifiedImageError:
        raise ApiError(415, "the upload is not an image that can be read", IMAGE_FIX, field="image") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise ApiError(415, "the upload looks like an image but is damaged or cut short", IMAGE_FIX,
                       field="image") from None


def _bomb_fix(max_pixels: int) -> str:
    return f"upload an image of at most {max_pixels} pixels (crop or downscale it)"


def _bomb(width: int, height: int, max_pixels: int) -> ApiError:
    return ApiError(
        413, f"the image is {width}×{height} pixels, more than the {max_pixels} allowed", _bomb_fix(max_pixels),
        field="image",
    )


def form_options(form: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The plain (non-file) fields of a multipart form that the request model knows."""
    out: dict[str, Any] = {}
    for name in names:
        value = form.get(name)
        if isinstance(value, str) and value != "":
            out[name] = value
    return out
