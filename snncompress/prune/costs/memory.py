"""``prune.budget_unit: memory``: bytes of the deployed network's weights (float32 until the weights are quantised)."""

from __future__ import annotations

import math

import torch.nn as nn

from ...registry import register_budget_unit
from .layers import Layer
from .unit import CostUnit

FLOAT_BITS = 32
BIAS_BYTES = 4  # one bias per output channel (BatchNorm folded into it), 32 bits: an int32 accumulator or a float32


def weight_bytes(weights: float, outputs: float, bits: int) -> float:
    """Bytes of ``weights`` weights of ``bits`` bits and the ``outputs`` biases of the layers they form (the one
    formula of weight memory: this unit, the bench and the report use it)."""
    return weights * bits / 8 + BIAS_BYTES * outputs


@register_budget_unit("memory")
class MemoryCost(CostUnit):
    """``taps * a * b`` weights of ``bits`` bits and ``b`` 32-bit biases per layer: exact for the conv and linear
    layers of the deployed network (BatchNorm folded, so each output channel has one bias). snncompress ships
    float32 weights, so a recipe's unit counts 32 bits per weight."""

    label = "weight bytes"

    bits = FLOAT_BITS

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
