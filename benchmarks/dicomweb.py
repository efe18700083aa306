"""Reading a whole-slide image over DICOMweb: tiles/s from Orthanc on loopback with 1, 4 and 16
requests in flight, beside reading the same slide from its file, in one run.

Writes a synthetic slide of real H&E (`cmu_small_region.svs`, 0.499 µm/px, repeated to
`--size` px square) as a tiled JPEG TIFF, converts it to DICOM WSI with `wsidicomizer`
(the JPEG tiles are copied, so both sources hold the same compressed frames), stores it in
a fresh Orthanc (Debian's `orthanc` and `orthanc-dicomweb`, started on a free loopback port
with a temporary storage folder), and then reads every 512-px tile at 0.5 µm/px of the slide
in batches of 32, as one tile reader process does:

- file: `open_slide` on the TIFF (OpenSlide), tiles read one after another;
- dicomweb ×N: `open_slide` on the series' `dicomweb+http://...` source with
  `CONCHDB_DICOMWEB_REQUESTS=N`: each tile is one WADO-RS request for its frames, N at once.

Each source is opened fresh (no frames cached from an earlier pass). The pixels read from
Orthanc are checked against the file's (the same JPEG frames; OpenSlide's and wsidicom's
JPEG decoders may differ by a level in chroma upsampling, so the mean difference is
printed). The load average is printed: tiles/s depends on what else the machine runs.

    python benchmarks/dicomweb.py [--size 6144] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from conchdb.slides.pyramid import write_pyramid_tiff
from conchdb.slides.reader import ReadSpec, read_batch
from conchdb.slides.slide import open_slide

MPP = 0.499
TILE_PX, TARGET_MPP, BATCH = 512, 0.5, 32
REQUESTS = (1, 4, 16)
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def default_source() -> Path:
    assets = os.environ.get("CONCHDB_TEST_ASSETS") or str(Path(__file__).resolve().parents[2] / "shared")
    return Path(assets) / "fixtures" / "slides" / "cmu_small_region.svs"


def make_slide(folder: Path, size: int, source: Path) -> Path:
    with open_slide(source) as slide:
        pixels = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    reps = (-(-size // pixels.shape[0]), -(-size // pixels.shape[1]), 1)
    big = np.tile(pixels, reps)[:size, :size]
    return write_pyramid_tiff(folder / "slide.tif", [big], mpp=MPP, tile=256, quality=90)


def start_orthanc(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    storage = folder / "storage"
    storage.mkdir()
    config = {"Name": "bench", "HttpPort": port, "DicomServerEnabled": False, "StorageDirectory": str(storage),
              "IndexDirectory": str(storage), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("wb")
    proc = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/system", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("Orthanc did not start")


def upload(url: str, files: list[Path]) -> None:
    for file in files:
        request = urllib.request.Request(url + "/instances", data=file.read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
        urllib.request.urlopen(request, timeout=60).read()


def read_all(path: str | Path, coords: np.ndarray, spec: ReadSpec) -> tuple[float, np.ndarray]:
    """Seconds to open `path` and read every tile in batches; and the first batch's pixels."""
    start = time.perf_counter()
    first = None
    with open_slide(path) as slide:
        out = np.empty((BATCH, TILE_PX, TILE_PX, 3), dtype=np.uint8)
        for begin in range(0, len(coords), BATCH):
            batch = coords[begin : begin + BATCH]
            read_batch(slide, spec, batch, out)
            if first is None:
                first = out[: len(batch)].copy()
    return time.perf_counter() - start, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=6144, help="slide side in level-0 pixels")
    parser.add_argument("--source", type=Path, default=default_source())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("Orthanc") is None or not Path(PLUGIN).is_file():
        raise SystemExit("needs Debian's orthanc and orthanc-dicomweb (apt-get install orthanc orthanc-dicomweb)")
    from wsidicomizer import WsiDicomizer

    from conchdb.slides.dicom import find_series, parse_source

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tif = make_slide(folder, args.size, args.source)
        started = time.perf_counter()
        files = [Path(f) for f in WsiDicomizer.convert(tif, folder / "dicom", include_label=False,
                                                       include_overview=False, include_thumbnail=False)]
        convert_s = time.perf_counter() - started
        proc, url = start_orthanc(folder)
        try:
            started = time.perf_counter()
            upload(url, files)
            upload_s = time.perf_counter() - started
            (series,) = find_series(parse_source(f"dicomweb+{url}/dicom-web"))
            source = str(series.source)
            size0 = round(TILE_PX * TARGET_MPP / MPP)
            side = args.size // size0
            coords = np.array([(x * size0, y * size0) for y in range(side) for x in range(side)], dtype=np.int64)
            spec = ReadSpec(0, size0, TILE_PX, False, (args.size, args.size))
            rows = []
            file_s, reference = read_all(tif, coords, spec)
            rows.append({"source": "file (OpenSlide)", "requests": 1, "seconds": file_s})
            for requests in REQUESTS:
                os.environ["CONCHDB_DICOMWEB_REQUESTS"] = str(requests)
                seconds, pixels = read_all(source, coords, spec)
                diff = np.abs(pixels.astype(np.int16) - reference).mean()
                if diff > 2.0:  # JPEG decoders may differ by a level here and there, not more
                    raise SystemExit(f"the tiles read from Orthanc differ from the file's (mean |Δ| {diff:.2f})")
                rows.append({"source": "dicomweb (Orthanc, loopback)", "requests": requests, "seconds": seconds,
                             "mean_abs_diff": round(float(diff), 3)})
        finally:
            proc.terminate()
            proc.wait(10)
    for row in rows:
        row["tiles_per_s"] = round(len(coords) / row["seconds"], 1)
        row["vs_file"] = round(file_s / row["seconds"], 2)
        row["seconds"] = round(row["seconds"], 2)
    doc = {"slide_px": args.size, "tiles": len(coords), "tile_px": TILE_PX, "target_mpp": TARGET_MPP,
           "batch": BATCH, "convert_s": round(convert_s, 2), "upload_s": round(upload_s, 2),
           "load_avg": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), "rows": rows}
    if args.json:
        print(json.dumps(doc))
        return
    print(f"slide {args.size}×{args.size} px at {MPP} µm/px, {len(coords)} tiles of {TILE_PX} px at "
          f"{TARGET_MPP} µm/px, "
          f"batches of {BATCH}; converted in {doc['convert_s']} s, stored in Orthanc in {doc['upload_s']} s; "
          f"load {doc['load_avg']} on {doc['cpus']} CPUs")
    print(f"{'source':<30} {'in flight':>9} {'seconds':>8} {'tiles/s':>8} {'× file':>7}")
    for row in rows:
        print(f"{row['source']:<30} {row['requests']:>9} {row['seconds']:>8} {row['tiles_per_s']:>8} "
              f"{row['vs_file']:>7}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
