"""Open a slide (through OpenSlide) or a plain image (through Pillow) behind one small API.

`open_slide` resolves the pixel size at open time, so a whole-slide image without one
fails here, naming the file and the fix, before any tissue or tile work. Plain images
may lack a pixel size: they are then embedded whole (see `conchdb.slides.grid`).

Every read returns RGB with transparency composited on white: OpenSlide marks areas
outside the scanned region as transparent black, which would otherwise read as tissue-dark.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import openslide
from PIL import Image

from conchdb.errors import SlideError
from conchdb.slides.mpp import PixelSize, resolve_image_mpp, resolve_slide_mpp, validate_override

MPP_HINT = (
    "give the pixel size: a manifest `mpp` column, or the slide's pixel size given explicitly (µm per level-0 pixel, "
    "e.g. 0.25 for a 40× scan, 0.5 for 20×)"
)
T = TypeVar("T")
R = TypeVar("R")
DAMAGED_HINT = "the file is damaged, truncated or still being copied; re-export it or leave it out"


class _Backend(Protocol):
    """The part of `openslide.AbstractSlide` conchdb uses."""

    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image: ...

    def close(self) -> None: ...


def flatten_on_white(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white; opaque images are only converted."""
    if image.mode == "RGB":
        return image
    if image.mode not in ("RGBA", "LA", "P", "PA", "RGBa"):
        return image.convert("RGB")
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")  # OpenSlide gives RGBA: no copy
    if rgba.getchannel("A").getextrema()[0] == 255:  # opaque: the common case, kept cheap
        return rgba.convert("RGB")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


class _ImageBackend:
    """A plain image as a one-level slide; pixels are decoded once, flattened on white."""

    level_count = 1
    properties: Mapping[str, str] = {}

    def __init__(self, image: Image.Image):
        self._image = flatten_on_white(image)
        self.dimensions = self._image.size
        self.level_dimensions = (self._image.size,)
        self.level_downsamples = (1.0,)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        x, y = location
        w, h = size
        inside = x >= 0 and y >= 0 and x + w <= self.dimensions[0] and y + h <= self.dimensions[1]
        if inside:
            return self._image.crop((x, y, x + w, y + h))
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        canvas.paste(self._image, (-x, -y))
        return canvas

    def close(self) -> None:
        self._image.close()


@dataclass
class Slide:
    """An open slide: geometry, metadata, the resolved pixel size, and region reads.

    Use as a context manager, or call `close()`. Coordinates are level-0 pixels
    throughout, as in OpenSlide; `mpp` is µm per level-0 pixel, or None for a plain
    image that does not say.
    """

    path: Path | str
    backend: str
    vendor: str | None
    pixel_size: PixelSize | None
    mpp_rejected: tuple[str, ...]
    _handle: _Backend
    attributes: dict[str, str] = field(default_factory=dict)
    """Attributes a search filters on, read from the file (DICOM: `dicom_*` fields)."""

    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self._handle.dimensions)  # type: ignore[return-value]

    @property
    def level_count(self) -> int:
        return int(self._handle.level_count)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(d) for d in self._handle.level_dimensions)  # type: ignore[misc]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._handle.level_downsamples)

    @property
    def properties(self) -> Mapping[str, str]:
        return self._handle.properties

    @property
    def mpp(self) -> float | None:
        return self.pixel_size.mpp if self.pixel_size else None

    @property
    def mpp_source(self) -> str:
        return self.pixel_size.source if self.pixel_size else "none"

    @property
    def is_plain_image(self) -> bool:
        return self.backend == "image"

    def level_mpp(self, level: int) -> float | None:
        """µm per pixel at `level`, or None when the pixel size is unknown."""
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def best_level(self, downsample: float, tolerance: float = 0.01) -> int:
        """The coarsest level whose downsample does not exceed `downsample` by more than
        `tolerance` (relative): the cheapest level that still has enough pixels."""
        downsamples = self.level_downsamples
        best = 0
        for level, level_ds in enumerate(downsamples):
            if level_ds <= downsample * (1 + tolerance) and level_ds > downsamples[best]:
                best = level
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGB pixels of a `size` region at `level`, whose top-left is `location` in level-0 pixels.

        Raises `SlideError` naming the file and the region when the pixels cannot be decoded."""
        try:
            region = self._handle.read_region(location, level, size)
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideError(
                f"{self.path}: cannot read pixels at level-0 ({location[0]}, {location[1]}), "
                f"level {level}, size {size[0]}×{size[1]}: {exc}",
                fix=DAMAGED_HINT,
            ) from None
        return flatten_on_white(region)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`[fn(item) for item in items]`, several at once where the slide reads over a
        network (DICOMweb: several requests in flight); in order either way."""
        parallel = getattr(self._handle, "map", None)
        return parallel(fn, items) if parallel is not None else [fn(item) for item in items]

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _open_openslide(path: Path, vendor: str) -> openslide.OpenSlide:
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(
            f"{path}: cannot open it as a {vendor} slide: {exc}",
            fix="convert it to a format OpenSlide reads (e.g. a JPEG-compressed pyramidal TIFF) "
            "or leave it out",
        ) from None


def _open_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except Image.DecompressionBombError as exc:
        raise SlideError(
            f"{path}: image too large for a plain-image read ({exc})",
            fix="convert it to a pyramidal TIFF (e.g. `vips tiffsave IN OUT.tif --tile --pyramid "
            "--compression jpeg`), which is read piece by piece",
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise SlideError(
            f"{path}: not a slide OpenSlide can read, nor an image Pillow can read ({exc})",
            fix="check the file; slides: svs, tif/tiff, ndpi, vms, vmu, scn, mrxs, bif, svslide, dcm; "
            "images: png, jpg, tif",
        ) from None
    return image


def open_slide(
    path: str | Path,
    mpp_override: float | None = None,
    override_source: str = "override",
) -> Slide:
    """Open a whole-slide image or a plain image and resolve its pixel size.

    OpenSlide is tried first; files it does not recognise are opened with Pillow as
    one-level images. `mpp_override` (µm/px) beats anything in the file; its
    `override_source` ("--slide-mpp", "manifest") is recorded as the source.
    Raises `SlideError` for a missing, unopenable or pixel-size-less slide.
    """
    if mpp_override is not None:
        try:
            validate_override(mpp_override, override_source)
        except ValueError as exc:
            raise SlideError(f"{path}: {exc}", fix=MPP_HINT, parameter="slide_mpp") from None
    if str(path).lower().startswith("dicomweb+"):
        from conchdb.slides.dicom import open_dicomweb, source_text

        return _dicom_slide(source_text(path), open_dicomweb(path), mpp_override, override_source)
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file", fix="check the path")
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(f"{path}: cannot read the file: {exc}", fix=DAMAGED_HINT) from None
    attributes: dict[str, str] = {}
    if vendor == "dicom":
        from conchdb.slides.dicom import check_dicom_file, dicom_file_attributes, open_dicom_folder

        try:
            handle: _Backend = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError):  # a series OpenSlide refuses may still be one wsidicom reads
            return _dicom_slide(path, open_dicom_folder(path), mpp_override, override_source)
        try:
            if mpp_override is None:  # checked, not used: this file may be a coarser level than the base
                check_dicom_file(path)
        except SlideError:
            handle.close()
            raise
        attributes = dicom_file_attributes(path)
        resolution = resolve_slide_mpp(handle.properties, mpp_override, override_source)
    elif vendor is not None:
        handle = _open_openslide(path, vendor)
        resolution = resolve_slide_mpp(handle.properties, mpp_override, override_source)
    else:
        image = _open_image(path)
        resolution = resolve_image_mpp(image.info, mpp_override, override_source)
        handle = _ImageBackend(image)
    if resolution.pixel_size is None and vendor is not None:
        handle.close()
        raise SlideError(f"{path}: no usable pixel size ({resolution.explain()})", fix=MPP_HINT, parameter="slide_mpp")
    return Slide(
        path=path,
        backend="openslide" if vendor is not None else "image",
        vendor=vendor,
        pixel_size=resolution.pixel_size,
        mpp_rejected=tuple(resolution.rejected),
        _handle=handle,
        attributes=attributes,
    )


def _dicom_slide(path: Path | str, opened: Any, mpp_override: float | None, override_source: str) -> Slide:
    """A `Slide` over a series read through wsidicom (`conchdb.slides.dicom`)."""
    if mpp_override is not None:
        pixel_size: PixelSize | None = validate_override(mpp_override, override_source)
    else:
        pixel_size = opened.pixel_size
    if pixel_size is None:
        opened.handle.close()
        raise SlideError(f"{path}: no usable pixel size (no Pixel Spacing, nor Imaged Volume Width/Height)",
                         fix=MPP_HINT, parameter="slide_mpp")
    return Slide(
        path=path, backend="wsidicom", vendor="dicom", pixel_size=pixel_size, mpp_rejected=(),
        _handle=opened.handle, attributes=dict(opened.attributes),
    )
