"""The selection that keeps the best-scoring channels under a budget in a cost unit (docs/methods.md, "Budget
units"), for any :class:`~snncompress.prune.costs.unit.CostUnit`.

A channel's marginal cost is the change of its own layers' ``layer_cost`` (its conv's output) plus that of the
layers it feeds (their input): Torch-Pruning's dependency graph says which (``ChannelGroup.consumers``). The
selection is hand-written: Torch-Pruning ranks and prunes by importance but has no budget in MACs, spikes or
measured latency, and no SNN library does.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .blocks import ceil_to
from .costs.unit import CostUnit
from .gates import ChannelGroup

Pick = Callable[[float], dict[str, torch.Tensor]]  # the method's selection at a scale (a kept fraction, or PQ's factor)


class Budget:
    """Costs and selections of channel masks in ``unit``, each group's kept count rounded up to ``round_to``."""

    def __init__(self, unit: CostUnit, groups: list[ChannelGroup], round_to: int = 1):
        self.unit, self.round_to = unit, round_to
        self.sizes = {g.name: g.size for g in groups}
        self.touching = {g: [i for i, lay in enumerate(unit.layers) if g in (lay.in_group, lay.out_group)]
                         for g in self.sizes}

    def cost(self, masks: dict[str, torch.Tensor]) -> float:
        """Cost of ``masks`` (kept counts rounded up to ``round_to`` as selection rounds them)."""
        return _Selection(self, masks).total()

    def ramp_budget(self, pick: Pick, final: float, scores: dict[str, torch.Tensor], remaining: float) -> float:
        """The budget of an update with ``remaining`` of the ramp still to go (1 dense, 0 at its end, where
        it is ``final``).

        The ramp schedules channels and the budget is what they cost: if the selection at ``final`` keeps
        ``n`` of the ``N`` channels, this update's budget is the cost of the method's selection of
        ``n + (N - n) * remaining`` channels. Ramped in the unit itself, the cubic ramp would remove few
        channels early and most in the last updates, since cost falls faster than channels (MACs about
        with their square): on MNIST-5k that cost 0.7 points of accuracy at the same final MACs
        (benchmarks/results/budget_accuracy.md).
        """
        if remaining <= 0:
            return final
        n, total = _kept(self.select(pick, final, scores)), sum(self.sizes.values())
        now = n + (total - n) * remaining
        return max(final, self.cost(pick(_largest(pick, lambda m: _kept(m) <= now + 1e-9))))

    def select(self, pick: Pick, budget: float, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep-masks that cost at most ``budget`` (each group's count rounded up to ``round_to``).

        ``pick(x)`` is the selection of the channel budget at scale ``x`` (a kept fraction of the channels,
        or the PQ shares' factor; its masks grow with ``x``): the largest ``x`` whose masks fit is found by
        bisection, so the channels kept are those the method's own ranking keeps first. What is left of the
        budget then goes to the best-scoring channels that still fit, in decreasing score: one that does
        not fit is passed over, and cheaper ones after it may still fit. A channel that costs nothing more
        (it fills a channel block the runtime computes anyway) is always kept.
        """
        sel = _Selection(self, pick(_largest(pick, lambda m: self.cost(m) <= budget + 1e-9 * abs(budget))))
        for g, i in _ranked(scores, sel.masks):
            total, now = sel.total_if(g, i), sel.total()
            if total <= budget + 1e-9 * abs(budget) or total <= now + 1e-12 * abs(now):
                sel.add(g, i)
        return sel.masks


def _largest(pick: Pick, fits: Callable[[dict], bool]) -> float:
    """The largest scale ``x`` whose ``pick(x)`` fits (by bisection; the masks grow with ``x``)."""
    lo, hi = 0.0, 1.0
    while fits(masks := pick(hi)) and not all(bool(m.all()) for m in masks.values()):
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(pick(mid)) else (lo, mid)
    return lo


def _kept(masks: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


def _ranked(signal: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """(group, channel) of the channels not yet kept, by decreasing signal (ties: earlier group, lower index)."""
    names = list(signal)
    flat = torch.cat([signal[n].double().flatten().masked_fill(masks[n], -math.inf) for n in names])
    where = [(n, i) for n in names for i in range(signal[n].numel())]
    order = torch.sort(flat, descending=True, stable=True).indices.tolist()
    return [where[k] for k in order if flat[k] != -math.inf]


class _Selection:
    """Masks under construction with their cost kept up to date layer by layer (adds are O(layers touched))."""

    def __init__(self, budget: Budget, masks: dict[str, torch.Tensor]):
        self.b, self.unit, self.masks = budget, budget.unit, {g: m.clone() for g, m in masks.items()}
        self.counts = {g: int(m.sum()) for g, m in self.masks.items()}
        w = self.unit.weights
        self.wsum = [float(w[lay.name][self.masks[lay.in_group]].sum()) if lay.in_group else float(w[lay.name].sum())
                     for lay in self.unit.layers]
        self.costs = [self._layer(k) for k in range(len(self.unit.layers))]

    def _a(self, k: int, counts: dict[str, int], wsum: float) -> float:
        lay = self.unit.layers[k]
        if lay.in_group is None:
            return wsum
        g = lay.in_group
        n, size = counts[g], self.b.sizes[g]
        extra = ceil_to(n, self.b.round_to, size) - n
        if not extra:
            return wsum
        w = self.unit.weights[lay.name]
        # the channels rounding adds are not chosen yet: each counts at the mean weight of the closed ones
        return wsum + extra * (float(w.sum()) - wsum) / (size - n)

    def _b(self, k: int, counts: dict[str, int]) -> float:
        lay = self.unit.layers[k]
        return lay.n_out if lay.out_group is None else ceil_to(counts[lay.out_group], self.b.round_to, lay.n_out)

    def _layer(self, k: int, counts: dict[str, int] | None = None, wsum: float | None = None) -> float:
        counts = self.counts if counts is None else counts
        wsum = self.wsum[k] if wsum is None else wsum
        return self.unit.layer_cost(self.unit.layers[k], self._a(k, counts, wsum), self._b(k, counts))

    def total(self) -> float:
        return sum(self.costs)

    def _changes(self, g: str, i: int) -> list[tuple[int, float, float]]:
        counts = {**self.counts, g: self.counts[g] + 1}
        out = []
        for k in self.b.touching[g]:
            lay = self.unit.layers[k]
            wsum = self.wsum[k] + (float(self.unit.weights[lay.name][i]) if lay.in_group == g else 0.0)
            out.append((k, wsum, self._layer(k, counts, wsum)))
        return out

    def total_if(self, g: str, i: int) -> float:
        changes = self._changes(g, i)
        return self.total() + sum(c - self.costs[k] for k, _, c in changes)

    def add(self, g: str, i: int) -> None:
        for k, wsum, c in self._changes(g, i):
            self.wsum[k], self.costs[k] = wsum, c
        self.counts[g] += 1
        self.masks[g][i] = True
