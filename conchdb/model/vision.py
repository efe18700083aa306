"""CONCH's image tower: a timm ViT trunk read by an attentional pooler.

The contrastive pooler turns the trunk's tokens into the 512-d image feature that is
aligned with text. The caption pooler (256 queries) only feeds CONCH's removed caption
decoder, so it is built only on request (the encoder benchmark compares against it).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from conchdb.model.config import ConchConfig


class AttentionalPooler(nn.Module):
    """Learned queries cross-attending to the trunk's tokens (CoCa's pooler)."""

    def __init__(self, d_model: int, context_dim: int, heads: int, queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model, eps=1e-5)
        self.ln_k = nn.LayerNorm(context_dim, eps=1e-5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(tokens)
        query = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(query, keys, keys, need_weights=False)[0]


class VisionTower(nn.Module):
    """Pixels (N, 3, H, W), normalized, to pre-projection features or projections."""

    def __init__(self, config: ConchConfig, caption_pooler: bool = False):
        super().__init__()
        v = config.vision
        self.trunk = VisionTransformer(
            img_size=v.image_size,
            patch_size=v.patch_size,
            embed_dim=v.width,
            depth=v.layers,
            num_heads=v.heads,
            mlp_ratio=v.mlp_ratio,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPooler(config.embed_dim, v.width, v.pool_heads, queries=1)
        self.ln_contrast = nn.LayerNorm(config.embed_dim, eps=1e-5)
        self.proj_contrast = nn.Parameter(torch.zeros(config.embed_dim, config.embed_dim))
        if caption_pooler:
            self.attn_pool_caption = AttentionalPooler(v.width, v.width, v.pool_heads, v.caption_queries)
            self.ln_caption = nn.LayerNorm(v.width, eps=1e-5)

    @property
    def has_caption_pooler(self) -> bool:
        return hasattr(self, "attn_pool_caption")

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pre-projection feature (what TRIDENT and CLAM store as `conch_v1`)."""
        tokens = self.trunk.forward_features(pixels)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        if self.has_caption_pooler:
            # Computed and dropped, exactly the work the reference does on every call.
            self.ln_caption(self.attn_pool_caption(tokens))
        return pooled

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.proj_contrast
