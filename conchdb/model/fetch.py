"""`conchdb model fetch`: put the CONCH weights and tokenizer where conchdb looks for them.

The tokenizer comes from the CONCH repository at a pinned commit and is checked against
its known sha256 before it replaces anything, so a proxy error page or a changed file is
refused instead of silently producing different token ids.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from conchdb.errors import TokenizerError
from conchdb.model.checkpoint import HF_PREFIX, HF_REPO, download_from_hub
from conchdb.model.tokenizer import TOKENIZER_NAME, TOKENIZER_SHA256, TOKENIZER_URL


def fetch_tokenizer(dest_dir: Path, url: str = TOKENIZER_URL, sha256: str = TOKENIZER_SHA256) -> Path:
    """Download the tokenizer file into `dest_dir`, verified, written atomically."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / TOKENIZER_NAME
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise TokenizerError(
            f"downloading the tokenizer from {url} failed: {exc}",
            f"check the network, or download {TOKENIZER_NAME} yourself and give its path as the tokenizer",
            parameter="tokenizer_url",
        ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise TokenizerError(
            f"the tokenizer from {url} has sha256 {digest}, expected {sha256}; nothing was written",
            "the file at that address is not CONCH's tokenizer at the pinned commit; fetch it again later "
            "or give the path of a verified copy as the tokenizer",
            parameter="tokenizer_url",
        )
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".tokenizer-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, target)
    return target


def fetch_weights(dest_dir: Path, repo: str = HF_REPO) -> Path:
    """Download `pytorch_model.bin` (HF_TOKEN with granted access needed) into `dest_dir`."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    return download_from_hub(f"{HF_PREFIX}{repo}", local_dir=dest_dir)
