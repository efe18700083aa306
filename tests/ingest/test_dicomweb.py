"""`conchdb ingest dicomweb+URL` against a real PACS: Debian's Orthanc with its DICOMweb plugin,
started by the tests (tests/dicom.py), holding the real CMU slide converted to DICOM WSI."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conchdb.archive import file_state
from conchdb.catalog import SlideStatus, slides_collection
from conchdb.cli import app
from conchdb.ingest.cohort import discover_dicomweb
from conchdb.ingest.manifest import read_manifest
from conchdb.ingest.pipeline import Ingest, IngestOptions, Progress, ingest
from conchdb.model.encoder import Encoder
from conchdb.slides.dicom import DicomWebOptions
from conchdb.store.edge import EdgeStore
from tests.dicom import METADATA, start_orthanc

COLLECTION = "conch_tiles"
runner = CliRunner()

FAIL_FAST_S = 30
"""A refused, down or silent server must end the run within seconds, not after retries or the OS's
connect timeout (minutes); the bound is loose so that a loaded CI machine does not fail it."""


@pytest.fixture(scope="module")
def encoder(tiny_ckpt) -> Encoder:
    return Encoder.load(str(tiny_ckpt), device="cpu", need_tokenizer=False)


def _tiles(store: EdgeStore, cohort: str) -> dict[tuple[int, int], tuple[dict, np.ndarray]]:
    return {(h.payload["x"], h.payload["y"]): (h.payload, h.vector)
            for h in store.scroll(COLLECTION, with_vectors=True) if h.payload["cohort"] == cohort}


def _run(cohort, store, encoder, manifest=None, progress=None):
    table = read_manifest(manifest, cohort)
    return Ingest(cohort, table, encoder, store, COLLECTION, IngestOptions(readers=0), progress).run()


def test_dicomweb_ingest_gives_the_tiles_of_the_source_file_and_a_rerun_skips(
    orthanc, encoder, slides_dir, tmp_path
):
    files = tmp_path / "files"
    files.mkdir()
    shutil.copy(slides_dir / "cmu_small_region.svs", files / "cmu.svs")
    (tmp_path / "manifest.csv").write_text("slide,diagnosis\nACC-0001,melanoma\n")  # joined by accession number
    with EdgeStore(tmp_path / "store") as store:
        assert ingest(files, encoder, store, COLLECTION, options=IngestOptions(readers=0)).exit_code == 0
        cohort = discover_dicomweb(orthanc.source)
        (slide,) = cohort.slides
        assert [reason for _, reason in cohort.passed_over] == ["no VOLUME image, only label"]
        assert cohort.name == "127.0.0.1" and slide.path.startswith(orthanc.source + "/studies/")
        summary = _run(cohort, store, encoder, tmp_path / "manifest.csv")
        assert summary.exit_code == 0 and summary.count(SlideStatus.DONE) == 1
        assert summary.to_dict()["passed_over"][0]["reason"] == "no VOLUME image, only label"

        source, web = _tiles(store, "files"), _tiles(store, "127.0.0.1")
        assert web.keys() == source.keys() and len(web) > 5  # the same positions
        for xy, (payload, vector) in web.items():
            assert float(vector @ source[xy][1]) > 0.9999  # the tiles were copied, not re-encoded
            assert payload["mpp"] == pytest.approx(0.499) and payload["size"] == source[xy][0]["size"]
        payload = next(iter(web.values()))[0]
        assert payload["slide_id"] == slide.id == payload["dicom_series_uid"] and payload["path"] == slide.path
        assert payload["diagnosis"] == "melanoma"
        assert {payload[f"dicom_{k}"] for k in ("accession_number", "patient_id", "study_date", "body_part")} == \
            set(METADATA.values())
        (record,) = [h.payload for h in store.scroll(slides_collection(COLLECTION))
                     if h.payload["cohort"] == "127.0.0.1"]
        assert record["path"] == slide.path and file_state(record) == "remote"
        assert record["dicom_patient_id"] == "P-0001" and record["status"] == "done"

        again = _run(discover_dicomweb(orthanc.source), store, encoder, tmp_path / "manifest.csv")
        assert again.count(SlideStatus.SKIPPED) == 1 and again.tiles_written == 0 and again.missing == []
        narrowed = discover_dicomweb(orthanc.source, where={"PatientID": "nobody"})
        assert narrowed.slides == ()


def test_wrong_credentials_and_a_server_down_are_clear_errors_and_write_nothing(tmp_path, tiny_ckpt, cmu_dicom):
    server = start_orthanc(tmp_path / "orthanc", users={"alice": "right-password"})
    try:
        server.store(cmu_dicom)
        args = ["ingest", server.source, "--store", str(tmp_path / "store"), "--checkpoint", str(tiny_ckpt),
                "--device", "cpu"]
        env = {"CONCHDB_DICOMWEB_USER": "alice", "CONCHDB_DICOMWEB_PASSWORD": "wrong-password"}
        started = time.monotonic()
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 2 and time.monotonic() - started < FAIL_FAST_S
        assert server.dicomweb in result.output and "HTTP 401" in result.output
        assert "CONCHDB_DICOMWEB_PASSWORD" in result.output and "wrong-password" not in result.output
        assert "Traceback" not in result.output and not (tmp_path / "store").exists()
        right = DicomWebOptions(user="alice", password="right-password")
        assert len(discover_dicomweb(server.source, options=right).slides) == 1
    finally:
        server.stop()
    started = time.monotonic()
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 2 and time.monotonic() - started < FAIL_FAST_S
    assert "cannot connect to the DICOMweb server" in result.output and server.dicomweb in result.output
    assert not (tmp_path / "store").exists()


def test_orthanc_stopped_mid_ingest_fails_that_slide_alone_and_the_rerun_completes_it(
    tmp_path, encoder, cmu_dicom, cmu_dicom_rle
):
    server = start_orthanc(tmp_path / "orthanc")
    try:
        server.store(cmu_dicom + cmu_dicom_rle)
        cohort = discover_dicomweb(server.source)
        assert len(cohort.slides) == 2
        started: list[str] = []

        def on_slide(slide_id: str, tiles: int) -> None:
            started.append(slide_id)
            if len(started) == 2:
                server.stop()  # the second slide's tiles are read from a server that is gone

        with EdgeStore(tmp_path / "store") as store:
            summary = _run(cohort, store, encoder, progress=Progress(on_slide=on_slide))
            assert summary.count(SlideStatus.DONE) == 1 and len(summary.failed) == 1
            (failed,) = summary.failed
            assert failed.slide_id == started[1] and server.dicomweb in failed.error
            assert "cannot connect to the DICOMweb server" in failed.error
            server.start()
            again = _run(discover_dicomweb(server.source), store, encoder)
            assert again.count(SlideStatus.SKIPPED) == 1 and again.count(SlideStatus.DONE) == 1
            assert again.exit_code == 0
    finally:
        server.stop()


def test_the_json_summary_of_a_dicomweb_ingest(orthanc, tmp_path, tiny_ckpt):
    args = ["ingest", orthanc.source, "--store", str(tmp_path / "store"), "--checkpoint", str(tiny_ckpt),
            "--device", "cpu", "--readers", "1", "--json", "--cohort", "pacs"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["ingested"] == 1 and doc["tiles_written"] > 5 and len(doc["passed_over"]) == 1
    bad = runner.invoke(app, ["ingest", orthanc.source, "--where-dicom", "PatientID", "--store",
                              str(tmp_path / "store2"), "--checkpoint", str(tiny_ckpt)])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output


def test_a_dicomweb_slide_travels_to_a_worker_as_its_source_string(orthanc, encoder):
    from conchdb.ingest.pipeline import plan_slide
    from conchdb.slides.dicom import source_text
    from conchdb.workers.messages import job_from_dict, job_to_dict

    cohort = discover_dicomweb(orthanc.source)
    with EdgeStore(Path(orthanc.folder) / "worker-store") as store:
        job = Ingest(cohort, read_manifest(None, cohort), encoder, store, COLLECTION).job(cohort.slides[0])
        received = job_from_dict(json.loads(json.dumps(job_to_dict(job))))  # through the broker, as JSON
    plan = plan_slide(received)  # the worker opens the series from what the task names
    assert plan.error is None and len(plan.grid) > 5 and plan.info["dicom_accession_number"] == "ACC-0001"
    assert source_text(received.slide.path) == cohort.slides[0].path  # what its records store


def test_tls_is_verified_and_a_ca_bundle_admits_a_private_ca(orthanc, tmp_path, tiny_ckpt, monkeypatch):
    from tests.dicom import TlsProxy, self_signed

    monkeypatch.delenv("CONCHDB_DICOMWEB_CA_BUNDLE", raising=False)  # --ca-bundle sets it: gone after the test
    cert, key = self_signed(tmp_path / "tls")
    proxy = TlsProxy(orthanc.port, cert, key)
    source = f"dicomweb+{proxy.url}/dicom-web"
    try:
        args = ["ingest", source, "--store", str(tmp_path / "store"), "--checkpoint", str(tiny_ckpt), "--device", "cpu"]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "TLS certificate could not be verified" in result.output
        assert "--ca-bundle" in result.output and not (tmp_path / "store").exists()
        (slide,) = discover_dicomweb(source, options=DicomWebOptions(ca_bundle=cert)).slides
        assert slide.path.startswith(source + "/studies/")
        result = runner.invoke(app, [*args, "--ca-bundle", str(cert), "--json", "--readers", "0"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout.strip().splitlines()[-1])["ingested"] == 1
    finally:
        proxy.close()


def test_a_series_with_swapped_pixel_spacing_is_refused_with_the_series_and_both_values(tmp_path, encoder, slides_dir):
    """orthanc-wsi's OrthancWSIDicomizer writes a non-square slide's spacing with width and
    height swapped (the issue's trap): conchdb refuses it rather than tile it at a wrong size."""
    import subprocess

    from tests.conftest import need_tool

    need_tool(shutil.which("OrthancWSIDicomizer") is not None,
              "OrthancWSIDicomizer is not installed (Debian: apt-get install orthanc-wsi)")
    server = start_orthanc(tmp_path / "orthanc")
    try:
        dataset = tmp_path / "dataset.json"  # without it the series has no Image Type
        dataset.write_text(subprocess.run(["OrthancWSIDicomizer", "--sample-dataset"], capture_output=True,
                                          text=True, check=True).stdout)
        width_mm, height_mm = 2220 * 0.499e-3, 2967 * 0.499e-3  # the CMU slide's true imaged size
        subprocess.run(["OrthancWSIDicomizer", "--orthanc", server.url, "--dataset", str(dataset),
                        "--imaged-width", f"{width_mm:.5f}", "--imaged-height", f"{height_mm:.5f}",
                        str(slides_dir / "cmu_small_region.svs")], check=True, capture_output=True)
        cohort = discover_dicomweb(server.source)
        (slide,) = cohort.slides
        with EdgeStore(tmp_path / "store") as store:
            summary = _run(cohort, store, encoder)
        (failed,) = summary.failed
        assert slide.id in failed.error and "non-square pixels" in failed.error
        assert "0.6669 µm wide × 0.3734 µm high" in failed.error
    finally:
        server.stop()


def test_a_server_that_does_not_answer_times_out_naming_the_url(tmp_path, tiny_ckpt):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        started = time.monotonic()
        result = runner.invoke(app, ["ingest", f"dicomweb+{url}", "--store", str(tmp_path / "store"),
                                     "--checkpoint", str(tiny_ckpt)], env={"CONCHDB_DICOMWEB_TIMEOUT": "1"})
        assert result.exit_code == 2 and time.monotonic() - started < FAIL_FAST_S
    assert f"{url}/series: the DICOMweb server did not answer within 1 s" in result.output
    assert "CONCHDB_DICOMWEB_TIMEOUT" in result.output and not (tmp_path / "store").exists()
