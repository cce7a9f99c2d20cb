"""``prune.budget_unit: memory``: bytes of the deployed network's weights at the recipe's bit width."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...config import Recipe
from ...registry import register_budget_unit
from ..gates import ChannelGroup
from .layers import Layer, model_layers
from .unit import CostUnit

BIAS_BYTES = 4  # one bias per output channel (BatchNorm folded into it), 32 bits: an int32 accumulator or a float32


def weight_bytes(weights: float, outputs: float, bits: int) -> float:
    """Bytes of ``weights`` weights of ``bits`` bits and the ``outputs`` biases of the layers they form (the one
    formula of weight memory: this unit, the bench and the report use it)."""
    return weights * bits / 8 + BIAS_BYTES * outputs


@register_budget_unit("memory")
class MemoryCost(CostUnit):
    """``taps * a * b`` weights of ``recipe.weight_bits`` bits (``quant.weights.bits``, else 32) and ``b`` 32-bit
    biases per layer: exact for the conv and linear layers of the deployed network (BatchNorm folded, so each
    output channel has one bias)."""

    label = "weight bytes"

    def __init__(self, layers: list[Layer], groups: list[ChannelGroup], T: int, cfg=None, bits: int = 32):
        super().__init__(layers, groups, T, cfg)
        self.bits = bits

    @classmethod
    def build(cls, model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor, recipe: Recipe) -> "MemoryCost":
        return cls(model_layers(model, example, groups), groups, recipe.data.T, recipe.prune, recipe.weight_bits)

    def layer_cost(self, layer: Layer, a: float, b: float) -> float:
        return weight_bytes(layer.taps * a * b, b, self.bits)

    @staticmethod
    def achieved(dense: dict, slim: dict, batch: int, trained: dict | None) -> float | None:
        if "weight_bytes" not in dense or "weight_bytes" not in slim:  # reports written before the unit
            return None
        return slim["weight_bytes"] / dense["weight_bytes"]


def model_weight_bytes(model: nn.Module, bits: int) -> int:
    """Weight memory of ``model``'s conv and linear layers at ``bits`` bits (whole bytes)."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return math.ceil(weight_bytes(sum(w.numel() for w in ws), sum(w.shape[0] for w in ws), bits))
