"""The T time steps of a spiking model unrolled into one graph, with lean neuron arithmetic."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based.base import StepModule
from spikingjelly.activation_based.neuron import BaseNode

from ..data import to_steps
from ..models.modules import set_module

UNROLL_ORDERS = ("step", "layer")


class UnrolledSNN(nn.Module):
    """Model input -> logits in one graph: resets the neurons, lays out the T steps, runs them all.

    The input is the image ``[B, C, H, W]`` for direct encoding (repeated over T inside the graph),
    and the spike / frame sequence ``[B, T, C, H, W]`` for Poisson and frame inputs.

    ``order="layer"`` runs the model as trained, in multi-step mode: each layer over all T steps,
    then the next. ``order="step"`` runs a single-step copy of ``net`` once per step (the readout averaged
    over the steps, as the models do): no per-layer split and concatenation of the steps, and a working set
    of one step, which measured ~25 % faster in onnxruntime at batch 32 (see benchmarks/speedup.py). Both
    compute the same numbers; ``net`` itself is never switched to another step mode.
    """

    def __init__(self, net: nn.Module, T: int, encoding: str = "direct", order: str = "layer"):
        super().__init__()
        if order not in UNROLL_ORDERS:
            raise ValueError(f"unknown unroll order {order!r}; allowed: {', '.join(UNROLL_ORDERS)}")
        if order == "step":
            net = copy.deepcopy(net)
            functional.set_step_mode(net, "s")
        self.net, self.T, self.encoding, self.order = net, T, encoding, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self.net)
        if self.order == "layer":
            return self.net(to_steps(x, self.T, self.encoding))
        for m in self.net.modules():
            if isinstance(m, LeanNeuron):
                m.v = None
        steps = [x] * self.T if self.encoding == "direct" else x.unbind(1)
        return torch.stack([self.net(x_t) for x_t in steps]).mean(0)


class LeanNeuron(nn.Module, StepModule):
    """An IF/LIF neuron with as few ONNX ops per step as spikingjelly's arithmetic allows.

    Per step: charge (3 ops for LIF, 1 for IF), compare and cast, and a reset in two cheap
    arithmetic ops (onnxruntime's ``Where`` is about ten times slower per element than a ``Mul``).
    It performs the same float operations in the same order as spikingjelly's CPU kernel, so spikes
    are bitwise identical (a reset to 0 can differ only in the sign of zero, which no later
    comparison sees); the export verifies this against the original model. A gate attached to the
    neuron (dense-shaped models) is applied first. Multi-step calls start from rest; single-step
    calls carry the membrane potential ``v`` until it is set back to ``None``.
    """

    def __init__(self, node: BaseNode):
        super().__init__()
        self.lif = isinstance(node, neuron.LIFNode)
        self.tau = float(node.tau) if self.lif else 1.0
        self.decay_input = bool(getattr(node, "decay_input", True))
        self.v_threshold, self.v_reset = float(node.v_threshold), node.v_reset
        self.gate = node.gate if hasattr(node, "gate") else None
        self.step_mode, self.v = node.step_mode, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            x = self.gate(x)
        if self.step_mode == "s":
            s, self.v = self._step(x, self.v)
            return s
        v, spikes = None, []
        for x_t in x.split(1):  # steps keep their T axis of 1: no Squeeze/Unsqueeze nodes
            s, v = self._step(x_t, v)
            spikes.append(s)
        return torch.cat(spikes)

    def _step(self, x: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(spikes, membrane potential after the reset) of one step; ``v`` None means at rest."""
        r = 0.0 if self.v_reset is None else float(self.v_reset)
        if v is None and r == 0.0:  # v starts at the rest potential 0: v + (x - v)/tau == x/tau
            h = x / self.tau if self.lif and self.decay_input else x
        else:
            v = torch.full_like(x, r) if v is None else v
            if not self.lif:
                h = v + x
            elif self.decay_input:
                h = v + (x - (v if r == 0.0 else v - r)) / self.tau
            else:
                h = v - (v if r == 0.0 else v - r) / self.tau + x
        s = (h >= self.v_threshold).to(h.dtype)
        # onnxruntime's Where costs about ten Muls per element: reset with arithmetic where it is
        # exact (h - h * s is h or exactly 0; the soft reset is spikingjelly's own formula)
        if self.v_reset is None:
            return s, h - s * self.v_threshold
        if r == 0.0:
            return s, h - h * s
        return s, torch.where(h >= self.v_threshold, r, h)


@torch.no_grad()
def steps_unroll_exactly(model: nn.Module, inputs: torch.Tensor, T: int, encoding: str) -> bool:
    """Whether ``model`` computes the same logits run step by step as run layer by layer (PyTorch, on copies).

    Step order runs the network once per step and averages the readout over the steps, as the built-in
    models do; a model whose readout is not that mean (e.g. a tutorial model that returns ``x_seq.mean(0)``,
    which averages over the batch in single-step mode) must be unrolled layer by layer. Every model that
    loads runs in single-step mode (gates are attached by a single-step trace), so this compares outputs only.
    """
    was_training = model.training
    try:
        layer = UnrolledSNN(model.eval(), T, encoding, "layer")(inputs)
        step = UnrolledSNN(model, T, encoding, "step")(inputs)
    finally:
        functional.reset_net(model)
        model.train(was_training)
    return step.shape == layer.shape and bool(torch.allclose(step, layer, rtol=1e-4, atol=1e-5))


def lean_neurons(model: nn.Module) -> int:
    """Replace every plain IF/LIF neuron by a :class:`LeanNeuron` (in place); returns how many."""
    nodes = [(n, m) for n, m in model.named_modules() if type(m) in (neuron.IFNode, neuron.LIFNode)]
    for name, node in nodes:
        set_module(model, name, LeanNeuron(node))
    return len(nodes)
