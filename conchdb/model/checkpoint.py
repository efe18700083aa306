"""Finding and loading CONCH weights.

The release is a gated `pytorch_model.bin` on Hugging Face. We accept that file (or a
`.pt`/`.safetensors` copy, a `state_dict` wrapper, a DataParallel `module.` prefix),
drop what retrieval never runs (caption pooler and decoder), and refuse anything else
that does not fit, listing the keys, because a silently half-loaded model produces
plausible-looking but meaningless vectors.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from conchdb.errors import CheckpointError
from conchdb.model.config import ConchConfig

HF_REPO = "MahmoodLab/conch"
HF_PREFIX = "hf_hub:"
WEIGHTS_NAME = "pytorch_model.bin"
# Where the CONCH README tells users to put the weights, relative to the working folder.
CONVENTIONAL_PATH = Path("checkpoints") / "conch" / WEIGHTS_NAME
# Keys of modules that retrieval does not compute; tolerated in a checkpoint and dropped.
UNUSED_PREFIXES = ("text_decoder.", "visual.attn_pool_caption.", "visual.ln_caption.")

ACCESS_HINT = (
    f"request access at https://huggingface.co/{HF_REPO}, then either download {WEIGHTS_NAME} and give "
    f"its path as the checkpoint (or set CONCHDB_CHECKPOINT, or put it at {CONVENTIONAL_PATH}), "
    f"or set HF_TOKEN and run `conchdb model fetch` (or give the checkpoint as {HF_PREFIX}{HF_REPO})"
)


def resolve_checkpoint(explicit: str | None, env_value: str | None, home_models_dir: Path) -> str:
    """The checkpoint to load, by the documented order; a path or an `hf_hub:` reference."""
    for candidate in (explicit, env_value):
        if candidate:
            if candidate.startswith(HF_PREFIX) or Path(candidate).expanduser().is_file():
                return candidate if candidate.startswith(HF_PREFIX) else str(Path(candidate).expanduser())
            raise CheckpointError(f"checkpoint not found: {candidate}", ACCESS_HINT, parameter="checkpoint")
    for path in (CONVENTIONAL_PATH, home_models_dir / WEIGHTS_NAME):
        if path.is_file():
            return str(path)
    raise CheckpointError(
        f"no CONCH checkpoint found (looked at the checkpoint given, CONCHDB_CHECKPOINT, {CONVENTIONAL_PATH}, "
        f"{home_models_dir / WEIGHTS_NAME})",
        ACCESS_HINT,
        parameter="checkpoint",
    )


def download_from_hub(reference: str, local_dir: Path | None = None) -> Path:
    """Fetch `pytorch_model.bin` through huggingface_hub (token from HF_TOKEN; cache; offline mode)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo = reference[len(HF_PREFIX) :] if reference.startswith(HF_PREFIX) else reference
    try:
        return Path(hf_hub_download(repo, WEIGHTS_NAME, local_dir=local_dir))
    except GatedRepoError as exc:
        raise CheckpointError(
            f"access to {repo} is gated and this token has none", ACCESS_HINT, parameter="checkpoint"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"Hugging Face repository {repo} not found, or it is gated and no HF_TOKEN is set",
            ACCESS_HINT,
            parameter="checkpoint",
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{repo}/{WEIGHTS_NAME} is not in the local cache and the hub cannot be reached "
            f"(offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')})",
            ACCESS_HINT,
            parameter="checkpoint",
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"downloading {repo}/{WEIGHTS_NAME} failed: {exc}", ACCESS_HINT, parameter="checkpoint"
        ) from exc


def read_checkpoint(path: str | Path, mmap: bool = False) -> tuple[dict[str, torch.Tensor], ConchConfig | None]:
    """Tensors from a checkpoint file, unwrapped and without a `module.` prefix.

    With `mmap`, a zip-format PyTorch file is memory-mapped: a tensor's bytes are read from
    disk only when it is used, so loading one tower does not read the other's weights.

    A wrapper dict may carry `conchdb_config` (a `ConchConfig.to_dict()`), which is how
    conchdb saves models of another size (tests use a tiny one); the release has none.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path))
        else:
            lazy = mmap and zipfile.is_zipfile(path)  # torch maps only the zip format
            raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=lazy)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {path}", ACCESS_HINT, parameter="checkpoint") from exc
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first_line}",
            "the file is truncated or not a PyTorch/safetensors checkpoint: download it again",
            parameter="checkpoint",
        ) from exc
    config = None
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        if isinstance(raw.get("conchdb_config"), Mapping):
            config = ConchConfig.from_dict(raw["conchdb_config"])
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(
            f"{path} holds no state dict of tensors", "give CONCH's pytorch_model.bin", parameter="checkpoint"
        )
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in raw.items()}
    return state, config


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Save a model with its config, in the wrapper `read_checkpoint` understands."""
    torch.save({"state_dict": model.state_dict(), "conchdb_config": model.config.to_dict()}, str(path))


def _summarize(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def fit_state_dict(
    state: dict[str, torch.Tensor], model: torch.nn.Module, source: str
) -> dict[str, torch.Tensor]:
    """Adapt a CONCH state dict to `model`, or raise listing every key that does not fit."""
    expected = model.state_dict()
    state = {
        k: v for k, v in state.items() if k in expected or not k.startswith(UNUSED_PREFIXES)
    }
    pos_key = "visual.trunk.pos_embed"
    if (
        pos_key in state
        and pos_key in expected
        and state[pos_key].shape != expected[pos_key].shape
        and state[pos_key].shape[-1] == expected[pos_key].shape[-1]
    ):
        # Same width, another grid: the checkpoint was trained at another image size.
        from timm.layers import resample_abs_pos_embed

        trunk = model.visual.trunk
        state[pos_key] = resample_abs_pos_embed(
            state[pos_key],
            new_size=list(trunk.patch_embed.grid_size),
            num_prefix_tokens=trunk.num_prefix_tokens,
            interpolation="bilinear",
            antialias=False,
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarize(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarize(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_summarize(mismatched)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit the CONCH architecture; " + "; ".join(problems),
            "give the released CONCH pytorch_model.bin (MahmoodLab/conch), unmodified",
            parameter="checkpoint",
        )
    return state
