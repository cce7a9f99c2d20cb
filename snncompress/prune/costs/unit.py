"""What a budget unit is: a cost per layer, a dense total, and whatever it measures to know them.

A budget unit is registered by name (``@sc.register_budget_unit``, :data:`snncompress.registry.BUDGET_UNITS`)
and named in a recipe as ``prune.budget_unit`` (``prune.keep`` is then a fraction of the dense model's cost in
it). The registered object is a class; :meth:`CostUnit.build` makes the instance a training uses (or None for
``channels``, whose budget is the channel count itself), and :meth:`CostUnit.achieved` says where the bench
finds the unit's figure for a slim model.

The cost model of every unit is the same shape (docs/methods.md, "Budget units"): a conv or linear layer ``l``
costs ``layer_cost(l, a, b)``, with ``b`` its kept output channels and ``a`` the sum of ``weights[l]`` over its
kept input channels (1 per channel unless the unit measures otherwise, as SOPs do). The selection under a
budget (:mod:`snncompress.prune.budget`) only calls that; what a unit measures during training (statistics
summed over processes, a loss term that holds it on target) and keeps in a checkpoint goes through the
methods below, whose defaults are those of a unit that measures nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...config import PruneCfg, Recipe
from ..gates import ChannelGroup
from .layers import Layer, model_layers


class CostUnit:
    """Base of every cost unit, built as ``Unit(layers, groups, T, cfg)``; :meth:`layer_cost` is required."""

    label = "cost"  # how reports name the unit ("MACs", "SOPs", ...)

    def __init__(self, layers: list[Layer], groups: list[ChannelGroup], T: int, cfg: PruneCfg | None = None):
        self.layers, self.T = layers, T
        self.cfg = cfg if cfg is not None else PruneCfg()
        # per layer, per input channel: what one kept input channel counts for in `a`
        self.weights = {lay.name: torch.ones(lay.n_in, dtype=torch.float64) for lay in layers}

    @classmethod
    def build(cls, model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor, recipe: Recipe
              ) -> "CostUnit | None":
        """The unit for a training of ``recipe`` on the gated ``model`` (``example``: a multi-step input).

        Called before anything is written: a unit that cannot work here (e.g. a runtime that is not
        installed) refuses in one line."""
        return cls(model_layers(model, example, groups), groups, recipe.data.T, recipe.prune)

    def layer_cost(self, layer: Layer, a: float, b: float) -> float:
        """What ``layer`` costs with ``a`` (weighted) input channels and ``b`` output channels."""
        raise NotImplementedError

    @property
    def dense(self) -> float:
        """The dense network's cost: the reference ``prune.keep`` is a fraction of."""
        return sum(self.layer_cost(lay, float(self.weights[lay.name].sum()), lay.n_out) for lay in self.layers)

    @staticmethod
    def achieved(dense: dict, slim: dict, batch: int, trained: dict | None) -> float | None:
        """The slim model's cost as a fraction of the dense-shaped one's, from their bench figures (``batch``: the
        batch latency is compared at; ``trained``: this unit's record of the training's last update, if it
        trained in this unit). None where the bench has no figure for it."""
        return None

    # --- before training: a measurement (e.g. timing on a runtime), made once by one process -------------

    @property
    def needs_measurement(self) -> bool:
        """True while the unit lacks a measurement it takes before training (a resume restores it instead)."""
        return False

    def measure(self, model: nn.Module, samples: torch.Tensor, recipe: Recipe, show: bool) -> dict:
        """The measurement as plain JSON data (``samples``: training samples; ``show``: a progress bar)."""
        raise NotImplementedError

    def load_measurement(self, data: dict) -> None:
        """Take a measurement :meth:`measure` made (in this process or another)."""

    # --- during training ----------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Start observing the training model (hooks); they gather only while :meth:`activate` is on."""

    def activate(self, on: bool) -> None:
        """Gather statistics in this epoch (its statistics feed the next mask update) or not."""

    def statistics(self) -> list[torch.Tensor]:
        """The statistics this process gathered in the window (summed over processes before an update)."""
        return []

    def absorb(self, masks: dict[str, torch.Tensor]) -> None:
        """At a mask update, before the selection: take the window's statistics (``masks``: the channels that
        were open in it) and start a new window."""

    def hold(self, masks: dict[str, torch.Tensor] | None, target: float) -> None:
        """The masks reached the budget's final ``target`` (None: not or no longer): a unit whose cost moves
        while the network trains may hold it there through :meth:`penalty`."""

    def penalty(self) -> torch.Tensor | None:
        """A term for the training loss (of the last forward pass), or None."""
        return None

    def remove(self) -> None:
        """Remove every hook."""

    # --- checkpoint ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs (tensors and plain data)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
