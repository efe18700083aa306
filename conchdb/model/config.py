"""CONCH's architecture as plain data.

`ConchConfig()` is the released model (ViT-B/16 at 448 px, 512-d contrastive space);
`ConchConfig.tiny()` keeps every module and the 512-d output but shrinks widths and
depths, so pipeline tests run the same code in milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 448
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pool_heads: int = 8
    caption_queries: int = 256


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 128
    vocab_size: int = 32007
    width: int = 768
    heads: int = 12
    layers: int = 12
    mlp_ratio: float = 4.0
    pad_id: int = 0


@dataclass(frozen=True)
class ConchConfig:
    """The whole model; `embed_dim` is the shared image-text space."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    @classmethod
    def tiny(cls) -> ConchConfig:
        """Same classes and output size, a few thousand times less compute (for tests)."""
        return cls(
            vision=VisionConfig(width=32, layers=1, heads=2),
            text=TextConfig(width=32, layers=1, heads=2),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConchConfig:
        return cls(
            embed_dim=int(data.get("embed_dim", 512)),
            vision=VisionConfig(**data.get("vision", {})),
            text=TextConfig(**data.get("text", {})),
        )
