"""The CONCH model for retrieval: the two towers and the temperature, nothing else.

Parameter names match the released `pytorch_model.bin` (`visual.*`, `text.*`,
`logit_scale`), so a checkpoint loads with a plain `load_state_dict`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from conchdb.model.config import ConchConfig
from conchdb.model.text import TextTower
from conchdb.model.vision import VisionTower


class ConchModel(nn.Module):
    def __init__(self, config: ConchConfig | None = None, caption_pooler: bool = False):
        super().__init__()
        self.config = config or ConchConfig()
        self.visual = VisionTower(self.config, caption_pooler=caption_pooler)
        self.text = TextTower(self.config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-projection image features, not normalized."""
        return self.visual.features(pixels)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized contrastive projections: the retrieval embedding."""
        return nn.functional.normalize(self.visual.project(self.visual.features(pixels)), dim=-1)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text(token_ids), dim=-1)
