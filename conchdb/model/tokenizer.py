"""CONCH's tokenizer: its byte-level BPE file, run by the `tokenizers` library.

The reference pads every text to 127 ids (start and end tokens included) and appends one
pad id, which the text tower replaces with its CLS embedding: 128 ids in all. The file is
CC-BY-NC-ND, so conchdb never ships it; it is found on disk or fetched by `conchdb model fetch`.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conchdb.errors import TokenizerError

TOKENIZER_NAME = "conch_byte_level_bpe_uncased.json"
TOKENIZER_SHA256 = "a3861e67c64d32670eb6725a8e52d7dbdd2a06646a4a3c7463052ae7110760fb"
TOKENIZER_COMMIT = "141cc09"
TOKENIZER_URL = (
    f"https://raw.githubusercontent.com/mahmoodlab/CONCH/{TOKENIZER_COMMIT}/"
    f"conch/open_clip_custom/tokenizers/{TOKENIZER_NAME}"
)
MAX_IDS = 127  # the context is 128; the last position belongs to the CLS embedding
PAD_TOKEN = "<pad>"

log = logging.getLogger(__name__)

FETCH_HINT = (
    f"give the path of CONCH's {TOKENIZER_NAME} as the tokenizer or set CONCHDB_TOKENIZER to it, put it beside the "
    "checkpoint, or run `conchdb model fetch` to download it"
)


def _installed_conch_tokenizer() -> Path | None:
    spec = importlib.util.find_spec("conch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "open_clip_custom" / "tokenizers" / TOKENIZER_NAME
        if candidate.is_file():
            return candidate
    return None


def resolve_tokenizer(
    explicit: Path | None, env_value: Path | None, checkpoint: str | None, home_models_dir: Path
) -> Path:
    """The tokenizer file, by the documented order."""
    for candidate in (explicit, env_value):
        if candidate is not None:
            path = Path(candidate).expanduser()
            if path.is_file():
                return path
            raise TokenizerError(f"tokenizer file not found: {path}", FETCH_HINT, parameter="tokenizer")
    candidates = []
    if checkpoint and not checkpoint.startswith("hf_hub:"):
        candidates.append(Path(checkpoint).expanduser().parent / TOKENIZER_NAME)
    candidates.append(home_models_dir / TOKENIZER_NAME)
    for path in candidates:
        if path.is_file():
            return path
    installed = _installed_conch_tokenizer()
    if installed is not None:
        return installed
    looked = ", ".join(str(p) for p in candidates)
    raise TokenizerError(
        f"CONCH tokenizer not found (looked at {looked} and the conch package)", FETCH_HINT, parameter="tokenizer"
    )


class ConchTokenizer:
    """Texts to (N, 128) int64 ids exactly as CONCH's reference tokenizes them.

    The file is read with the `tokenizers` library (what transformers' fast tokenizer runs
    underneath), which gives the same ids without importing transformers."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            text = Path(path).read_text(encoding="utf-8")
            self._full = Tokenizer.from_str(text)  # untruncated, to warn about long texts
            self._tok = Tokenizer.from_str(text)
            pad_id = self._tok.token_to_id(PAD_TOKEN)
            if pad_id is None:
                raise ValueError(f"it has no {PAD_TOKEN} token")
        except Exception as exc:  # tokenizers raises plain Exception subclasses for bad JSON
            raise TokenizerError(f"cannot load tokenizer {path}: {exc}", FETCH_HINT, parameter="tokenizer") from exc
        self.path = Path(path)
        self.pad_id = int(pad_id)
        self._tok.enable_truncation(MAX_IDS)
        self._tok.enable_padding(length=MAX_IDS, pad_id=self.pad_id, pad_token=PAD_TOKEN)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Ids for each text; a bare string is one text, not a sequence of characters."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, MAX_IDS + 1), dtype=np.int64)
        for text, encoding in zip(texts, self._full.encode_batch(texts, add_special_tokens=True), strict=True):
            if len(encoding.ids) > MAX_IDS:
                log.warning(
                    "text truncated to CONCH's context (%d of %d tokens kept): %.60s...",
                    MAX_IDS,
                    len(encoding.ids),
                    text,
                )
        ids = [encoding.ids for encoding in self._tok.encode_batch(texts, add_special_tokens=True)]
        out = np.full((len(texts), MAX_IDS + 1), self.pad_id, dtype=np.int64)
        out[:, :MAX_IDS] = np.asarray(ids, dtype=np.int64)
        return out
