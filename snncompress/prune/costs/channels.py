"""``prune.budget_unit: channels`` (the default): ``keep`` is a fraction of the conv channels themselves."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...config import Recipe
from ...registry import register_budget_unit
from ..gates import ChannelGroup
from .unit import CostUnit


@register_budget_unit("channels")
class Channels(CostUnit):
    """The count is the cost: no cost model (:meth:`build` gives None); the selection keeps ``keep`` of the
    channels with the method's own ranking."""

    label = "conv channels"

    @classmethod
    def build(cls, model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor, recipe: Recipe) -> None:
        return None

    @staticmethod
    def achieved(dense: dict, slim: dict, batch: int, trained: dict | None) -> float:
        return slim["kept_channels"]
