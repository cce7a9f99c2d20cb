"""Dynamic structured pruning during training: scorer -> selector -> gates, plus regrowth and freezing."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
from pydantic import BaseModel
from spikingjelly.activation_based import functional

from ..config import PruneCfg
from .blocks import resolve_round_to
from .budget import Budget
from .costs.unit import CostUnit
from .gates import ChannelGroup, gate_modules, get_masks, kept_fraction, set_masks
from .schedule import is_scoring_epoch, is_update_epoch, keep_fraction_at, ramp_remaining
from .scorer import Scorer, model_device
from .select import pq_budgets, pq_raw_budgets, pq_shares, round_masks, select_masks, select_masks_budgeted


# the first n training batches (None: all), encoded and on the model's device, the same ones at every call
Batches = Callable[[int | None], Iterable[torch.Tensor]]


class ChannelPruner:
    """Owns the channel masks of a gated model while it trains, for any :class:`Scorer` (implements
    :class:`~snncompress.prune.pruner.Pruner`).

    :meth:`begin_epoch` turns the scorer on only in epochs that feed a mask update;
    :meth:`after_backward` accumulates the regrowth signal ``|dL/dgate|`` (on the model's device, in
    those epochs) and clears the gate gradients; :meth:`after_step` restores the frozen weights of closed channels, so a
    regenerated channel resumes where it left off; :meth:`end_epoch` recomputes the masks when the
    schedule says so; :meth:`penalty` is the method's term of the training loss.

    With a cost ``unit`` (``prune.budget_unit`` other than channels) ``keep`` is the kept fraction of the
    dense model's cost in that unit, and the selection keeps the best channels that fit it
    (:class:`~snncompress.prune.budget.Budget`).
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], cfg: PruneCfg, epochs: int, seed: int,
                 scorer: type[Scorer], unit: CostUnit | None = None, options: BaseModel | None = None,
                 batches: Batches | None = None):
        self.model, self.groups, self.cfg, self.epochs = model, groups, cfg, epochs
        self._batches = batches
        self.round_to = resolve_round_to(cfg.round_to)
        self.unit = unit
        self.budget = Budget(unit, groups, self.round_to) if unit is not None else None
        if unit is not None:
            unit.attach(model)
        self.scorer = scorer(model, groups, options, seed)
        self._gates = gate_modules(model)
        device = model_device(model)
        self._regrowth = {g.name: torch.zeros(g.size, dtype=torch.float64, device=device) for g in groups}
        self._frozen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._scoring = True
        self._final: dict[str, torch.Tensor] | None = None  # set by freeze: the gates are then gone
        self.history: list[dict] = []

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        if self._final is not None:
            return {n: m.clone() for n, m in self._final.items()}
        return get_masks(self.model, self.groups)

    def kept_fraction(self) -> float:
        return kept_fraction(self.masks)

    def at_target(self) -> bool:
        return bool(self.history) and self.history[-1]["keep_target"] <= self.cfg.keep + 1e-9

    def penalty(self) -> torch.Tensor:
        penalty = self.scorer.penalty()
        held = self.unit.penalty() if self.unit is not None else None  # e.g. SOPs held on target
        return penalty if held is None else penalty + held

    def begin_epoch(self, epoch: int) -> None:
        self._scoring = is_scoring_epoch(self.cfg, self.epochs, epoch)
        self.scorer.activate(self._scoring)
        if self.unit is not None:
            self.unit.activate(self._scoring)

    def after_backward(self) -> None:
        if self._final is not None:
            return
        if self._scoring:
            self.scorer.after_backward()
        for g in self.groups:
            for name in g.gates:
                gate = self._gates[name].gate
                if gate.grad is not None:
                    if self._scoring:
                        self._regrowth[g.name] += gate.grad.detach().abs()
                    gate.grad = None

    @torch.no_grad()
    def after_step(self) -> None:
        for tensor, idx, values in self._frozen:
            tensor[idx] = values

    def statistics(self) -> list[torch.Tensor]:
        # the regrowth sums need no reduction: DDP already averaged the gate gradients behind them
        return self.scorer.statistics() + (self.unit.statistics() if self.unit is not None else [])

    def end_epoch(self, epoch: int, reduce: Callable[[list[torch.Tensor]], None] | None = None) -> dict | None:
        """Recompute masks if this epoch ends an update window; return the history entry."""
        if not is_update_epoch(self.cfg, self.epochs, epoch):
            return None
        keep = keep_fraction_at(self.cfg, epoch)
        old = self.masks
        self.scorer.measure(self._forward)
        if reduce is not None:  # under torchrun every rank selects from the statistics of all ranks
            reduce(self.statistics())
        scores, grow = self.scorer.scores(), self.scorer.regrowth_scores()
        grow = {n: r.cpu() for n, r in self._regrowth.items()} if grow is None else grow
        new, budget = self._select(keep, ramp_remaining(self.cfg, epoch), scores, grow, old)
        set_masks(self.model, self.groups, new)
        if self.cfg.recalibrate_bn and self._batches is not None and any(not torch.equal(old[n], new[n]) for n in new):
            recalibrate_bn(self.model, lambda: self._forward(self.cfg.recalibrate_bn, train=True))
        self._freeze_closed(new)
        self.scorer.reset()
        for r in self._regrowth.values():
            r.zero_()
        entry = {
            "epoch": epoch,
            "keep_target": keep,
            **({"budget": budget} if budget else {}),
            "kept": {n: int(m.sum()) for n, m in new.items()},
            "pruned": sum(int((old[n] & ~new[n]).sum()) for n in new),
            "regrown": sum(int((~old[n] & new[n]).sum()) for n in new),
            "masks": {n: m.clone() for n, m in new.items()},
        }
        self.history.append(entry)
        self._hold_budget()
        return entry

    def _forward(self, batches: int | None, train: bool = False) -> None:
        """Run the network without gradient over the first ``batches`` training batches (None: all of them), in
        train or eval mode, with the statistics of scorer and cost unit off (a scorer that measures here, e.g.
        criticality, records through its own switch)."""
        if self._batches is None:
            raise ValueError("this pruner has no training batches to measure on (build_pruner(batches=...))")
        was = self.model.training
        self.model.train(train)
        self.scorer.activate(False)
        if self.unit is not None:
            self.unit.activate(False)
        try:
            with torch.no_grad():
                for x in self._batches(batches):
                    self.model(x)
                    functional.reset_net(self.model)
        finally:
            self.model.train(was)
            self.scorer.activate(self._scoring)
            if self.unit is not None:
                self.unit.activate(self._scoring)

    def _hold_budget(self) -> None:
        if self.unit is not None:
            self.unit.hold(self.masks if self.at_target() else None, self.cfg.keep * self.unit.dense)

    def _select(self, keep: float, remaining: float, scores: dict[str, torch.Tensor], grow: dict[str, torch.Tensor],
                old: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict | None]:
        """New masks at the schedule's ``keep`` (``remaining`` of the ramp left), and what the budget was in
        its unit (None for channels)."""
        c, budget = self.cfg, self.budget
        share = c.regrow_fraction / c.keep  # the regrowth part of what is kept, the same at every step of the ramp
        floor = (c.min_channels, c.min_fraction)

        def by_fraction(fraction: float) -> dict[str, torch.Tensor]:
            return select_masks(scores, grow, fraction, share * fraction, *floor, allocation=c.allocation)

        if budget is None:
            if c.budget == "pq":
                budgets = pq_budgets(scores, keep, c.min_channels, *_pq(c), old, c.min_fraction)
                new = select_masks_budgeted(scores, grow, budgets, share, *floor)
            else:
                new = by_fraction(keep)
            return (round_masks(new, scores, self.round_to) if self.round_to > 1 else new), None
        self.unit.absorb(old)
        final = c.keep * self.unit.dense
        if c.budget == "pq":
            sizes, lo, raw = pq_raw_budgets(scores, c.min_channels, *_pq(c), old, c.min_fraction)

            def pick(scale: float) -> dict[str, torch.Tensor]:
                counts = {n: int(x + 1e-9) for n, x in zip(scores, pq_shares(scale, sizes, lo, raw))}
                return select_masks_budgeted(scores, grow, counts, share, *floor)
        else:
            def pick(fraction: float) -> dict[str, torch.Tensor]:
                return by_fraction(min(1.0, fraction))
        target = budget.ramp_budget(pick, final, scores, remaining)
        new = budget.select(pick, target, scores)
        selected = budget.cost(new)  # rounding up below adds what this already counts
        if self.round_to > 1:
            new = round_masks(new, scores, self.round_to)
        return new, {"unit": c.budget_unit, "dense": self.unit.dense, "target": target, "selected": selected,
                     "round_to": self.round_to}

    def freeze(self, epoch: int) -> dict[str, torch.Tensor] | None:
        """The final masks, once no epoch from ``epoch`` on updates them (after at least one update), else None.

        From then on the pruner reads no gate, restores no closed weight and gathers no statistics: the caller
        removes the closed channels from the network in place before its next forward. The scorer's and the cost
        unit's hooks stay on their modules, switched off (the SOP hold keeps measuring the slim network).
        """
        if self._final is not None or not self.history or \
                any(is_update_epoch(self.cfg, self.epochs, e) for e in range(epoch, self.epochs)):
            return None
        self._final, self._frozen, self._gates = self.masks, [], {}
        self.scorer.activate(False)
        if self.unit is not None:
            self.unit.activate(False)
        return self.masks

    def agreement(self) -> dict[str, torch.Tensor]:
        return self.masks

    def metrics(self) -> dict[str, float]:
        return {}

    def checkpoint_entries(self) -> dict:
        return {}

    def _freeze_closed(self, masks: dict[str, torch.Tensor]) -> None:
        """Snapshot the per-channel parameters and BN statistics of closed channels."""
        modules = dict(self.model.named_modules())
        self._frozen = []
        for g in self.groups:
            idx = (~masks[g.name]).nonzero().flatten().to(model_device(self.model))
            if idx.numel() == 0:
                continue
            for name in g.convs + g.bns:
                m = modules[name]
                for t in (getattr(m, "weight", None), getattr(m, "bias", None),
                          getattr(m, "running_mean", None), getattr(m, "running_var", None)):
                    if t is not None:
                        self._frozen.append((t.data, idx, t.data[idx].clone()))

    def load_masks(self, masks: dict[str, torch.Tensor]) -> None:
        set_masks(self.model, self.groups, masks)
        self._freeze_closed(masks)

    def state_dict(self) -> dict:
        """Accumulated scores of the current update window (masks and history live in the checkpoint)."""
        return {"scorer": self.scorer.state_dict(), "regrowth": {n: r.cpu().clone() for n, r in self._regrowth.items()},
                "cost": self.unit.state_dict() if self.unit is not None else None}

    def load_state_dict(self, state: dict, masks: dict[str, torch.Tensor], history: list[dict]) -> None:
        # the frozen snapshots are re-taken from the loaded weights: closed channels never moved
        self.load_masks(masks)
        self.history = [dict(h) for h in history]
        self.scorer.load_state_dict(state["scorer"])
        for n, r in state["regrowth"].items():
            self._regrowth[n].copy_(r)
        if self.unit is not None and state.get("cost") is not None:
            self.unit.load_state_dict(state["cost"])
        self._hold_budget()

    def remove(self) -> None:
        self.scorer.remove()
        if self.unit is not None:
            self.unit.remove()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, forward: Callable[[], None]) -> None:
    """Re-estimate every BatchNorm's running statistics from scratch as the plain average over what ``forward``
    runs through the network in train mode (after a mask change the old ones describe another network)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches
    try:
        forward()
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum


def _pq(cfg: PruneCfg) -> tuple[float, float, float, float, float]:
    """The PQ index constants of ``budget: pq`` (``prune.pq``): p, q, eta, gamma, beta."""
    return cfg.pq.p, cfg.pq.q, cfg.pq.eta, cfg.pq.gamma, cfg.pq.beta
