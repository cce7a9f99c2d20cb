"""Budget units: what a channel costs in the unit ``prune.keep`` is a fraction of (docs/methods.md, "Budget
units"). Each unit is one registered class (:mod:`.unit`); the built-ins are ``channels``, ``macs``, ``sops``
(here) and ``latency`` (``snncompress.runtime.latency``: it times layers on a deployment runtime)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...config import Recipe
from ...registry import BUDGET_UNITS
from ..gates import ChannelGroup
from .layers import Layer, model_layers
from .unit import CostUnit

__all__ = ["CostUnit", "Layer", "build_unit", "model_layers", "unit_class"]


def unit_class(name: str, trust: bool = False) -> type[CostUnit]:
    """The class a ``prune.budget_unit`` names: registered, or user code (imported only when trusted)."""
    return BUDGET_UNITS.resolve(name, "prune.budget_unit", trust)


def build_unit(model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor, recipe: Recipe
               ) -> CostUnit | None:
    """The cost unit a structured recipe's training selects in (None for ``channels``: the count is the cost)."""
    return unit_class(recipe.prune.budget_unit).build(model, groups, example, recipe)
