"""CONCH's text tower: a causal transformer with a CLS embedding appended at the end.

The CLS row of the attention mask comes from the token ids shifted by one position, as in
the reference: it sees position 0 and every position whose preceding token is not padding
(so the first pad too), and itself only when no padding is left. The goldens pin this.
"""

from __future__ import annotations

import torch
from torch import nn

from conchdb.model.config import ConchConfig


class ResidualBlock(nn.Module):
    """Pre-LayerNorm attention and MLP block (exact GELU)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class TextTower(nn.Module):
    """Token ids (N, context_length) as the tokenizer returns them, to 512-d projections."""

    def __init__(self, config: ConchConfig):
        super().__init__()
        t = config.text
        self.heads = t.heads
        self.pad_id = t.pad_id
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.zeros(t.context_length, t.width))
        self.cls_emb = nn.Parameter(torch.zeros(t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio)
        self.ln_final = nn.LayerNorm(t.width, eps=1e-5)
        self.text_projection = nn.Parameter(torch.zeros(t.width, config.embed_dim))

    def attention_mask(self, ids: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """Boolean mask (N * heads, L + 1, L + 1), True where attention is forbidden.

        `ids` may be a prefix of the 127 ids (see `forward`); `full` says, per text, whether
        all 127 ids are real, the one case where the CLS position may attend to itself."""
        n, length = ids.shape
        size = length + 1
        causal = torch.ones(size, size, dtype=torch.bool, device=ids.device).triu(1)
        mask = causal.unsqueeze(0).repeat(n, 1, 1)
        cls_row = torch.zeros(n, size, dtype=torch.bool, device=ids.device)
        cls_row[:, 1:length] = ids[:, :-1] == self.pad_id
        cls_row[:, length] = ~full
        mask[:, -1, :] = cls_row
        return mask.repeat_interleave(self.heads, dim=0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        ids = token_ids[:, :-1]  # the last id is the placeholder that the CLS embedding replaces
        context = ids.shape[1]
        real = ids != self.pad_id
        # Causal attention means no position sees a later one, and the CLS position sees only
        # the real tokens and the first pad; the pads after that change nothing, so they are
        # not computed: a short query runs on a handful of positions instead of 128.
        last = torch.where(real.any(0), torch.arange(context, device=ids.device), -1).max()
        keep = int(min(context, int(last) + 2))
        full = real[:, -1]
        ids = ids[:, :keep]
        x = self.token_embedding(ids) + self.positional_embedding[:keep].to(self.token_embedding.weight.dtype)
        cls = (self.cls_emb + self.positional_embedding[context]).to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1)
        x = self.transformer(x, self.attention_mask(ids, full))
        pooled = self.ln_final(x[:, -1])
        return pooled @ self.text_projection
