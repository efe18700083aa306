"""CONCH's tokenizer: its byte-level BPE file, called through transformers' fast tokenizer.

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

log = logging.getLogger(__name__)

FETCH_HINT = (
    f"pass --tokenizer PATH or set CONCHDB_TOKENIZER to CONCH's {TOKENIZER_NAME}, put it beside the "
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
            raise TokenizerError(f"tokenizer file not found: {path}", FETCH_HINT)
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
    raise TokenizerError(f"CONCH tokenizer not found (looked at {looked} and the conch package)", FETCH_HINT)


class ConchTokenizer:
    """Texts to (N, 128) int64 ids exactly as CONCH's reference tokenizes them."""

    def __init__(self, path: Path):
        from transformers import PreTrainedTokenizerFast

        try:
            self._tok = PreTrainedTokenizerFast(
                tokenizer_file=str(path),
                bos_token="<start_of_text>",
                eos_token="<end_of_text>",
                pad_token="<pad>",
            )
        except Exception as exc:  # tokenizers raises plain Exception subclasses for bad JSON
            raise TokenizerError(f"cannot load tokenizer {path}: {exc}", FETCH_HINT) from exc
        self.path = Path(path)
        self.pad_id = int(self._tok.pad_token_id)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, MAX_IDS + 1), dtype=np.int64)
        full = self._tok(texts, add_special_tokens=True)["input_ids"]
        for text, ids in zip(texts, full, strict=True):
            if len(ids) > MAX_IDS:
                log.warning(
                    "text truncated to CONCH's context (%d of %d tokens kept): %.60s...",
                    MAX_IDS,
                    len(ids),
                    text,
                )
        ids = self._tok(
            texts, add_special_tokens=True, max_length=MAX_IDS, truncation=True, padding="max_length"
        )["input_ids"]
        out = np.full((len(texts), MAX_IDS + 1), self.pad_id, dtype=np.int64)
        out[:, :MAX_IDS] = np.asarray(ids, dtype=np.int64)
        return out
