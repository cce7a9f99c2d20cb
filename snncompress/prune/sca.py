"""SCA (Li et al., ICML 2024): score a channel by its spiking activity.

``A[c] = mean over (t, n, h, w) of (s + |v|)`` for the neuron after the channel's conv + BN, where
``s`` are its output spikes and ``v`` its membrane potential (spikingjelly's ``v_seq``, i.e. after
firing and reset), accumulated over every training batch of an update window.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from spikingjelly.activation_based.neuron import BaseNode

from ..recipe import PruneCfg
from .gates import ChannelGroup
from .scorer import Scorer


def neuron_after(model: nn.Module, module_name: str) -> tuple[str, BaseNode]:
    """The first spiking neuron after ``module_name`` in module order (the one a gate feeds)."""
    found = False
    for name, module in model.named_modules():
        if name == module_name:
            found = True
        elif found and isinstance(module, BaseNode):
            return name, module
    raise ValueError(f"{module_name}: no spiking neuron follows it")


class ActivityScorer(Scorer):
    """Accumulates per-channel spiking activity of every group while the model trains."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], cfg: PruneCfg | None = None, seed: int = 0):
        super().__init__(model, groups, cfg, seed)
        self._sum = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
        self._count = {g.name: 0 for g in groups}
        self._handles = []
        for g in groups:
            for gate in g.gates:
                _, node = neuron_after(model, gate)
                node.store_v_seq = True
                self._handles.append(node.register_forward_hook(self._hook(g.name)))

    def _hook(self, group: str):
        def hook(module: BaseNode, args, spikes: torch.Tensor) -> None:
            if not module.training:
                return
            v = module.v_seq
            with torch.no_grad():
                per_channel = (spikes.detach() + v.detach().abs()).transpose(0, -3).flatten(1).mean(1)
            self._sum[group] += per_channel.double().cpu()
            self._count[group] += 1
        return hook

    def scores(self) -> dict[str, torch.Tensor]:
        return {n: self._sum[n] / max(1, self._count[n]) for n in self._sum}

    def reset(self) -> None:
        for n in self._sum:
            self._sum[n].zero_()
            self._count[n] = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
