"""`Encoder`: images and texts in, normalized 512-d CONCH vectors out.

This is the one object the rest of conchdb uses from `model`: it owns the loaded weights,
the tokenizer, the device and precision, and a `fingerprint` that stores record so that
vectors from different weights or preprocessing are never mixed in one collection.

An encoder may hold only one tower (`Encoder.load(..., towers=("text",))`): a text query
then reads and builds only the text tower's weights. The fingerprint is always that of the
whole checkpoint, so a one-tower encoder matches the collections that both towers built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.overrides import TorchFunctionMode

from conchdb.config import default_home
from conchdb.errors import ImageInputError
from conchdb.model.checkpoint import download_from_hub, fit_state_dict, read_checkpoint, resolve_checkpoint
from conchdb.model.conch import TOWER_PREFIXES, TOWERS, ConchModel, check_towers
from conchdb.model.config import ConchConfig
from conchdb.model.device import resolve_device, resolve_precision
from conchdb.model.preprocess import PREPROCESSING, preprocess_batch, preprocess_pil
from conchdb.model.tokenizer import ConchTokenizer, resolve_tokenizer

ImageInput = Image.Image | str | Path
FINGERPRINTS_FILE = "fingerprints.json"


def open_image(source: ImageInput, parameter: str = "image") -> Image.Image:
    """A PIL image from a path (fully decoded now, so a corrupt file fails here, named).

    `parameter` is the argument the image came in by, for the error."""
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError as exc:
        raise ImageInputError(f"image not found: {path}", "check the path", parameter=parameter) from exc
    except Image.DecompressionBombError as exc:
        raise ImageInputError(
            f"{path} is too large to read as one image ({exc})",
            "give a smaller image or crop the region of interest; for a whole slide, query a region of it "
            "(PATH+x,y,w,h)",
            parameter=parameter,
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(
            f"cannot read {path} as an image: {exc}", "give a PNG, JPEG or TIFF image file", parameter=parameter
        ) from exc


def state_fingerprints(state: Mapping[str, torch.Tensor], extra: dict) -> tuple[str, str]:
    """A short hash of the weights and the preprocessing, and the hash earlier conchdb
    versions recorded for the same weights.

    Every tensor contributes its name, shape and a strided sample of up to 4096 values, and
    a checksum of all its values, so any retrained or different checkpoint changes it. The
    checksum is the integer sum of the values' bit patterns: exact, so every machine gets
    the same fingerprint. The earlier one summed the values as floats, whose last bits
    depend on how many threads torch splits the sum over, so a worker with other cores than
    the machine that built a collection could be refused; it is kept only so that stores
    those versions wrote are recognised (`Encoder.answers_to`).
    """
    head = json.dumps(extra, sort_keys=True).encode()
    current, legacy = hashlib.sha256(b"v2" + head), hashlib.sha256(head)
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().reshape(-1).float().cpu()
        step = max(1, flat.numel() // 4096)
        sample = name.encode() + str(tuple(tensor.shape)).encode() + flat[::step].numpy().tobytes()
        current.update(sample)
        current.update(np.int64(flat.view(torch.int32).sum(dtype=torch.int64).item()).tobytes())
        legacy.update(sample)
        legacy.update(np.float64(flat.double().sum().item()).tobytes())
    return current.hexdigest()[:16], legacy.hexdigest()[:16]


def weights_fingerprints(model: torch.nn.Module, extra: dict) -> tuple[str, str]:
    """`state_fingerprints` of a model's own weights."""
    return state_fingerprints(model.state_dict(), extra)


def _fingerprint_extra(config: ConchConfig) -> dict:
    return {"preprocessing": PREPROCESSING, "size": config.vision.image_size}


@dataclass(frozen=True)
class FingerprintCache:
    """Checkpoint fingerprints remembered in `folder`, by file, size and modification time.

    Hashing sums every tensor, which reads the whole file and needs the whole model built
    to check it; remembering the result lets a one-tower load leave the other tower's bytes
    on disk and its code unimported. A changed file gets a new key."""

    folder: Path

    @property
    def file(self) -> Path:
        return self.folder / FINGERPRINTS_FILE

    def key(self, path: Path, details: dict) -> str:
        stat = path.stat()
        identity = [str(path.resolve()), stat.st_size, stat.st_mtime_ns, details]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def _read(self) -> dict:
        try:
            known = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}
        return known if isinstance(known, dict) else {}

    def get(self, key: str) -> tuple[str, tuple[str, ...]] | None:
        """The fingerprint and its aliases, or None; an entry of another shape (an earlier
        version's bare fingerprint) is not used."""
        value = self._read().get(key)
        if not isinstance(value, dict) or not isinstance(value.get("fingerprint"), str):
            return None
        aliases = value.get("aliases")
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            return None
        return value["fingerprint"], tuple(aliases)

    def put(self, key: str, fingerprint: str, aliases: Sequence[str] = ()) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
            entry = {"fingerprint": fingerprint, "aliases": list(aliases)}
            tmp.write_text(json.dumps({**self._read(), key: entry}))
            os.replace(tmp, self.file)
        except OSError:
            pass  # a read-only cache only costs the hashing next time


class SkipInit(TorchFunctionMode):
    """Build modules without running their weight initialisation, for weights about to be
    replaced by a checkpoint's.

    The parameters stay as allocated (`torch.empty`: memory never touched), which makes
    building a tower nearly free; the meta device would do the same but imports
    torch._dynamo for its random initialisers, which costs a text query a second."""

    INITIALISERS = frozenset({
        "normal_", "uniform_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
        "kaiming_normal_", "constant_", "ones_", "zeros_", "orthogonal_", "fill_", "zero_",
    })

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__name__", "") in self.INITIALISERS:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def _tower_state(state: Mapping[str, torch.Tensor], towers: frozenset[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors less those of the towers not chosen (anything else is kept,
    so an unexpected key is still reported)."""
    dropped = tuple(prefix for name, prefix in TOWER_PREFIXES.items() if name not in towers)
    return {k: v for k, v in state.items() if not (dropped and k.startswith(dropped))}


def build_model(
    state: Mapping[str, torch.Tensor],
    config: ConchConfig,
    source: str,
    *,
    towers: Iterable[str] = TOWERS,
    caption_pooler: bool = False,
) -> tuple[ConchModel, dict[str, torch.Tensor]]:
    """The model with `towers`, its parameters taken from `state` without initialising them
    first, and the state fitted to that model.

    The model is built without initialising its weights, then takes the checkpoint's
    (memory-mapped) tensors as its parameters."""
    chosen = check_towers(towers)
    with SkipInit():
        model = ConchModel(config, caption_pooler=caption_pooler, towers=chosen)
    fitted = fit_state_dict(_tower_state(state, chosen), model, source)
    params = {k: v if v.dtype == torch.float32 else v.float() for k, v in fitted.items()}
    model.load_state_dict(params, assign=True)  # strict: every parameter is replaced
    return model, fitted


def checkpoint_fingerprints(
    state: Mapping[str, torch.Tensor], config: ConchConfig, source: str, caption_pooler: bool = False
) -> tuple[str, str]:
    """The fingerprints (current, earlier versions') of a checkpoint: those of the whole
    model loaded from it, as `Encoder.from_model` computes them, without building either
    tower's weights."""
    with SkipInit():
        whole = ConchModel(config, caption_pooler=caption_pooler)
    return state_fingerprints(fit_state_dict(dict(state), whole, source), _fingerprint_extra(config))


@dataclass
class Encoder:
    """CONCH in inference mode on one device.

    Build it with `Encoder.load(...)` (real or synthetic checkpoint) or
    `Encoder.from_model(...)` (tests, tiny configs). `batch_size` bounds memory.
    `fingerprint` is computed from the model when not given; a model without both towers
    needs it given (it is the whole checkpoint's). `aliases` are other fingerprints of the
    same weights that stores may have recorded (an earlier conchdb's, see
    `state_fingerprints`); `answers_to` accepts them.
    """

    model: ConchModel
    tokenizer: ConchTokenizer | None
    device: torch.device
    dtype: torch.dtype
    batch_size: int = 32
    checkpoint: str | None = None
    fingerprint: str = ""
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False).to(self.device)
        if not self.fingerprint:
            if self.model.towers != set(TOWERS):
                raise ValueError("an Encoder of one tower needs the whole checkpoint's fingerprint")
            self.fingerprint, legacy = weights_fingerprints(self.model, _fingerprint_extra(self.model.config))
            self.aliases = (legacy,)

    def answers_to(self, fingerprint: str | None) -> bool:
        """Whether a collection recording `fingerprint` was built by these weights."""
        return fingerprint == self.fingerprint or fingerprint in self.aliases

    @property
    def towers(self) -> frozenset[str]:
        """The towers this encoder holds: "vision", "text" or both."""
        return self.model.towers

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
        towers: Iterable[str] = TOWERS,
        cache_dir: Path | None = None,
    ) -> Encoder:
        """Resolve, read and check the weights and tokenizer; see the README for the lookup order.

        `towers` chooses what is built: ("text",) for text queries, ("vision",) for images.
        The tokenizer is loaded when the text tower is and `need_tokenizer` is set.
        `cache_dir` remembers the checkpoint's fingerprint between processes."""
        chosen = check_towers(towers)
        models_dir = models_dir or default_home() / "models" / "conch"
        torch_device = resolve_device(device)
        dtype = resolve_precision(precision, torch_device)
        source = resolve_checkpoint(checkpoint, env_checkpoint, models_dir)
        tok = None
        if need_tokenizer and "text" in chosen:
            tok_path = resolve_tokenizer(
                Path(tokenizer) if tokenizer else None, env_tokenizer, source, models_dir
            )
            tok = ConchTokenizer(tok_path)
        path = download_from_hub(source) if source.startswith("hf_hub:") else Path(source)
        state, saved_config = read_checkpoint(path, mmap=True)
        model_config = config or saved_config or ConchConfig()
        cache = FingerprintCache(Path(cache_dir)) if cache_dir is not None else None
        details = {**_fingerprint_extra(model_config), "config": model_config.to_dict(), "pooler": caption_pooler}
        key = cache.key(path, details) if cache is not None else ""
        known = cache.get(key) if cache is not None else None
        if known is None:  # the whole checkpoint is checked and hashed once per file
            fingerprint, legacy = checkpoint_fingerprints(state, model_config, str(path), caption_pooler)
            known = fingerprint, (legacy,)
            if cache is not None:
                cache.put(key, *known)
        model, _ = build_model(state, model_config, str(path), towers=chosen, caption_pooler=caption_pooler)
        return cls(
            model, tok, torch_device, dtype, batch_size=batch_size, checkpoint=str(path),
            fingerprint=known[0], aliases=known[1],
        )

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
            pixels = torch.stack([self.preprocess(img) for img in images[start : start + self.batch_size]])
            out.append(self._run_images(pixels, raw))
        return np.concatenate(out)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image as the image tower takes it (CONCH's preprocessing): (3, S, S) float.

        With `encode_pixels`, the two halves of `encode_images`, so that a server can
        preprocess in its requests' threads and keep only the model in its own."""
        return preprocess_pil(open_image(image), self.image_size)

    def encode_pixels(self, pixels: torch.Tensor, raw: bool = False) -> np.ndarray:
        """Preprocessed images (N, 3, S, S) (`preprocess`, stacked) to (N, 512) float32, in one batch."""
        return self._run_images(pixels, raw)

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

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """Token ids (N, 128); a bare string is one text."""
        if self.tokenizer is None:
            raise RuntimeError("this Encoder was loaded without a tokenizer")
        return self.tokenizer(texts)

    def encode_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Texts to (N, 512) float32 normalized projections; a bare string is one text (1, 512)."""
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
            proj = self.model._vision().proj_contrast.detach().float().cpu()
            return torch.nn.functional.normalize(feats @ proj, dim=-1).numpy()
