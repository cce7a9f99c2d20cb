"""SCA (Li et al., ICML 2024): score a channel by its spiking activity.

``A[c] = mean over (t, n, h, w) of (s + |v|)`` for the neuron after the channel's conv + BN, where
``s`` are its output spikes and ``v`` its membrane potential (spikingjelly's ``v_seq``, i.e. after
firing and reset), accumulated over every training batch of an update window.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from spikingjelly.activation_based.neuron import BaseNode

from pydantic import BaseModel

from ..registry import register_method
from .gates import ChannelGroup, neuron_of
from .scorer import ChannelMeans, Scorer, model_device


@register_method("sca")
class ActivityScorer(Scorer):
    """Accumulates per-channel spiking activity of every group while the model trains."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], options: BaseModel | None = None, seed: int = 0):
        super().__init__(model, groups, options, seed)
        self._activity = ChannelMeans(groups, model_device(model))
        self._handles = []
        modules = dict(model.named_modules())
        self._nodes = [modules[neuron_of(gate)] for g in groups for gate in g.gates]
        for g in groups:
            for gate in g.gates:
                self._handles.append(modules[neuron_of(gate)].register_forward_hook(self._hook(g.name)))
        self.activate(True)

    def activate(self, on: bool) -> None:
        # the stored [T, N, C, H, W] potentials cost memory (one more activation per neuron): only while scoring
        super().activate(on)
        for node in self._nodes:
            node.store_v_seq = on

    def _hook(self, group: str):
        def hook(module: BaseNode, args, spikes: torch.Tensor) -> None:
            if not (self.active and module.training):
                return
            v = module.v_seq
            with torch.no_grad():
                per_channel = (spikes.detach() + v.detach().abs()).transpose(0, -3).flatten(1).mean(1)
            self._activity.add(group, per_channel, 1)
        return hook

    def scores(self) -> dict[str, torch.Tensor]:
        return self._activity.means()

    def remove(self) -> None:
        super().remove()
        for node in self._nodes:
            node.store_v_seq = False
