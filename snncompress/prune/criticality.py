"""Criticality-guided regeneration (Chen, Liu, You; arXiv 2311.16141), structured pipeline.

Training adds ``options.l1_gamma * sum |gamma|`` over the groups' BatchNorms to the loss (network slimming);
channels are kept by |gamma|, and the regrowth share goes to the pruned channels nearest criticality:
those whose membrane potential before firing sits closest to the threshold, measured by the
neuron's own surrogate-gradient shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron, surrogate

from pydantic import BaseModel

from ..errors import ModelError
from ..registry import register_method
from .baselines import BNScorer
from .gates import ChannelGroup, neuron_of
from .options import CriticalityOptions
from .scorer import ChannelMeans, member_modules, model_device


def criticality(v: torch.Tensor, v_threshold: float, alpha: float, kind: str = "atan") -> torch.Tensor:
    """The surrogate gradient of spikingjelly's ``kind`` at ``v - v_threshold``, normalised to peak 1.

    ``atan``: spikingjelly's ``ATan`` derivative is ``(alpha/2) / (1 + (pi/2 * alpha * x)^2)``, so
    ``c = 1 / (1 + (pi/2 * alpha * x)^2)`` (docs/methods.md's ``1 / (1 + (pi x)^2)`` is the case alpha = 2).
    ``sigmoid``: the derivative is ``alpha * s * (1 - s)`` with ``s = sigmoid(alpha * x)``, peak alpha/4,
    so ``c = 4 * s * (1 - s)``. Dropping the peak height makes the score independent of alpha's scale
    and comparable across layers: 1 exactly at threshold, towards 0 far from it.
    """
    x = v - v_threshold
    if kind == "atan":
        return 1.0 / (1.0 + (math.pi / 2 * alpha * x) ** 2)
    if kind == "sigmoid":
        s = torch.sigmoid(alpha * x)
        return 4.0 * s * (1.0 - s)
    raise ValueError(f"criticality: unsupported surrogate {kind!r}; supported: atan, sigmoid")


def surrogate_kind(node: neuron.BaseNode) -> str:
    """``atan`` or ``sigmoid``, from the neuron's spikingjelly surrogate function."""
    sg = node.surrogate_function
    if type(sg) is surrogate.ATan:
        return "atan"
    if type(sg) is surrogate.Sigmoid:
        return "sigmoid"
    raise ModelError(f"criticality: unsupported surrogate {type(sg).__name__}; supported: ATan, Sigmoid")


def membrane_before_fire(node: neuron.BaseNode, x_seq: torch.Tensor, v_seq: torch.Tensor) -> torch.Tensor:
    """``H[t]``, the charged membrane potential that fire compares with the threshold, for all t.

    spikingjelly's ``v_seq`` is the potential *after* fire and reset, so H is recharged from the input:
    LIF (decay_input): ``H[t] = v[t-1] + (x[t] - (v[t-1] - v_reset)) / tau``; LIF without decay_input:
    ``H[t] = v[t-1] - (v[t-1] - v_reset) / tau + x[t]``; IF: ``H[t] = v[t-1] + x[t]``; soft reset
    (``v_reset is None``) charges with v_reset = 0. ``v[-1]`` is the reset state (v_reset, or 0 for soft
    reset): the network is reset before every batch (``functional.reset_net``).
    """
    v_rest = 0.0 if node.v_reset is None else node.v_reset
    v_prev = torch.cat([torch.full_like(v_seq[:1], v_rest), v_seq[:-1]])
    if type(node) is neuron.LIFNode:
        if node.decay_input:
            return v_prev + (x_seq - (v_prev - v_rest)) / node.tau
        return v_prev - (v_prev - v_rest) / node.tau + x_seq
    if type(node) is neuron.IFNode:
        return v_prev + x_seq
    raise ModelError(f"criticality: unsupported neuron {type(node).__name__}; supported: LIFNode, IFNode")


def _twin(node: neuron.BaseNode) -> neuron.BaseNode:
    """A detached copy of an LIF / IF neuron that stores ``v_seq`` (not part of the model)."""
    common = dict(v_threshold=node.v_threshold, v_reset=node.v_reset, surrogate_function=node.surrogate_function,
                  detach_reset=node.detach_reset, step_mode="m", store_v_seq=True)
    if type(node) is neuron.LIFNode:
        return neuron.LIFNode(tau=node.tau, decay_input=node.decay_input, **common)
    if type(node) is neuron.IFNode:
        return neuron.IFNode(**common)
    raise ModelError(f"criticality: unsupported neuron {type(node).__name__}; supported: LIFNode, IFNode")


@register_method("criticality")
class CriticalityScorer(BNScorer):
    """Keep by |gamma| (:class:`BNScorer`); regrow by criticality; L1 penalty on gamma.

    Criticality of channel c, per sample: ``criticality(H)`` averaged over T, max over (h, w); then averaged over
    the samples (and member neurons). As the paper measures it (``options.measure: update``): at each mask update,
    the network in eval mode, over the training set (``options.batches``: its first n batches). ``measure:
    training``: over the training batches of the update window, in train mode, as they are trained on.

    H is measured on the gate's *input* (the BN output) through a twin of the neuron, not on the gated
    neuron itself: for an open channel that is the same input, the same state and the same dynamics, so
    the same H; for a closed channel the gated neuron only ever sees 0, which would give every closed
    channel the same constant ``c(v_rest - V_th)`` and make regrowth blind to them. The twin gives the
    criticality the channel *would* have if reopened, as the paper measures it on the unpruned model.
    """

    Options = CriticalityOptions
    regrow_share = 0.05  # the paper's: 5 % of the kept channels are regrown by criticality

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], options: BaseModel | None = None, seed: int = 0):
        super().__init__(model, groups, options, seed)
        self._criticality = ChannelMeans(groups, model_device(model))
        self._measuring = False
        self._handles = []
        for g in groups:
            for gate_name, gate in zip(g.gates, member_modules(model, g.gates)):
                twin = _twin(dict(model.named_modules())[neuron_of(gate_name)])
                self._handles.append(gate.register_forward_hook(self._hook(g.name, twin)))

    def _hook(self, group: str, twin: neuron.BaseNode):
        kind = surrogate_kind(twin)
        alpha = twin.surrogate_function.alpha

        def hook(module: nn.Module, args, out) -> None:
            # the twin neuron runs only while measuring: at the update, or in the training steps of a scoring epoch
            if not (self._measuring or (self.options.measure == "training" and self.active and module.training)):
                return
            x = args[0].detach()
            with torch.no_grad():
                twin.reset()
                twin(x)
                h = membrane_before_fire(twin, x, twin.v_seq)
                twin.reset()
                c = criticality(h, twin.v_threshold, alpha, kind)  # [T, N, C, H, W]
                per_sample = c.mean(0).flatten(2).amax(2)  # [N, C]: mean over T, max over space
            self._criticality.add(group, per_sample.sum(0), per_sample.shape[0])
        return hook

    def measure(self, forward) -> None:
        if self.options.measure != "update":
            return
        self._measuring = True
        try:
            forward(self.options.batches, False)
        finally:
            self._measuring = False

    def criticality_scores(self) -> dict[str, torch.Tensor]:
        return self._criticality.means()

    def regrowth_scores(self) -> dict[str, torch.Tensor]:
        return self.criticality_scores()

    def penalty(self) -> torch.Tensor:
        if self.options.l1_gamma == 0:
            return torch.zeros(())
        return self.options.l1_gamma * sum(b.weight.abs().sum() for bns in self._bns.values() for b in bns)
