"""``prune.budget_unit: macs``: the dense model's multiply-accumulates."""

from __future__ import annotations

from ...registry import register_budget_unit
from .layers import Layer
from .unit import CostUnit


@register_budget_unit("macs")
class MacCost(CostUnit):
    """``MACs_l * a/n_in * b/n_out``: exact, MACs are bilinear in the two channel counts; the dense total is
    torch's ``FlopCounterMode`` count that the bench reports."""

    label = "MACs"

    def layer_cost(self, layer: Layer, a: float, b: float) -> float:
        return layer.macs * (a / layer.n_in) * (b / layer.n_out)

    @staticmethod
    def achieved(dense: dict, slim: dict, batch: int, trained: dict | None) -> float:
        return slim["macs"] / dense["macs"]
