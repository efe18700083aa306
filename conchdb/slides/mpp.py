"""Pixel size (µm per level-0 pixel): where it comes from and which claims to believe.

Tiles are cut at a physical resolution, so a wrong pixel size silently changes what every
vector means. The sources are tried in a fixed order and the first plausible one wins:

1. a per-slide override (a manifest `mpp` column or `--slide-mpp`);
2. `openslide.mpp-x/y`, OpenSlide's reading of the vendor metadata;
3. vendor properties OpenSlide did not map;
4. TIFF (or image) resolution tags, only with a cm or inch unit and a value between
   0.05 and 20 µm/px: a 72-dpi tag (352.8 µm/px) is an export default, not a measurement;
5. the objective power (10 / power µm/px), with a warning, because it is a nominal figure.

A value read from metadata outside 0.05–20 µm/px is rejected whatever its source, and the
rejection is kept so that the final error can say what was seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

PLAUSIBLE_MPP = (0.05, 20.0)
"""µm/px range a microscope scan can have; anything outside is an export default or a typo."""

UM_PER_UNIT = {"centimeter": 1e4, "cm": 1e4, "inch": 25400.0, "in": 25400.0}
"""Micrometres per TIFF resolution unit; 'none' (unit 1) carries no physical size."""

ANISOTROPY_WARNING = 0.02
"""Relative x/y difference above which non-square pixels are worth a warning."""


@dataclass(frozen=True)
class PixelSize:
    """A resolved level-0 pixel size, where it came from, and any caveat."""

    mpp: float
    source: str
    warning: str | None = None


@dataclass
class Resolution:
    """The outcome of trying every source: the chosen size (or None) and what was rejected."""

    pixel_size: PixelSize | None
    rejected: list[str] = field(default_factory=list)

    def explain(self) -> str:
        """One line naming the rejected claims, for error messages."""
        return "; ".join(self.rejected) if self.rejected else "no pixel size in the file's metadata"


def _float(value: object) -> float | None:
    try:
        out = float(str(value).strip().strip('"'))
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _pair(x: float | None, y: float | None, source: str) -> PixelSize | None:
    """Combine x and y sizes; non-square pixels are averaged with a warning."""
    if x is None and y is None:
        return None
    if x is None or y is None:
        return PixelSize(x or y, source)  # type: ignore[arg-type]
    warning = None
    if abs(x - y) / max(x, y) > ANISOTROPY_WARNING:
        warning = f"non-square pixels ({x:g} × {y:g} µm); using their mean"
    return PixelSize((x + y) / 2, source, warning)


def _plausible(size: PixelSize | None, rejected: list[str]) -> PixelSize | None:
    if size is None:
        return None
    low, high = PLAUSIBLE_MPP
    if low <= size.mpp <= high:
        return size
    dpi = f" ({25400 / size.mpp:.0f} dpi, an export default rather than a scan)" if "resolution" in size.source else ""
    rejected.append(f"{size.source} claims {size.mpp:.4g} µm/px{dpi}, outside {low:g}–{high:g} µm/px")
    return None


def tiff_tag_mpp(properties: Mapping[str, str], rejected: list[str]) -> PixelSize | None:
    """Pixel size claimed by `tiff.XResolution`/`YResolution` (pixels per unit), not yet range-checked.

    Tags without a physical unit (cm or inch) carry no size and are noted as rejected."""
    x = _float(properties.get("tiff.XResolution"))
    y = _float(properties.get("tiff.YResolution"))
    if x is None and y is None:
        return None
    unit = str(properties.get("tiff.ResolutionUnit", "")).strip().lower()
    if unit not in UM_PER_UNIT:
        rejected.append(f"TIFF resolution tags have no physical unit ({unit or 'none'})")
        return None
    scale = UM_PER_UNIT[unit]
    return _pair(scale / x if x else None, scale / y if y else None, "tiff-resolution")


def _openslide_mpp(properties: Mapping[str, str], from_tags: PixelSize | None) -> PixelSize | None:
    """`openslide.mpp-x/y`, unless OpenSlide merely passed the TIFF resolution tags through
    (generic TIFF, NDPI): then it is judged as tags, at their place in the order."""
    size = _pair(
        _float(properties.get("openslide.mpp-x")),
        _float(properties.get("openslide.mpp-y")),
        "openslide.mpp",
    )
    if size is not None and from_tags is not None and math.isclose(size.mpp, from_tags.mpp, rel_tol=1e-3):
        return None
    return size


def _philips_spacing(value: str | None) -> PixelSize | None:
    """`philips.DICOM_PIXEL_SPACING` is '"y" "x"' in millimetres."""
    if not value:
        return None
    parts = [_float(p) for p in value.replace('"', " ").split()]
    if len(parts) != 2 or None in parts:
        return None
    return _pair(parts[1] * 1e3, parts[0] * 1e3, "philips.DICOM_PIXEL_SPACING")  # type: ignore[operator]


def _um_pair(x_key: str, y_key: str | None = None, scale: float = 1.0) -> Callable[[Mapping], PixelSize | None]:
    def read(props: Mapping[str, str]) -> PixelSize | None:
        x = _float(props.get(x_key))
        y = _float(props.get(y_key)) if y_key else x
        return _pair(x * scale if x else None, y * scale if y else None, x_key)

    return read


VENDOR_SOURCES: tuple[Callable[[Mapping[str, str]], PixelSize | None], ...] = (
    _um_pair("aperio.MPP"),
    _um_pair(
        "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X",
        "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y",
    ),
    _um_pair("ventana.ScanRes"),
    lambda props: _philips_spacing(props.get("philips.DICOM_PIXEL_SPACING")),
    _um_pair(
        "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1]",
        "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0]",
        scale=1e3,
    ),
)
"""Vendor keys that carry a level-0 pixel size, for files where OpenSlide did not map one."""

OBJECTIVE_KEYS = ("openslide.objective-power", "aperio.AppMag", "hamamatsu.SourceLens")


def _objective_mpp(properties: Mapping[str, str]) -> PixelSize | None:
    for key in OBJECTIVE_KEYS:
        power = _float(properties.get(key))
        if power:
            return PixelSize(
                10.0 / power,
                f"objective-power ({key} = {power:g}×)",
                f"pixel size estimated as 10 / {power:g}× = {10.0 / power:.4g} µm/px from the objective "
                "power; give the true value with a manifest `mpp` column or an explicit slide pixel size",
            )
    return None


def validate_override(mpp: float | str, source: str) -> PixelSize:
    """An override is trusted, but it must be a pixel size: a number in the plausible range.

    The range check catches a magnification (20, 40) typed where µm/px was meant."""
    value = _float(mpp)
    low, high = PLAUSIBLE_MPP
    if value is None or not low <= value <= high:
        raise ValueError(
            f"{source}: '{mpp}' is not a pixel size between {low:g} and {high:g} µm/px "
            "(µm per level-0 pixel, e.g. 0.25 for 40×, 0.5 for 20×; not a magnification)"
        )
    return PixelSize(value, source)


def resolve_slide_mpp(
    properties: Mapping[str, str],
    override: float | None = None,
    override_source: str = "override",
) -> Resolution:
    """Resolve a slide's pixel size from its OpenSlide properties, in the documented order."""
    if override is not None:
        return Resolution(validate_override(override, override_source))
    rejected: list[str] = []
    from_tags = tiff_tag_mpp(properties, rejected)
    candidates = [
        _openslide_mpp(properties, from_tags),
        *(read(properties) for read in VENDOR_SOURCES),
        from_tags,
        _objective_mpp(properties),
    ]
    for candidate in candidates:
        size = _plausible(candidate, rejected)
        if size is not None:
            return Resolution(size, rejected)
    return Resolution(None, rejected)


def resolve_image_mpp(info: Mapping[str, object], override: float | None = None,
                      override_source: str = "override") -> Resolution:
    """Resolve a plain image's pixel size from Pillow's `dpi` info (set for inch or cm units)."""
    if override is not None:
        return Resolution(validate_override(override, override_source))
    rejected: list[str] = []
    dpi = info.get("dpi")
    if not isinstance(dpi, tuple) or len(dpi) != 2:
        return Resolution(None, rejected)
    x, y = (_float(v) for v in dpi)
    size = _pair(25400.0 / x if x else None, 25400.0 / y if y else None, "image-resolution")
    return Resolution(_plausible(size, rejected), rejected)
