"""DICOM whole-slide images (Supplement 145, VL Whole Slide Microscopy) read through `wsidicom`:
series in a folder that OpenSlide refuses, and series on a DICOMweb server (a PACS, a VNA).

A DICOMweb slide is named by a *source string*, `dicomweb+http(s)://HOST/PREFIX/studies/
<study UID>/series/<series UID>`: one series, which is what the archive stores as the slide's
`path`, what a worker's task carries, and what the tile server opens again. Everything that
opens a slide goes through `conchdb.slides.open_slide`, which sends these strings here.

The pixel size comes from the DICOM attributes (Pixel Spacing in the Shared or Per-frame
Functional Groups, else Imaged Volume Width/Height over Total Pixel Matrix Columns/Rows),
and is checked: pixels must be square and the spacing must agree with the imaged volume.
An inconsistent series is refused, naming the series and the two values, rather than tiled
at a wrong size.

Over the network, a region is fetched with one WADO-RS request for all of its frames
(wsidicom's multi-frame request), and the tile reader reads the tiles of a batch with
several such requests in flight (`requests`, bounded, per reader process), so a batch
costs about one round trip rather than one per tile.

Credentials come from `conchdb.config.Settings` (`CONCHDB_DICOMWEB_TOKEN`, or
`CONCHDB_DICOMWEB_USER` with `CONCHDB_DICOMWEB_PASSWORD`), read in whatever process opens
the slide (a tile reader, a worker, the tile server), never from a command line, and never
written to a message or a log. TLS certificates are verified (`CONCHDB_DICOMWEB_CA_BUNDLE`
for a private CA). A server that is down, refuses the credentials or does not answer within
`CONCHDB_DICOMWEB_TIMEOUT` seconds is a `SlideError` naming the URL and the fix.

`wsidicom`, `pydicom` and `requests` are imported on first use: `import conchdb.slides`
stays light.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from PIL import Image

from conchdb.errors import SlideError
from conchdb.slides.mpp import PLAUSIBLE_MPP, PixelSize

if TYPE_CHECKING:
    import requests

SCHEME_PREFIX = "dicomweb+"
"""What starts a DICOMweb source string: `dicomweb+https://HOST/PATH`."""

_MANGLED = re.compile(r"^dicomweb\+(https?):/+", re.IGNORECASE)
_SERIES_PATH = re.compile(r"^(?P<base>.*?)/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/*$")

SPACING_TOLERANCE = 0.02
"""Relative difference allowed between x and y spacing, and between the spacing and the
imaged volume over the pixel matrix (rounding in the mm values written by converters)."""

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage."""

AUTH_FIX = (
    "set CONCHDB_DICOMWEB_TOKEN (a bearer token), or CONCHDB_DICOMWEB_USER and CONCHDB_DICOMWEB_PASSWORD, "
    "to credentials the server accepts"
)

DICOM_FIELD_TAGS: dict[str, str] = {
    "dicom_patient_id": "PatientID",
    "dicom_accession_number": "AccessionNumber",
    "dicom_study_date": "StudyDate",
    "dicom_body_part": "BodyPartExamined",
    "dicom_study_uid": "StudyInstanceUID",
    "dicom_series_uid": "SeriesInstanceUID",
}
"""Payload fields taken straight from a DICOM attribute (`dicom_specimen` and `dicom_stain`
are read from the specimen description; see `dicom_attributes`)."""

USING_SUBSTANCE = "424361007"
"""SNOMED CT 'Using substance': the concept name of a staining step's substance item."""


# -- source strings ------------------------------------------------------------------------


def is_dicomweb(path: str | Path) -> bool:
    """Whether `path` is a DICOMweb source string (also in the form a `pathlib.Path` leaves
    of it, which folds `//` into `/`)."""
    return str(path).lower().startswith(SCHEME_PREFIX)


@dataclass(frozen=True)
class DicomWebSource:
    """A DICOMweb server (`base`: its http(s) URL up to `/studies`), and optionally a study
    and a series in it. `str()` gives the source string the archive stores."""

    base: str
    study: str | None = None
    series: str | None = None

    def __str__(self) -> str:
        out = SCHEME_PREFIX + self.base
        if self.study:
            out += f"/studies/{self.study}"
            if self.series:
                out += f"/series/{self.series}"
        return out

    @property
    def url(self) -> str:
        """The plain http(s) URL, for messages (credentials never appear in it)."""
        return str(self).removeprefix(SCHEME_PREFIX)

    def with_series(self, study: str, series: str) -> DicomWebSource:
        return DicomWebSource(self.base, study, series)


def parse_source(text: str | Path) -> DicomWebSource:
    """Parse `dicomweb+http(s)://HOST/PATH[/studies/UID[/series/UID]]`.

    Raises `SlideError` for another scheme or for a URL with a user name or password in it
    (credentials come from the environment, so they never reach a shell history or a log)."""
    raw = _MANGLED.sub(lambda m: f"dicomweb+{m.group(1).lower()}://", str(text).strip())
    if not is_dicomweb(raw):
        raise SlideError(f"{text}: not a DICOMweb source", fix="write dicomweb+https://HOST/PATH", parameter="path")
    url = raw[len(SCHEME_PREFIX):]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SlideError(f"{text}: not a DICOMweb URL", fix="write dicomweb+https://HOST/PATH (http or https)",
                         parameter="path")
    if parts.username or parts.password:
        raise SlideError(
            f"{parts.scheme}://{parts.hostname}{parts.path}: the URL carries credentials",
            fix="take them out of the URL; " + AUTH_FIX, parameter="path",
        )
    path = parts.path.rstrip("/")
    match = _SERIES_PATH.match(path)
    if match:
        base = urlunsplit((parts.scheme, parts.netloc, match["base"], "", ""))
        return DicomWebSource(base, match["study"], match["series"])
    return DicomWebSource(urlunsplit((parts.scheme, parts.netloc, path, "", "")))


def source_text(path: str | Path) -> str:
    """The string a slide's path is stored as: a DICOMweb source in its canonical form (a
    `Path` folds its `//`), any other path as given."""
    return str(parse_source(path)) if is_dicomweb(path) else str(path)


# -- the connection ------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomWebOptions:
    """How to reach DICOMweb servers: credentials, TLS, timeout, requests in flight.

    Made from `conchdb.config.Settings` (`from_settings`); `repr` hides the secrets."""

    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None
    timeout: float = 10.0
    requests: int = 8

    @classmethod
    def from_settings(cls, settings: Any | None = None) -> DicomWebOptions:
        if settings is None:
            from conchdb.config import Settings

            settings = Settings()

        def secret(value: Any) -> str | None:
            return value.get_secret_value() if value is not None else None

        return cls(
            token=secret(settings.dicomweb_token), user=settings.dicomweb_user,
            password=secret(settings.dicomweb_password), ca_bundle=settings.dicomweb_ca_bundle,
            timeout=float(settings.dicomweb_timeout), requests=max(1, int(settings.dicomweb_requests)),
        )


def _session(options: DicomWebOptions) -> requests.Session:
    """A requests session with the credentials, TLS verification and a default timeout."""
    import requests
    from requests.adapters import HTTPAdapter

    timeout = options.timeout
    ca_bundle = str(options.ca_bundle) if options.ca_bundle else None

    class _Timeout(HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = timeout
            if ca_bundle is not None:  # requests lets $REQUESTS_CA_BUNDLE override a session's own bundle
                kwargs["verify"] = ca_bundle
            return super().send(request, **kwargs)

    session = requests.Session()
    adapter = _Timeout(pool_connections=4, pool_maxsize=max(8, options.requests * 2))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.verify = str(options.ca_bundle) if options.ca_bundle else True
    if options.token:
        session.headers["Authorization"] = f"Bearer {options.token}"
    elif options.user:
        session.auth = (options.user, options.password or "")
    return session


def web_error(exc: BaseException, url: str, options: DicomWebOptions) -> SlideError | None:
    """The `SlideError` for a failed request to `url`, or None when `exc` is not a network
    or HTTP failure."""
    import requests

    if isinstance(exc, requests.exceptions.SSLError):
        return SlideError(
            f"{url}: the server's TLS certificate could not be verified",
            fix="give the CA bundle that signed it (--ca-bundle, or CONCHDB_DICOMWEB_CA_BUNDLE)",
            parameter="ca_bundle",
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return SlideError(
            f"{url}: the DICOMweb server did not answer within {options.timeout:g} s",
            fix="check that the server runs and is reachable, or allow it longer with CONCHDB_DICOMWEB_TIMEOUT",
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        return SlideError(
            f"{url}: cannot connect to the DICOMweb server (it is down, or the address is wrong)",
            fix="start the server or correct the host and port; a slide that failed is retried by the next run",
        )
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            given = "no credentials were given" if not (options.token or options.user) else "it refused them"
            return SlideError(f"{url}: the DICOMweb server requires authentication (HTTP {status}; {given})",
                              fix=AUTH_FIX)
        if status == 404:
            return SlideError(f"{url}: not found on the DICOMweb server (HTTP 404)",
                              fix="check the DICOMweb prefix (e.g. /dicom-web) and the study and series UIDs")
        return SlideError(f"{url}: the DICOMweb server answered HTTP {status}",
                          fix="check the server's log; a slide that failed is retried by the next run")
    if isinstance(exc, requests.exceptions.RequestException):
        return SlideError(f"{url}: the DICOMweb request failed ({type(exc).__name__})",
                          fix="check the URL and the server")
    return None


def _guard(url: str, options: DicomWebOptions) -> Callable[[BaseException], BaseException]:
    def convert(exc: BaseException) -> BaseException:
        return web_error(exc, url, options) or exc

    return convert


class DicomWebServer:
    """One DICOMweb server: QIDO-RS searches and the wsidicom client for WADO-RS."""

    def __init__(self, source: DicomWebSource, options: DicomWebOptions | None = None):
        self.source = source
        self.options = options or DicomWebOptions.from_settings()
        self.session = _session(self.options)

    def qido(self, path: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The JSON datasets a QIDO-RS search at `base/path` returns."""
        url = f"{self.source.base}/{path.lstrip('/')}"
        try:
            response = self.session.get(url, params=dict(params or {}), headers={"Accept": "application/dicom+json"})
            response.raise_for_status()
        except Exception as exc:
            raise _guard(url, self.options)(exc) from None
        if response.status_code == 204 or not response.content.strip():
            return []
        try:
            out = response.json()
        except ValueError:
            raise SlideError(f"{url}: the answer is not DICOM JSON", fix="check the DICOMweb prefix") from None
        return out if isinstance(out, list) else []

    def client(self) -> Any:
        from dicomweb_client.api import DICOMwebClient
        from wsidicom import WsiDicomWebClient

        client = DICOMwebClient(self.source.base, session=self.session)
        client.set_http_retry_params(retry=False)  # fail fast; the next run retries the slide
        return WsiDicomWebClient(client)

    def close(self) -> None:
        self.session.close()


def json_value(dataset: Mapping[str, Any], tag: str) -> Any:
    """The first value of `tag` (8 hex digits) in a DICOM JSON dataset, or None; person names
    come back as their alphabetic form."""
    values = (dataset.get(tag) or {}).get("Value") or []
    if not values:
        return None
    value = values[0]
    if isinstance(value, dict):
        return value.get("Alphabetic")
    return value


# -- pixel size ----------------------------------------------------------------------------


def _spacing_of(dataset: Any) -> tuple[float, float] | None:
    """(x, y) mm from Pixel Spacing (row spacing first, as DICOM writes it) in the Shared or
    the first Per-frame Functional Group."""
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            spacing = getattr(dataset, group)[0].PixelMeasuresSequence[0].PixelSpacing
            row, column = float(spacing[0]), float(spacing[1])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            continue
        if row > 0 and column > 0:
            return column, row
    return None


def _volume_spacing_of(dataset: Any) -> tuple[float, float] | None:
    """(x, y) mm from Imaged Volume Width/Height over Total Pixel Matrix Columns/Rows."""
    try:
        width, height = float(dataset.ImagedVolumeWidth), float(dataset.ImagedVolumeHeight)
        columns, rows = int(dataset.TotalPixelMatrixColumns), int(dataset.TotalPixelMatrixRows)
    except (AttributeError, TypeError, ValueError):
        return None
    if min(width, height) <= 0 or min(columns, rows) <= 0:
        return None
    return width / columns, height / rows


def _differ(a: float, b: float) -> bool:
    return abs(a - b) / max(a, b) > SPACING_TOLERANCE


def dicom_pixel_size(dataset: Any, name: str) -> PixelSize | None:
    """The level-0 pixel size of a WSI volume instance, checked; None when it gives none.

    Raises `SlideError` naming `name` (the series) and both values when pixels are not
    square or the spacing disagrees with the imaged volume."""
    spacing, volume = _spacing_of(dataset), _volume_spacing_of(dataset)
    for values, what in ((spacing, "Pixel Spacing"), (volume, "Imaged Volume over Total Pixel Matrix")):
        if values is not None and _differ(*values):
            raise SlideError(
                f"{name}: non-square pixels in {what}: {values[0] * 1e3:.4g} µm wide × {values[1] * 1e3:.4g} µm "
                "high; a converter may have swapped width and height",
                fix="convert the slide again with correct pixel spacing, or give the slide's pixel size explicitly",
                parameter="slide_mpp",
            )
    if spacing is not None and volume is not None and any(map(_differ, spacing, volume)):
        raise SlideError(
            f"{name}: Pixel Spacing says {spacing[0] * 1e3:.4g} × {spacing[1] * 1e3:.4g} µm/px but the Imaged Volume "
            f"over the Total Pixel Matrix gives {volume[0] * 1e3:.4g} × {volume[1] * 1e3:.4g} µm/px",
            fix="convert the slide again with consistent pixel spacing and imaged volume, or give the slide's "
            "pixel size explicitly",
            parameter="slide_mpp",
        )
    chosen, source = (spacing, "dicom.PixelSpacing") if spacing is not None else (volume, "dicom.ImagedVolume")
    if chosen is None:
        return None
    mpp = (chosen[0] + chosen[1]) / 2 * 1e3
    low, high = PLAUSIBLE_MPP
    if not low <= mpp <= high:
        raise SlideError(f"{name}: {source} gives {mpp:.4g} µm/px, outside {low:g}–{high:g} µm/px",
                         fix="convert the slide again with its true pixel spacing, or give its pixel size explicitly",
                         parameter="slide_mpp")
    return PixelSize(mpp, source)


def non_wsi_reason(image_types: Iterable[Sequence[str] | None], sop_classes: Iterable[str | None] = ()) -> str | None:
    """Why a series is not a whole-slide image to tile (None when it is one, or may be): no VL
    WSI instance, or no VOLUME image (labels, overviews, thumbnails only). A series without
    Image Type is not passed over here: it is malformed, and opening it says so."""
    classes = {c for c in sop_classes if c}
    if classes and WSI_SOP_CLASS not in classes:
        return f"not a VL Whole Slide Microscopy series (SOP classes {', '.join(sorted(classes))})"
    flavours: set[str] = set()
    for image_type in image_types:
        if image_type and len(image_type) > 2:
            flavours.add(str(image_type[2]).upper())
    if not flavours:  # no Image Type: malformed rather than another kind, refused at open
        return None
    if "VOLUME" not in flavours:
        return f"no VOLUME image, only {', '.join(sorted(f.lower() for f in flavours))}"
    return None


# -- attributes a search filters on --------------------------------------------------------


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def dicom_attributes(dataset: Any) -> dict[str, str]:
    """The attributes of a WSI instance that a search would filter on, as `dicom_*` payload
    fields (see `conchdb.catalog.DICOM_FIELDS`); absent or empty ones are left out."""
    out: dict[str, str] = {}
    for field_name, keyword in DICOM_FIELD_TAGS.items():
        value = _text(dataset.get(keyword))
        if value:
            out[field_name] = value
    descriptions, stains = [], []
    for specimen in dataset.get("SpecimenDescriptionSequence") or []:
        text = _text(specimen.get("SpecimenShortDescription")) or _text(specimen.get("SpecimenDetailedDescription"))
        if text:
            descriptions.append(text)
        for step in specimen.get("SpecimenPreparationSequence") or []:
            for item in step.get("SpecimenPreparationStepContentItemSequence") or []:
                try:
                    concept = item.ConceptNameCodeSequence[0].CodeValue
                    meaning = item.ConceptCodeSequence[0].CodeMeaning
                except (AttributeError, IndexError):
                    continue
                if concept == USING_SUBSTANCE and _text(meaning) and meaning not in stains:
                    stains.append(str(meaning))
    if descriptions:
        out["dicom_specimen"] = "; ".join(descriptions)
    if stains:
        out["dicom_stain"] = "+".join(stains)
    return out


# -- the slide handle ------------------------------------------------------------------------


class DicomBackend:
    """A `wsidicom.WsiDicom` behind the part of OpenSlide's API that `Slide` uses.

    Coordinates are level-0 pixels as in OpenSlide; a region reaching past the image is
    padded with white, as OpenSlide pads with transparency. `map` runs reads on up to
    `requests` threads (several WADO-RS requests in flight)."""

    def __init__(self, wsi: Any, name: str, requests: int = 1, on_close: Callable[[], None] | None = None):
        self._wsi = wsi
        self.name = name
        self.requests = max(1, requests)
        self._on_close = on_close
        self.options = DicomWebOptions()
        self._levels = sorted(wsi.levels, key=lambda level: level.level)
        base = self._levels[0].size
        self.dimensions = (int(base.width), int(base.height))
        self.level_count = len(self._levels)
        self.level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in self._levels)
        self.level_downsamples = tuple(
            ((base.width / w) + (base.height / h)) / 2 for w, h in self.level_dimensions
        )
        dataset = self._levels[0].datasets[0]
        self.dataset = dataset
        self.properties: Mapping[str, str] = {
            "dicom.SeriesInstanceUID": str(dataset.get("SeriesInstanceUID", "")),
            "dicom.StudyInstanceUID": str(dataset.get("StudyInstanceUID", "")),
        }
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        from wsidicom.errors import WsiDicomError

        lv = self._levels[level]
        factor = self.level_downsamples[level]
        width, height = self.level_dimensions[level]
        x, y = math.floor(location[0] / factor), math.floor(location[1] / factor)
        w, h = size
        left, top = max(0, x), max(0, y)
        right, bottom = min(width, x + w), min(height, y + h)
        try:
            if left >= right or top >= bottom:
                return Image.new("RGB", (w, h), (255, 255, 255))
            region = self._wsi.read_region((left, top), lv.level, (right - left, bottom - top))
        except WsiDicomError as exc:
            raise OSError(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:
            error = web_error(exc, self.name, self.options)
            if error is not None:  # the network's fault, not the file's: say so and how to go on
                raise SlideError(
                    f"{error.message} (reading level {level} at ({location[0]}, {location[1]}))", fix=error.fix
                ) from None
            raise
        region = region.convert("RGB")
        if (left, top, right, bottom) == (x, y, x + w, y + h):
            return region
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        canvas.paste(region, (left - x, top - y))
        return canvas

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """`[fn(item) for item in items]`, with up to `requests` calls at once."""
        items = list(items)
        if self.requests == 1 or len(items) < 2:
            return [fn(item) for item in items]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.requests, thread_name_prefix="conchdb-dicom")
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._wsi.close()
        if self._on_close is not None:
            self._on_close()


@dataclass
class OpenedDicom:
    """What `open_dicom_*` hands `open_slide`: the handle, the checked pixel size, the
    payload attributes."""

    handle: DicomBackend
    pixel_size: PixelSize | None
    attributes: dict[str, str]


def _wsidicom_refusal(exc: BaseException, name: str) -> SlideError:
    return SlideError(
        f"{name}: not a whole-slide image wsidicom can read ({type(exc).__name__}: {exc})",
        fix="check that the series holds a VL Whole Slide Microscopy VOLUME image with Image Type and frames, "
        "or leave it out",
    )


class _QuietBulkData(logging.Filter):
    """pydicom warns, once per instance, that it leaves bulk data (an ICC profile) of DICOM
    JSON metadata unfetched; conchdb never needs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No bulk data URI handler" not in record.getMessage()


_QUIET = _QuietBulkData()


def _quiet() -> None:
    logging.getLogger("pydicom").addFilter(_QUIET)  # adding the same filter twice keeps one
    warnings.filterwarnings("ignore", message="No bulk data URI handler")


def _finish_open(wsi: Any, name: str, requests: int, on_close: Callable[[], None] | None = None) -> OpenedDicom:
    try:
        handle = DicomBackend(wsi, name, requests, on_close)
    except Exception as exc:
        wsi.close()
        raise _wsidicom_refusal(exc, name) from None
    try:
        dataset = handle.dataset
        if int(dataset.get("NumberOfFrames", 0) or 0) < 1:
            raise SlideError(f"{name}: the VOLUME image has no frames", fix="convert the slide again, or leave it out")
        pixel_size = dicom_pixel_size(dataset, name)
        attributes = dicom_attributes(dataset)
    except BaseException:
        handle.close()
        raise
    return OpenedDicom(handle, pixel_size, attributes)


def series_files(path: Path) -> list[Path]:
    """The .dcm files beside `path` that belong to its series (by Series Instance UID)."""
    import pydicom

    def series_of(file: Path) -> str | None:
        try:
            return str(pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                       .get("SeriesInstanceUID", "")) or None
        except Exception:
            return None

    own = series_of(path)
    files = sorted(f for f in path.parent.iterdir() if f.suffix.lower() == ".dcm" and f.is_file())
    return [f for f in files if f == path or (own is not None and series_of(f) == own)]


def check_dicom_file(path: Path) -> PixelSize | None:
    """The checked pixel size in the header of a DICOM file (for series OpenSlide opens);
    raises `SlideError` for a malformed one (see `dicom_pixel_size`)."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise SlideError(f"{path}: not a readable DICOM file ({exc})", fix="re-export it, or leave it out") from None
    if not dataset.get("ImageType"):
        raise SlideError(f"{path}: the DICOM image has no Image Type",
                         fix="convert the slide again with Image Type (e.g. ORIGINAL\\PRIMARY\\VOLUME\\NONE)")
    return dicom_pixel_size(dataset, str(path))


def dicom_file_attributes(path: Path) -> dict[str, str]:
    import pydicom

    try:
        return dicom_attributes(pydicom.dcmread(path, stop_before_pixels=True))
    except Exception:
        return {}


def open_dicom_folder(path: Path, requests: int = 1) -> OpenedDicom:
    """The series of `path` (a .dcm file; its series' files beside it) through wsidicom."""
    from wsidicom import WsiDicom

    files = series_files(path)
    try:
        wsi = WsiDicom.open(files)
    except Exception as exc:
        check_dicom_file(path)  # the header's own fault (no Image Type, bad spacing), if that is what it is
        raise _wsidicom_refusal(exc, str(path)) from None
    return _finish_open(wsi, str(path), requests)


def open_dicomweb(source: str | Path, options: DicomWebOptions | None = None) -> OpenedDicom:
    """The series a DICOMweb source string names, through wsidicom's DICOMweb client."""
    from wsidicom import WsiDicom

    _quiet()
    parsed = parse_source(source)
    if not parsed.series or not parsed.study:
        raise SlideError(f"{source}: names no series",
                         fix="name one: dicomweb+https://HOST/PATH/studies/<study UID>/series/<series UID>",
                         parameter="path")
    server = DicomWebServer(parsed, options)
    name = parsed.url
    try:
        wsi = WsiDicom.open_web(server.client(), parsed.study, parsed.series)
    except Exception as exc:
        server.close()
        error = web_error(exc, name, server.options)
        if error is not None:
            raise error from None
        raise _wsidicom_refusal(exc, name) from None
    opened = _finish_open(wsi, name, server.options.requests, server.close)
    opened.handle.options = server.options
    return opened


# -- discovery -----------------------------------------------------------------------------

# asked for one `includefield` each: Orthanc reads no comma-separated list
SERIES_FIELDS = ("00080050", "00100020", "00080020", "00180015", "0020000D", "0020000E", "00080060")
INSTANCE_FIELDS = ("00080016", "00080018", "00080008", "00280008")


@dataclass(frozen=True)
class FoundSeries:
    """A series found by QIDO-RS: its source, a content identity, its attributes, and the
    reason it is passed over (None: a whole-slide image to tile)."""

    source: DicomWebSource
    identity: str
    attributes: dict[str, str]
    passed_over: str | None = None


def find_series(
    source: DicomWebSource,
    studies: Sequence[str] = (),
    where: Mapping[str, str] | None = None,
    options: DicomWebOptions | None = None,
) -> list[FoundSeries]:
    """The SM series under `source` (its study and series, or `studies`, or the whole
    server), filtered by QIDO-RS attribute matching (`where`: keyword or tag -> value).

    Each series' identity hashes its instances' SOP Instance UIDs, so it changes when an
    instance is added, removed or replaced. Raises `SlideError` when the server cannot be
    searched (down, refusing the credentials, timing out)."""
    server = DicomWebServer(source, options)
    try:
        params: dict[str, Any] = {"Modality": "SM", **(where or {}), "includefield": list(SERIES_FIELDS)}
        if source.series:
            params["SeriesInstanceUID"] = source.series
        scopes = [source.study] if source.study else list(studies) or [None]
        found: list[FoundSeries] = []
        for study in scopes:
            path = f"studies/{study}/series" if study else "series"
            for dataset in server.qido(path, params):
                study_uid = json_value(dataset, "0020000D") or study
                series_uid = json_value(dataset, "0020000E")
                if not study_uid or not series_uid:
                    continue
                found.append(_series(server, source.with_series(study_uid, series_uid), dataset))
        return sorted(found, key=lambda s: str(s.source.series))
    finally:
        server.close()


def _series(server: DicomWebServer, source: DicomWebSource, dataset: Mapping[str, Any]) -> FoundSeries:
    instances = server.qido(f"studies/{source.study}/series/{source.series}/instances",
                            {"includefield": list(INSTANCE_FIELDS)})
    uids = sorted(str(json_value(i, "00080018")) for i in instances)
    digest = hashlib.blake2b("\n".join(uids).encode(), digest_size=16).hexdigest()
    attributes = {name: str(value) for name, tag in (
        ("dicom_accession_number", "00080050"), ("dicom_patient_id", "00100020"), ("dicom_study_date", "00080020"),
        ("dicom_body_part", "00180015")) if (value := _text(json_value(dataset, tag)))}
    classes = [json_value(i, "00080016") for i in instances]
    types = [((i.get("00080008") or {}).get("Value")) for i in instances if "00080008" in i]
    reason = "no instances" if not instances else non_wsi_reason(types, classes)
    return FoundSeries(source, f"dicomweb-{len(uids)}-{digest}", attributes, reason)
