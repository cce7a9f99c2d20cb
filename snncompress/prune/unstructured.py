"""Unstructured (weight-level) pruning during training: criticality-guided GMP, and PQ rewiring.

- ``criticality_unstructured`` (Chen, Liu, You; docs/methods.md): gradual global magnitude pruning to
  ``s_t = s_f * (1 - (1 - t/T)^3)``; at each update a share ``1 - r`` of the kept weights is chosen by
  magnitude and the rest among the pruned weights whose output channel is most critical.
- ``pq`` (Shen, Xu, Pan, Chen with Diao et al.'s PQ index; docs/methods.md): sparse from the start
  (Erdős–Rényi-kernel densities); at each update every scope (a layer, or an output neuron) prunes the
  fraction set by its PQ index by magnitude and regrows as many by accumulated gradient (RigL-style).

Regrown weights start at 0 (pruned weights are 0, and their optimiser state is reset). Channels whose
filters end up entirely pruned get their gate closed, so ``slim`` removes them exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from pydantic import BaseModel

from ..config import PruneCfg
from ..errors import MaskError, SnnCompressError
from ..registry import register_method
from .criticality import CriticalityScorer
from .gates import ChannelGroup, gate_modules, get_masks, kept_fraction, set_masks
from .options import CriticalityOptions, CriticalityWeightOptions, MethodOptions, PQOptions
from .pq import pq_index, pq_prune_ratio
from .schedule import is_scoring_epoch, is_update_epoch, sparsity_at
from .select import top_k
from .weights import (WeightMasks, channel_masks, ensure_rows, er_densities, maskable_layers, pack_masks,
                      random_masks, round_half_up, unpack_masks)


def magnitude_criticality_masks(weights: dict[str, torch.Tensor], criticality: dict[str, torch.Tensor | None],
                                n_keep: int, regrow_share: float) -> dict[str, torch.Tensor]:
    """Keep ``n_keep`` weights over all layers: ``n_keep - round_half_up(r * n_keep)`` by global magnitude,
    then the ``round_half_up(r * n_keep)`` others by the criticality of their output channel.

    ``criticality[layer]`` has one score per output channel (None: no spiking neuron after it, never chosen
    by criticality while others remain). Among the weights not kept by magnitude, the order is criticality
    (high first), then ``|w|`` (so a critical channel first gets back its strongest weights), then lower index.
    """
    names = list(weights)
    flat_w = torch.cat([weights[n].detach().abs().flatten().double().cpu() for n in names])
    crit = torch.cat([
        (criticality[n].double().view(-1, *[1] * (weights[n].dim() - 1)).expand(weights[n].shape)
         if criticality.get(n) is not None else torch.full(weights[n].shape, -math.inf, dtype=torch.float64)).flatten()
        for n in names])
    n_keep = min(n_keep, flat_w.numel())
    n_crit = round_half_up(regrow_share * n_keep)
    keep = torch.zeros(flat_w.numel(), dtype=torch.bool)
    keep[top_k(flat_w, n_keep - n_crit)] = True
    if n_crit > 0:
        # lexicographic (criticality, |w|, -index): stable sorts, least significant key first
        by_w = torch.sort(flat_w, descending=True, stable=True).indices
        order = by_w[torch.sort(crit[by_w], descending=True, stable=True).indices]
        order = order[~keep[order]]
        keep[order[:n_crit]] = True
    out, offset = {}, 0
    for n in names:
        out[n] = keep[offset:offset + weights[n].numel()].view(weights[n].shape).clone()
        offset += weights[n].numel()
    return out


def pq_rewire(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, options: PQOptions
              ) -> tuple[torch.Tensor, int]:
    """One PQ rewiring of a layer; returns the new mask and the number of weights rewired.

    For each scope (``options.scope``: the whole layer, or each output row), over its ``d`` kept weights:
    ``ratio = pq_prune_ratio(pq_index(w_kept), d)`` and ``n = min(round_half_up(ratio * d), #pruned in scope)``;
    the n kept weights of smallest ``|w|`` are pruned and the n previously pruned weights of largest ``|grad|``
    regrow (ties: lower index). The kept count of every scope is unchanged.
    """
    o = options
    rows = [slice(None)] if o.scope == "layer" else list(range(weight.shape[0]))
    new = mask.clone()
    rewired = 0
    for r in rows:
        w, m, g = weight[r].detach().flatten().double().cpu(), mask[r].flatten().cpu(), grad[r].flatten().double().cpu()
        d = int(m.sum())
        if d == 0:
            continue
        ratio = pq_prune_ratio(pq_index(w[m], o.p, o.q), d, o.p, o.q, o.eta, o.gamma, o.beta)
        n = min(round_half_up(ratio * d), int((~m).sum()))
        if n == 0:
            continue
        out = m.clone()
        out[top_k((-w.abs()).masked_fill(~m, -math.inf), n)] = False  # smallest magnitudes among the kept
        out[top_k(g.abs().masked_fill(m, -math.inf), n)] = True  # largest gradients among the previously pruned
        new[r] = out.view(new[r].shape)
        rewired += n
    return new, rewired


class WeightPruner:
    """Owns the weight masks of a gated model while it trains (implements
    :class:`~snncompress.prune.pruner.Pruner`); a method subclasses it with :meth:`initial_masks` and
    :meth:`update_masks`.

    ``after_backward`` zeroes the pruned weights' gradients; ``after_step`` re-zeroes pruned weights;
    ``end_epoch`` updates the masks when the schedule says so. The channel gates follow the weight
    masks (closed iff the filter is empty). ``options``: an instance of the class's ``Options`` (the
    recipe's ``prune.options``; None: its defaults).
    """

    Options: type[BaseModel] = MethodOptions

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], cfg: PruneCfg, epochs: int, seed: int = 0,
                 optimizer: torch.optim.Optimizer | None = None, options: BaseModel | None = None):
        if cfg.sparsity is None:
            raise SnnCompressError(f"prune.sparsity: required for method {cfg.method} (it prunes weights)")
        self.model, self.groups, self.cfg, self.epochs, self.optimizer = model, groups, cfg, epochs, optimizer
        self.options = options if options is not None else self.Options()
        self.layers = maskable_layers(model)
        self.weights = WeightMasks(self.layers)
        self._gates = gate_modules(model)
        self.history: list[dict] = []
        self._scoring = True
        self._set(self.initial_masks(seed))

    def initial_masks(self, seed: int) -> dict[str, torch.Tensor]:
        """The masks training starts from (default: dense)."""
        return self.weights.cpu()

    def update_masks(self, weights: dict[str, torch.Tensor], old: dict[str, torch.Tensor],
                     epoch: int) -> tuple[dict[str, torch.Tensor], float]:
        """New masks at an update, and the sparsity targeted."""
        raise NotImplementedError

    def _set(self, masks: dict[str, torch.Tensor]) -> None:
        self.weights.set(masks)
        set_masks(self.model, self.groups, channel_masks(self.weights.masks, self.groups))

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Channel masks (the gates), as :class:`~snncompress.prune.structured.ChannelPruner` has them."""
        return get_masks(self.model, self.groups)

    def kept_fraction(self) -> float:
        return kept_fraction(self.masks)

    def at_target(self) -> bool:
        return bool(self.history) and self.history[-1]["sparsity_target"] >= self.cfg.sparsity - 1e-9

    def penalty(self) -> torch.Tensor:
        return torch.zeros(())

    def begin_epoch(self, epoch: int) -> None:
        """Gather the method's statistics only in epochs that feed a mask update."""
        self._scoring = is_scoring_epoch(self.cfg, self.epochs, epoch)

    def after_backward(self) -> None:
        self.weights.mask_grads()
        for gate in self._gates.values():  # gates follow the weight masks; their gradient is not used
            gate.gate.grad = None

    def after_step(self) -> None:
        self.weights.apply()

    def statistics(self) -> list[torch.Tensor]:
        return []

    def end_epoch(self, epoch: int, reduce: Callable[[list[torch.Tensor]], None] | None = None) -> dict | None:
        """Update the weight masks if this epoch ends an update window; return the history entry."""
        if not is_update_epoch(self.cfg, self.epochs, epoch):
            return None
        if reduce is not None:  # under torchrun: every rank selects from the statistics of all ranks
            reduce(self.statistics())
        old = self.weights.cpu()
        weights = {n: m.weight.detach() for n, m in self.layers.items()}
        new, target = self.update_masks(weights, old, epoch)
        new = {n: ensure_rows(m, weights[n].abs().cpu(), self.cfg.min_channels) for n, m in new.items()}
        changed = {n: old[n] ^ new[n] for n in new}
        self._set(new)
        self.weights.reset_optimizer_state(self.optimizer, changed)
        ch = self.masks
        entry = {
            "epoch": epoch, "sparsity_target": target,
            "connectivity": self.weights.density(),
            "pruned": sum(int((old[n] & ~new[n]).sum()) for n in new),
            "regrown": sum(int((~old[n] & new[n]).sum()) for n in new),
            "kept": {n: int(m.sum()) for n, m in ch.items()},
            "masks": {n: m.clone() for n, m in ch.items()},
        }
        self.history.append(entry)
        return entry

    def freeze(self, epoch: int) -> None:
        """Never: the channels stay (weight masks keep their dense shapes), so the network is never slimmed."""
        return None

    def agreement(self) -> dict[str, torch.Tensor]:
        """Channel and weight masks together (what every rank must agree on)."""
        return {**self.masks, **{f"weights:{n}": m for n, m in self.weights.cpu().items()}}

    def metrics(self) -> dict[str, float]:
        return {"connectivity": self.weights.density()}

    def checkpoint_entries(self) -> dict:
        return {"weight_masks": pack_masks(self.weights.cpu())}

    def state_dict(self) -> dict:
        """Weight masks (bit-packed) and the method's window state."""
        return {"weight_masks": pack_masks(self.weights.cpu()), **self._window_state()}

    def _window_state(self) -> dict:
        return {}

    def _load_window_state(self, state: dict) -> None:
        pass

    def load_state_dict(self, state: dict, masks: dict[str, torch.Tensor], history: list[dict]) -> None:
        self._set(unpack_masks(state["weight_masks"]))
        self._load_window_state(state)
        self.history = [dict(h) for h in history]
        if any(not torch.equal(self.masks[g], torch.as_tensor(m, dtype=torch.bool)) for g, m in masks.items()):
            raise MaskError("channel masks do not follow the weight masks")

    def remove(self) -> None:
        self.weights.remove()


@register_method("criticality_unstructured", family="unstructured")
class CriticalityWeightPruner(WeightPruner):
    """Gradual global magnitude pruning; a share ``options.weight_regrow`` of the kept weights chosen by the
    criticality of their output channel (:func:`magnitude_criticality_masks`)."""

    Options = CriticalityWeightOptions

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], cfg: PruneCfg, epochs: int, seed: int = 0,
                 optimizer: torch.optim.Optimizer | None = None, options: BaseModel | None = None):
        # measured in the training steps of the window: this pruner has no pass over the data at its updates
        self.scorer = CriticalityScorer(model, groups, CriticalityOptions(measure="training"), seed=seed)
        super().__init__(model, groups, cfg, epochs, seed, optimizer, options)

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        self.scorer.activate(self._scoring)

    def statistics(self) -> list[torch.Tensor]:
        return self.scorer.statistics()

    def update_masks(self, weights, old, epoch):
        s_t = sparsity_at(self.cfg, epoch)
        total = sum(m.numel() for m in old.values())
        crit = self.scorer.criticality_scores()
        per_layer: dict[str, torch.Tensor | None] = {n: None for n in self.layers}
        for g in self.groups:
            for conv in g.convs:
                per_layer[conv] = crit[g.name]
        new = magnitude_criticality_masks(weights, per_layer, round_half_up((1.0 - s_t) * total),
                                          self.options.weight_regrow)
        self.scorer.reset()
        return new, s_t

    def _window_state(self) -> dict:
        return {"scorer": self.scorer.state_dict()}

    def _load_window_state(self, state: dict) -> None:
        self.scorer.load_state_dict(state["scorer"])

    def remove(self) -> None:
        super().remove()
        self.scorer.remove()


@register_method("pq", family="unstructured")
class PQWeightPruner(WeightPruner):
    """Sparse from the start (Erdős–Rényi-kernel densities); each update rewires every scope by its PQ index
    (:func:`pq_rewire`), regrowing by the gradient accumulated over the window (of DDP-averaged gradients
    under torchrun, so it needs no reduction of its own)."""

    Options = PQOptions
    ramps = False  # sparse at its target from the first epoch

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], cfg: PruneCfg, epochs: int, seed: int = 0,
                 optimizer: torch.optim.Optimizer | None = None, options: BaseModel | None = None):
        layers = maskable_layers(model)
        self._grad = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in layers.items()}
        super().__init__(model, groups, cfg, epochs, seed, optimizer, options)

    def initial_masks(self, seed: int) -> dict[str, torch.Tensor]:
        shapes = {n: tuple(m.weight.shape) for n, m in self.layers.items()}
        density = 1.0 - self.cfg.sparsity
        dens = er_densities(list(shapes.values()), density) if self.options.er_init else [density] * len(shapes)
        gen = torch.Generator().manual_seed(seed)
        return random_masks(shapes, dict(zip(shapes, dens)), gen, self.cfg.min_channels)

    def at_target(self) -> bool:
        return True  # at its sparsity from the start

    def after_backward(self) -> None:
        for n, m in self.layers.items():
            if self._scoring and m.weight.grad is not None:
                self._grad[n] += m.weight.grad.detach()
        super().after_backward()

    def update_masks(self, weights, old, epoch):
        new = {n: pq_rewire(weights[n], old[n], self._grad[n], self.options)[0] for n in self.layers}
        for g in self._grad.values():
            g.zero_()
        return new, self.cfg.sparsity

    def _window_state(self) -> dict:
        return {"grad": {n: g.cpu().clone() for n, g in self._grad.items()}}

    def _load_window_state(self, state: dict) -> None:
        for n, g in self._grad.items():
            g.copy_(state["grad"][n])
