"""Tokenizer lookup, truncation warning, and the verified download."""

from __future__ import annotations

import hashlib
import http.server
import logging
import threading
from pathlib import Path

import pytest

from conchdb.errors import TokenizerError
from conchdb.model.fetch import fetch_tokenizer
from conchdb.model.tokenizer import TOKENIZER_NAME, TOKENIZER_SHA256, ConchTokenizer, resolve_tokenizer


def test_shared_tokenizer_is_the_pinned_file(tokenizer_path: Path):
    assert hashlib.sha256(tokenizer_path.read_bytes()).hexdigest() == TOKENIZER_SHA256


def test_lookup_order(tmp_path, tokenizer_path):
    models = tmp_path / "models"
    with pytest.raises(TokenizerError, match="not found") as info:
        resolve_tokenizer(None, None, None, models)
    assert "conchdb model fetch" in info.value.fix
    with pytest.raises(TokenizerError, match="missing.json"):
        resolve_tokenizer(tmp_path / "missing.json", None, None, models)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    (ckpt_dir / TOKENIZER_NAME).write_bytes(tokenizer_path.read_bytes())
    found = resolve_tokenizer(None, None, str(ckpt_dir / "pytorch_model.bin"), models)
    assert found == ckpt_dir / TOKENIZER_NAME
    assert resolve_tokenizer(None, tokenizer_path, str(ckpt_dir / "x.bin"), models) == tokenizer_path


def test_not_a_tokenizer_file(tmp_path):
    bad = tmp_path / "tok.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="tok.json"):
        ConchTokenizer(bad)


def test_long_text_is_truncated_with_a_warning(tokenizer_path, caplog):
    tok = ConchTokenizer(tokenizer_path)
    with caplog.at_level(logging.WARNING):
        ids = tok(["tumor " * 400, "tumor"])
    assert ids.shape == (2, 128)
    assert ids[0, 126] == 2 and ids[0, 127] == 0  # end token kept, placeholder appended
    assert "truncated" in caplog.text
    assert ids[1, 0] == 1 and (ids[1] == 2).sum() == 1


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(body: bytes) -> str:
        handler = type("Handler", (_Handler,), {"body": body})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/{TOKENIZER_NAME}"

    yield start
    for server in servers:
        server.shutdown()


def test_download_verified(tmp_path, tokenizer_path, serve):
    url = serve(tokenizer_path.read_bytes())
    path = fetch_tokenizer(tmp_path / "models", url)
    assert path.read_bytes() == tokenizer_path.read_bytes()


def test_download_with_wrong_checksum_is_refused(tmp_path, serve):
    url = serve(b'{"version": "1.0", "tampered": true}')
    dest = tmp_path / "models"
    with pytest.raises(TokenizerError, match="sha256"):
        fetch_tokenizer(dest, url)
    assert not (dest / TOKENIZER_NAME).exists()


def test_download_failure_names_the_address(tmp_path):
    with pytest.raises(TokenizerError, match="127.0.0.1:9"):
        fetch_tokenizer(tmp_path, "http://127.0.0.1:9/tok.json")
