"""`Encoder`: images and texts in, normalized 512-d CONCH vectors out.

This is the one object the rest of conchdb uses from `model`: it owns the loaded weights,
the tokenizer, the device and precision, and a `fingerprint` that stores record so that
vectors from different weights or preprocessing are never mixed in one collection.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from conchdb.config import default_home
from conchdb.errors import ImageInputError
from conchdb.model.checkpoint import download_from_hub, fit_state_dict, read_checkpoint, resolve_checkpoint
from conchdb.model.conch import ConchModel
from conchdb.model.config import ConchConfig
from conchdb.model.device import resolve_device, resolve_precision
from conchdb.model.preprocess import PREPROCESSING, preprocess_batch, preprocess_pil
from conchdb.model.tokenizer import ConchTokenizer, resolve_tokenizer

ImageInput = Image.Image | str | Path


def open_image(source: ImageInput) -> Image.Image:
    """A PIL image from a path (fully decoded now, so a corrupt file fails here, named)."""
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError as exc:
        raise ImageInputError(f"image not found: {path}", "check the path") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(
            f"cannot read {path} as an image: {exc}", "pass a PNG, JPEG or TIFF image file"
        ) from exc


def weights_fingerprint(model: torch.nn.Module, extra: dict) -> str:
    """A short hash of the weights and the preprocessing.

    Every tensor contributes its name, shape and a strided sample of up to 4096 values plus
    its sum, so fingerprinting the 400M-parameter model costs milliseconds, not a full pass
    over 1.6 GB, while any retrained or different checkpoint changes it.
    """
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1).float().cpu()
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(flat[::step].numpy().tobytes())
        h.update(np.float64(flat.double().sum().item()).tobytes())
    return h.hexdigest()[:16]


@dataclass
class Encoder:
    """CONCH in inference mode on one device.

    Build it with `Encoder.load(...)` (real or synthetic checkpoint) or
    `Encoder.from_model(...)` (tests, tiny configs). `batch_size` bounds memory.
    """

    model: ConchModel
    tokenizer: ConchTokenizer | None
    device: torch.device
    dtype: torch.dtype
    batch_size: int = 32
    checkpoint: str | None = None
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False).to(self.device)
        extra = {"preprocessing": PREPROCESSING, "size": self.image_size}
        self.fingerprint = weights_fingerprint(self.model, extra)

    @classmethod
    def from_model(
        cls, model: ConchModel, tokenizer: ConchTokenizer | None = None, device: str = "cpu", precision: str = "auto"
    ) -> Encoder:
        """Wrap an in-memory model (tests, tiny configs)."""
        torch_device = resolve_device(device)
        return cls(model, tokenizer, torch_device, resolve_precision(precision, torch_device))

    @classmethod
    def load(
        cls,
        checkpoint: str | None = None,
        tokenizer: str | Path | None = None,
        device: str = "auto",
        precision: str = "auto",
        *,
        env_checkpoint: str | None = None,
        env_tokenizer: Path | None = None,
        models_dir: Path | None = None,
        config: ConchConfig | None = None,
        need_tokenizer: bool = True,
        batch_size: int = 32,
        caption_pooler: bool = False,
    ) -> Encoder:
        """Resolve, read and check the weights and tokenizer; see the README for the lookup order."""
        models_dir = models_dir or default_home() / "models" / "conch"
        torch_device = resolve_device(device)
        dtype = resolve_precision(precision, torch_device)
        source = resolve_checkpoint(checkpoint, env_checkpoint, models_dir)
        tok = None
        if need_tokenizer:
            tok_path = resolve_tokenizer(
                Path(tokenizer) if tokenizer else None, env_tokenizer, source, models_dir
            )
            tok = ConchTokenizer(tok_path)
        path = download_from_hub(source) if source.startswith("hf_hub:") else Path(source)
        state, saved_config = read_checkpoint(path)
        model = ConchModel(config or saved_config, caption_pooler=caption_pooler)
        state = fit_state_dict(state, model, str(path))
        model.load_state_dict(state)
        return cls(model, tok, torch_device, dtype, batch_size=batch_size, checkpoint=str(path))

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the factor on cosine similarities for zero-shot logits."""
        return float(self.model.logit_scale.exp())

    def describe(self) -> dict:
        """What a store records about the model that built a collection."""
        return {
            "model": "conch_ViT-B-16" if self.model.config == ConchConfig() else "conch (custom config)",
            "model_fingerprint": self.fingerprint,
            "embed_dim": self.dim,
            "image_size": self.image_size,
            "preprocessing": PREPROCESSING,
            "embedding": "proj_contrast, L2-normalized",
        }

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        with torch.inference_mode():
            if self.dtype == torch.float32:
                yield
            else:
                with torch.autocast(self.device.type, dtype=self.dtype):
                    yield

    def _run_images(self, pixels: torch.Tensor, raw: bool) -> np.ndarray:
        with self._inference():
            pixels = pixels.to(self.device)
            out = self.model.image_features(pixels) if raw else self.model.encode_image(pixels)
        return out.float().cpu().numpy()

    def encode_images(self, images: Sequence[ImageInput], raw: bool = False) -> np.ndarray:
        """Reference-preprocessed images to (N, 512) float32: normalized projections, or
        pre-projection features with `raw=True`."""
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = [open_image(img) for img in images[start : start + self.batch_size]]
            pixels = torch.stack([preprocess_pil(img, self.image_size) for img in chunk])
            out.append(self._run_images(pixels, raw))
        return np.concatenate(out)

    def encode_tiles(
        self, tiles: np.ndarray, raw: bool = False, timings: dict[str, float] | None = None
    ) -> np.ndarray:
        """uint8 tiles (N, H, W, 3) to (N, 512) float32, preprocessed in batch on the device.

        With `timings`, seconds spent preprocessing and in the model are added to its
        `preprocess_s` and `model_s` (synchronizing the GPU, so only when asked)."""
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(tiles), self.batch_size):
            t0 = time.perf_counter()
            with torch.inference_mode():
                chunk = tiles[start : start + self.batch_size]
                pixels = preprocess_batch(chunk, self.image_size, self.device)
            if timings is not None:
                self._sync()
                t1 = time.perf_counter()
                timings["preprocess_s"] = timings.get("preprocess_s", 0.0) + t1 - t0
            out.append(self._run_images(pixels, raw))
            if timings is not None:
                timings["model_s"] = timings.get("model_s", 0.0) + time.perf_counter() - t1
        return np.concatenate(out)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise RuntimeError("this Encoder was loaded without a tokenizer")
        return self.tokenizer(texts)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts to (N, 512) float32 normalized projections."""
        ids = self.tokenize(texts)
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(ids), self.batch_size):
            batch = torch.from_numpy(ids[start : start + self.batch_size]).to(self.device)
            with self._inference():
                out.append(self.model.encode_text(batch).float().cpu().numpy())
        return np.concatenate(out)

    def project(self, features: np.ndarray) -> np.ndarray:
        """Pre-projection features (TRIDENT/CLAM `conch_v1`) to normalized projections."""
        feats = torch.as_tensor(np.asarray(features, dtype=np.float32))
        with torch.inference_mode():
            proj = self.model.visual.proj_contrast.detach().float().cpu()
            return torch.nn.functional.normalize(feats @ proj, dim=-1).numpy()
