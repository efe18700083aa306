"""Find the slides of a cohort: a folder searched recursively, or a single file.

A slide's id is its main file's path relative to the cohort root, in POSIX form
(`case_01/slide.svs`): stable across machines and runs, readable in results, and unique
by construction, except on case-insensitive file systems, so ids that differ only in
case are refused. Its content identity (size and a hash of the first and last MiB) is
cheap enough for any cohort and notices a file replaced under the same name.

Multi-file formats count once:
- DICOM: the .dcm files of one folder that share a SeriesInstanceUID are one slide
  (OpenSlide opens the series from any of them); the main file is the first by name.
  Files whose header carries no readable series UID are grouped by folder.
- MIRAX: the `.mrxs` file is the slide; the folder of the same name beside it holds its
  data and is not searched. Its identity includes `Slidedat.ini`, which changes when the
  slide is rescanned even if the small `.mrxs` file does not.
- Hamamatsu VMS/VMU: the JPEG and map files a `.vms` names are part of it, not images.

Everything else that is not a slide or image is skipped and counted; hidden files and
folders (names starting with '.') are ignored. Two paths with the same content are
an error: they would collide in the store.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conchdb.errors import SlideError

SLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm"}
)
"""Formats OpenSlide reads (.tif/.tiff may also be plain images, decided at open)."""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
"""Plain images read through Pillow."""

IDENTITY_CHUNK = 1 << 20
"""Bytes hashed at each end of a file for its content identity."""

DICOM_HEADER_BYTES = 1 << 18
"""How much of a .dcm file is searched for its SeriesInstanceUID."""

_SERIES_UID_TAG = b"\x20\x00\x0e\x00"  # (0020,000E), little endian
_UID = re.compile(rb"^[0-9.]{1,64}$")


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort: its id, the file to open (or a DICOMweb source string, kept a
    string since a `Path` folds its `//`), its content identity, and all its files; `aliases`
    are further names a manifest's `slide` column may call it by (a DICOM series' Series
    Instance UID and accession number)."""

    id: str
    path: Path | str
    identity: str
    files: tuple[Path, ...]
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cohort:
    """The slides found under `root`, sorted by id, and the files passed over."""

    root: Path
    slides: tuple[CohortSlide, ...]
    skipped: tuple[Path, ...]
    passed_over: tuple[tuple[str, str], ...] = ()
    """DICOM series that are not whole-slide images to tile (labels, overviews, thumbnails
    only): (series, reason)."""
    source: str | None = None
    """The DICOMweb server searched (its source string), for a cohort found over DICOMweb."""

    def __len__(self) -> int:
        return len(self.slides)

    @property
    def name(self) -> str:
        """The default cohort name: the folder's name, or a DICOMweb server's host."""
        if self.source is not None:
            from urllib.parse import urlsplit

            return urlsplit(self.source.removeprefix("dicomweb+")).hostname or "dicomweb"
        return self.root.name

    def by_id(self) -> dict[str, CohortSlide]:
        return {slide.id: slide for slide in self.slides}


def content_identity(path: Path, extra: Iterable[Path] = ()) -> str:
    """`<size>-<hash>`: the file size and a BLAKE2b of its first and last MiB (and of any
    `extra` companion files), which changes when the file is replaced."""
    digest = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    for file in (path, *extra):
        file_size = file.stat().st_size
        with file.open("rb") as fh:
            digest.update(fh.read(IDENTITY_CHUNK))
            if file_size > IDENTITY_CHUNK:
                fh.seek(max(IDENTITY_CHUNK, file_size - IDENTITY_CHUNK))
                digest.update(fh.read(IDENTITY_CHUNK))
        digest.update(str(file_size).encode())
    return f"{size}-{digest.hexdigest()}"


def dicom_series_uid(path: Path) -> str | None:
    """The SeriesInstanceUID from a DICOM file's header, or None if it cannot be found.

    A byte search rather than a DICOM parser: the tag and its value representation are
    enough for explicit and implicit little-endian files, which WSI files are."""
    with path.open("rb") as fh:
        head = fh.read(DICOM_HEADER_BYTES)
    at = head.find(_SERIES_UID_TAG, 132 if head[128:132] == b"DICM" else 0)
    while at >= 0:
        if head[at + 4 : at + 6] == b"UI":
            length, start = int.from_bytes(head[at + 6 : at + 8], "little"), at + 8
        else:
            length, start = int.from_bytes(head[at + 4 : at + 8], "little"), at + 8
        value = head[start : start + length].rstrip(b"\x00 ")
        if _UID.match(value):
            return value.decode()
        at = head.find(_SERIES_UID_TAG, at + 1)
    return None


def vms_companions(vms: Path) -> set[str]:
    """Names of the files a Hamamatsu .vms/.vmu index refers to (image tiles, map, optimisation)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        parser.read_string(vms.read_text(errors="replace"))
    except configparser.Error:
        return set()
    names = set()
    for section in parser.sections():
        for key, value in parser.items(section):
            if key.startswith(("imagefile", "mapfile", "optimisationfile", "macroimage")) and value.strip():
                names.add(value.strip())
    return names


def _walk(root: Path) -> Iterable[tuple[Path, list[str]]]:
    """(folder, sorted visible file names), depth first in name order, skipping hidden and
    MIRAX data folders."""
    for folder, dirs, files in os.walk(root):
        stems = {Path(f).stem for f in files if f.lower().endswith(".mrxs")}
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in stems)
        yield Path(folder), sorted(f for f in files if not f.startswith("."))


def _slide_id(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _make_slide(root: Path, files: list[Path]) -> CohortSlide:
    main = files[0]
    extra: tuple[Path, ...] = ()
    aliases: tuple[str, ...] = ()
    if main.suffix.lower() == ".mrxs":
        ini = main.with_suffix("") / "Slidedat.ini"
        extra = (ini,) if ini.is_file() else ()
    elif main.suffix.lower() == ".dcm":
        aliases = _dicom_aliases(main)
    return CohortSlide(_slide_id(root, main), main, content_identity(main, extra), tuple(files), aliases)


def _dicom_header(path: Path) -> Any:
    """A DICOM file's header (no pixels) through pydicom, or None when it cannot be read."""
    try:
        import pydicom

        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None


def _dicom_aliases(path: Path) -> tuple[str, ...]:
    header = _dicom_header(path)
    if header is None:
        return ()
    return tuple(str(v) for v in (header.get("SeriesInstanceUID"), header.get("AccessionNumber")) if v)


def _dicom_passed_over(files: list[Path]) -> str | None:
    """Why a DICOM series in a folder is not a whole-slide image to tile (see
    `conchdb.slides.dicom.non_wsi_reason`), or None."""
    from conchdb.slides.dicom import non_wsi_reason

    headers = [h for h in (_dicom_header(f) for f in files) if h is not None]
    if not headers:
        return None
    # By Image Type only: a folder's .dcm files with another SOP class still go to OpenSlide, as before.
    return non_wsi_reason([list(h.get("ImageType") or []) or None for h in headers])


def _classify_folder(folder: Path, names: list[str]) -> tuple[list[list[Path]], list[Path]]:
    """Split one folder's files into slides (lists of files, main first) and skipped files."""
    companions: set[str] = set()
    for name in names:
        if Path(name).suffix.lower() in (".vms", ".vmu"):
            companions |= vms_companions(folder / name)
    slides: list[list[Path]] = []
    dicom: dict[str | None, list[Path]] = defaultdict(list)
    skipped: list[Path] = []
    for name in names:
        path = folder / name
        suffix = path.suffix.lower()
        if name in companions:
            continue
        if suffix == ".dcm":
            dicom[dicom_series_uid(path)].append(path)
        elif suffix in SLIDE_EXTENSIONS or suffix in IMAGE_EXTENSIONS:
            slides.append([path])
        else:
            skipped.append(path)
    for files in dicom.values():
        # the VOLUME files first: OpenSlide and wsidicom open the series from any of its files,
        # but a label's file would make the slide's id
        files.sort(key=lambda f: (_dicom_passed_over([f]) is not None, f.name))
        slides.append(files)
    return slides, skipped


def _check_unique(slides: list[CohortSlide]) -> None:
    """Ids equal but for case, or two paths with the same content, are refused up front."""
    problems = []
    for key, what in ((lambda s: s.id.casefold(), "ids that differ only in case"),
                      (lambda s: s.identity, "identical content")):
        seen: dict[str, CohortSlide] = {}
        for slide in slides:
            other = seen.setdefault(key(slide), slide)
            if other is not slide:
                problems.append(f"{other.path} and {slide.path} ({what})")
    if problems:
        raise SlideError(
            "duplicate slides in the cohort: " + "; ".join(problems),
            fix="remove or rename one of each pair; a slide must appear once so its tiles are stored once",
            parameter="path",
        )


def discover(path: str | Path) -> Cohort:
    """The slides under `path` (a folder, searched recursively, or one slide file).

    Raises `SlideError` for a missing path, a single file that is not a slide, or
    duplicate slides, before any slide is opened."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        if path.suffix.lower() not in SLIDE_EXTENSIONS | IMAGE_EXTENSIONS:
            raise SlideError(
                f"{path}: not a slide or image file (by its extension)",
                fix="give a slide (svs, tif/tiff, ndpi, vms, vmu, scn, mrxs, bif, svslide, dcm), "
                "an image (png, jpg) or a folder of them",
                parameter="path",
            )
        return Cohort(path.parent, (_make_slide(path.parent, [path]),), ())
    if not path.is_dir():
        raise SlideError(f"{path}: no such file or folder", fix="check the path", parameter="path")
    groups: list[list[Path]] = []
    skipped: list[Path] = []
    passed_over: list[tuple[str, str]] = []
    for folder, names in _walk(path):
        folder_slides, folder_skipped = _classify_folder(folder, names)
        for files in folder_slides:
            reason = _dicom_passed_over(files) if files[0].suffix.lower() == ".dcm" else None
            if reason is None:
                groups.append(files)
            else:
                passed_over.append((_slide_id(path, files[0]), reason))
        skipped.extend(folder_skipped)
    slides = sorted((_make_slide(path, files) for files in groups), key=lambda s: s.id)
    _check_unique(slides)
    return Cohort(path, tuple(slides), tuple(skipped), tuple(passed_over))


def discover_dicomweb(
    source: str,
    studies: tuple[str, ...] = (),
    where: dict[str, str] | None = None,
    options: Any | None = None,
) -> Cohort:
    """The whole-slide series on a DICOMweb server (QIDO-RS, modality SM), as a cohort.

    A series' slide id is its Series Instance UID (so a rerun finds it whatever the URL),
    its path the source string naming it, its identity a hash of its instances' SOP
    Instance UIDs; its accession number is an alias a manifest may join by. Series that are
    not whole-slide images are passed over with their reason. `where` is QIDO-RS attribute
    matching (`{"PatientID": "P1"}`). Raises `SlideError` when the server cannot be searched."""
    from conchdb.slides.dicom import find_series, parse_source

    server = parse_source(source)
    slides, passed_over = [], []
    for found in find_series(server, studies, where, options):
        uid = str(found.source.series)
        if found.passed_over:
            passed_over.append((uid, found.passed_over))
            continue
        accession = found.attributes.get("dicom_accession_number")
        aliases = (uid, accession) if accession else (uid,)
        slides.append(CohortSlide(uid, str(found.source), found.identity, (), aliases))
    return Cohort(Path(server.base.split("://", 1)[-1]), tuple(slides), (), tuple(passed_over), str(server))
