"""The CONCH model for retrieval: the two towers and the temperature, nothing else.

Parameter names match the released `pytorch_model.bin` (`visual.*`, `text.*`,
`logit_scale`), so a checkpoint loads with a plain `load_state_dict`. Either tower can be
left out: a text query needs only the text tower and an image query only the vision
tower, and building (and reading the weights of) the other one is most of a query's
start-up. Each tower's module is imported only when it is built, so a text-only model
never imports timm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from conchdb.model.config import ConchConfig

if TYPE_CHECKING:
    from conchdb.model.text import TextTower
    from conchdb.model.vision import VisionTower

TOWERS = ("vision", "text")
"""The towers by name; their parameters live under `visual.` and `text.` respectively."""
TOWER_PREFIXES = {"vision": "visual.", "text": "text."}


def check_towers(towers: Iterable[str]) -> frozenset[str]:
    """The tower names as a set; an unknown or empty choice is a programming error."""
    chosen = frozenset(towers)
    if not chosen or not chosen <= set(TOWERS):
        raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {sorted(chosen)}")
    return chosen


class ConchModel(nn.Module):
    def __init__(
        self, config: ConchConfig | None = None, caption_pooler: bool = False, towers: Iterable[str] = TOWERS
    ):
        super().__init__()
        self.config = config or ConchConfig()
        self.towers = check_towers(towers)
        self.visual: VisionTower | None = None
        self.text: TextTower | None = None
        if "vision" in self.towers:
            from conchdb.model.vision import VisionTower

            self.visual = VisionTower(self.config, caption_pooler=caption_pooler)
        if "text" in self.towers:
            from conchdb.model.text import TextTower

            self.text = TextTower(self.config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def _vision(self) -> VisionTower:
        if self.visual is None:
            raise RuntimeError("this model was built without the vision tower")
        return self.visual

    def _text(self) -> TextTower:
        if self.text is None:
            raise RuntimeError("this model was built without the text tower")
        return self.text

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-projection image features, not normalized."""
        return self._vision().features(pixels)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized contrastive projections: the retrieval embedding."""
        visual = self._vision()
        return nn.functional.normalize(visual.project(visual.features(pixels)), dim=-1)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self._text()(token_ids), dim=-1)
