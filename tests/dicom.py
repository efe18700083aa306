"""DICOM test helpers: whole-slide DICOM made from the real test slides with `wsidicomizer`,
and a real PACS, Debian's Orthanc with its DICOMweb plugin, on a free loopback port with a
temporary storage folder. Fixtures that use them are in `tests/conftest.py`."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
METADATA = {"AccessionNumber": "ACC-0001", "PatientID": "P-0001", "StudyDate": "20240315",
            "BodyPartExamined": "SKIN"}


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here (None: it can)."""
    if shutil.which(ORTHANC) is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)"
    return None


def dicomizer_missing() -> str | None:
    try:
        import wsidicomizer  # noqa: F401
        from opentile.jpeg.jpeg import find_turbojpeg_path

        find_turbojpeg_path()
    except (ImportError, FileNotFoundError) as exc:
        return (f"wsidicomizer cannot convert slides here ({exc}; pip install wsidicomizer, "
                "apt-get install libturbojpeg0)")
    return None


def convert(slide: Path, folder: Path, *, encoding: object | None = None, metadata: dict | None = None) -> list[Path]:
    """`slide` as DICOM WSI files in `folder` (tiles copied unless `encoding` is given), with
    `metadata` attributes set on every instance."""
    from pydicom import Dataset
    from wsidicomizer import WsiDicomizer

    extra = Dataset()
    for key, value in (metadata or {}).items():
        setattr(extra, key, value)
    options = {"encoding": encoding, "force_transcoding": True} if encoding is not None else {}
    files = WsiDicomizer.convert(slide, folder, metadata_post_processor=extra, **options)
    return [Path(f) for f in files]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc server; `start()` and `stop()` may be called again (same port and storage)."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None):
        self.folder = folder
        self.port = free_port()
        self.users = users
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.source = f"dicomweb+{self.dicomweb}"
        self.proc: subprocess.Popen | None = None
        storage = folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "conchdb-test", "HttpPort": self.port, "DicomPort": 0, "DicomServerEnabled": False,
            "StorageDirectory": str(storage), "IndexDirectory": str(storage), "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config))

    def _request(self, path: str, data: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        if self.users:
            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
        if data is not None:
            request.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    def start(self) -> Orthanc:
        log = (self.folder / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                self._request("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (self.folder / "orthanc.log").read_text()[-2000:]
                    raise RuntimeError(f"Orthanc did not start: {log_text}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def store(self, files: list[Path]) -> None:
        for file in files:
            self._request("/instances", file.read_bytes())


def start_orthanc(folder: Path, users: dict[str, str] | None = None) -> Orthanc:
    reason = orthanc_missing()
    if reason is not None:
        from tests.conftest import need_tool

        need_tool(False, reason)
    return Orthanc(folder, users).start()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class TlsProxy:
    """HTTPS on a free loopback port in front of a plain HTTP port, in threads of this process.

    Debian's Orthanc 1.10 drops the connection when its own HTTPS (`SslEnabled`) is used
    here, so the TLS tests put this in front of it, as a hospital puts a reverse proxy."""

    def __init__(self, target_port: int, cert: Path, key: Path):
        import ssl
        import threading

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        import threading

        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except OSError:  # a client that refuses our certificate: the point of the test
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target))

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (source, sink):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, secure), daemon=True).start()
        pump(secure, upstream)

    def close(self) -> None:
        self.listener.close()


def need_dicomizer() -> None:
    reason = dicomizer_missing()
    if reason is not None:
        from tests.conftest import need_tool

        need_tool(False, reason)


def only_label(files: list[Path], folder: Path) -> Path:
    """The label instance of a converted slide, alone in a new series (a label-only series)."""
    import pydicom
    from pydicom.uid import generate_uid

    for file in files:
        dataset = pydicom.dcmread(file)
        if "LABEL" in [str(v).upper() for v in dataset.ImageType]:
            dataset.SeriesInstanceUID = generate_uid()
            dataset.SOPInstanceUID = generate_uid()
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            folder.mkdir(parents=True, exist_ok=True)
            out = folder / "label.dcm"
            dataset.save_as(out)
            return out
    pytest.fail("the converted slide has no label")
