"""A DICOMweb slide through the broker: the task names the series by its source string, a
`conchdb worker` opens it from the PACS (Orthanc, tests/dicom.py) and embeds it."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from conchdb.archive import file_state
from conchdb.catalog import slides_collection
from conchdb.cli import app
from conchdb.store.edge import EdgeStore
from tests.workers.conftest import BATCH

runner = CliRunner()


def test_a_worker_ingests_a_dicomweb_series_and_the_rerun_skips_it(redis_server, workers, orthanc, tmp_path):
    workers.ensure(1)
    store = tmp_path / "store"
    args = ["ingest", orthanc.source, "--broker", redis_server.url, "--store", str(store),
            "--batch-size", str(BATCH), "--readers", "1", "--json"]
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.exit_code == 0, result.output + workers.logs()
    assert doc["ingested"] == 1 and doc["tiles_written"] > 5 and len(doc["passed_over"]) == 1
    opened = EdgeStore(store)
    try:
        (record,) = [h.payload for h in opened.scroll(slides_collection("conch_tiles"))]
        tile = next(iter(opened.scroll("conch_tiles"))).payload
    finally:
        opened.close()
    assert record["status"] == "done" and record["path"].startswith(orthanc.source + "/studies/")
    assert file_state(record) == "remote" and tile["path"] == record["path"]
    assert tile["dicom_accession_number"] == "ACC-0001"
    again = json.loads(runner.invoke(app, args).stdout.strip().splitlines()[-1])
    assert again["skipped"] == 1 and again["tiles_written"] == 0 and again["missing"] == []
