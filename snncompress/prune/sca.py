"""SCA (Li et al., ICML 2024): score a channel by its spiking activity.

``A[c] = mean over (t, n, h, w) of (s + |v|)`` for the neuron after the channel's conv + BN, where
``s`` are its output spikes and ``v`` its membrane potential (spikingjelly's ``v_seq``, i.e. after
firing and reset), accumulated over every training batch of an update window.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from spikingjelly.activation_based.neuron import BaseNode

from .gates import ChannelGroup, neuron_of


class ActivityScorer:
    """Accumulates per-channel spiking activity of every group while the model trains."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]):
        self.groups = groups
        self._sum = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
        self._count = {g.name: 0 for g in groups}
        self._handles = []
        modules = dict(model.named_modules())
        for g in groups:
            for gate in g.gates:
                node = modules[neuron_of(gate)]
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

    def state_dict(self) -> dict:
        return {"sum": {n: t.clone() for n, t in self._sum.items()}, "count": dict(self._count)}

    def load_state_dict(self, state: dict) -> None:
        for n, t in state["sum"].items():
            self._sum[n].copy_(t)
        self._count.update(state["count"])

    def reset(self) -> None:
        for n in self._sum:
            self._sum[n].zero_()
            self._count[n] = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
