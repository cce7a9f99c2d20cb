"""Channel gates: how a keep-mask is enforced, and which channels form one group.

A gate multiplies a spiking neuron's input channels by 0/1 (it sits right before the neuron: after
the BatchNorm, or after the residual add). A gated channel feeds 0 into its neuron, which therefore
never spikes (reset to a potential below threshold, positive threshold), so the next layer receives
nothing from it and physically removing the channel changes nothing. The gate is a parameter (never
given to the optimiser) so that ``gate.grad`` -- the first-order effect of reopening a closed
channel on the loss -- is available as the regrowth signal.

Gates are attached to any spikingjelly model (built-in or user-supplied) by :func:`attach_gates`;
which gates belong to which channel group comes from Torch-Pruning's dependency graph
(:mod:`snncompress.prune.groups`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron
from spikingjelly.activation_based.neuron import BaseNode

from ..errors import MaskError, ModelError
from ..models.modules import step_mode

# neurons whose zero-input behaviour is known: with v_reset < v_threshold and v_threshold > 0 they
# stay at rest and never fire when their input is 0
SUPPORTED_NEURONS = (neuron.IFNode, neuron.LIFNode, neuron.ParametricLIFNode)


class ChannelGate(nn.Module):
    """Multiplies channel ``c`` of a ``[..., C, H, W]`` tensor by ``gate[c]`` (0 or 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the channel axis is -3 in both single-step [B,C,H,W] and multi-step [T,B,C,H,W] inputs
        return x * self.gate.view(-1, 1, 1)

    @property
    def mask(self) -> torch.Tensor:
        return self.gate.detach().cpu() > 0.5

    def set_mask(self, mask: torch.Tensor) -> None:
        with torch.no_grad():
            self.gate.copy_(mask.to(self.gate.dtype))


@dataclass
class ChannelGroup:
    """Output channels that must be kept or removed together (one conv, or convs joined by an add)."""

    name: str
    size: int
    convs: list[str]
    bns: list[str] = field(default_factory=list)
    gates: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)  # convs / linears whose input channels these are


def _gate_input(module: BaseNode, args: tuple) -> tuple:
    return (module.gate(args[0]), *args[1:])


def check_supported(model: nn.Module) -> None:
    """Refuse, naming the module, what channel pruning cannot handle exactly."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)):
            raise ModelError(f"{name} ({type(m).__name__}): only Conv2d layers are supported")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ModelError(f"{name} (Conv2d, groups={m.groups}): grouped/depthwise convolution is not supported")
        if isinstance(m, BaseNode):
            if not isinstance(m, SUPPORTED_NEURONS):
                raise ModelError(f"{name} ({type(m).__name__}): neuron type with unknown zero-input behaviour; "
                                 f"supported: {', '.join(c.__name__ for c in SUPPORTED_NEURONS)}")
            v_reset = m.v_reset if m.v_reset is not None else 0.0
            if not (m.v_threshold > 0 and v_reset < m.v_threshold):
                raise ModelError(f"{name} ({type(m).__name__}): needs v_threshold > 0 and v_reset < v_threshold "
                                 f"so that a zero input never fires (got {m.v_threshold}, {m.v_reset})")


def attach_gates(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """Put a :class:`ChannelGate` in front of every spiking neuron that receives conv channels.

    The gate becomes the neuron's child ``gate`` and is applied by a forward pre-hook, so the rest of
    the model's structure and parameter names do not change. Returns the model (modified in place).
    """
    check_supported(model)
    shapes: dict[str, torch.Size] = {}
    nodes = {n: m for n, m in model.named_modules() if isinstance(m, BaseNode) and not hasattr(m, "gate")}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: shapes.__setitem__(n, args[0].shape))
               for n, m in nodes.items()]
    try:
        with torch.no_grad():
            single_step_forward(model, example_input)
    finally:
        for h in handles:
            h.remove()
    for name, node in nodes.items():
        shape = shapes.get(name)
        if shape is not None and len(shape) == 4:  # [B, C, H, W]: channels that a conv can drop
            node.add_module("gate", ChannelGate(shape[1]))
            node.register_forward_pre_hook(_gate_input)
    return model


def strip_gates(model: nn.Module) -> nn.Module:
    """Remove every gate and its hook (in place) and return the model."""
    for m in model.modules():
        if isinstance(getattr(m, "gate", None), ChannelGate):
            del m.gate
            for key, hook in list(m._forward_pre_hooks.items()):
                if hook is _gate_input:
                    del m._forward_pre_hooks[key]
    return model


def gate_modules(model: nn.Module) -> dict[str, ChannelGate]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ChannelGate)}


def neuron_of(gate_name: str) -> str:
    """The neuron a gate feeds (its parent)."""
    return gate_name.rsplit(".", 1)[0]


def single_step_input(example_input: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    # graphs are traced in single-step mode: drop the time axis of [T,B,C,H,W]
    return example_input[0] if example_input.dim() == ndim + 1 else example_input


def single_step_forward(model: nn.Module, example_input: torch.Tensor):
    """One single-step forward of the first time step of ``example_input`` (for tracing with hooks)."""
    with step_mode(model, "s"):
        return model(single_step_input(example_input))


def kept_fraction(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of all channels (over every group) that the masks keep."""
    return sum(int(torch.as_tensor(m).sum()) for m in masks.values()) / sum(len(m) for m in masks.values())


def get_masks(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    gates = gate_modules(model)
    return {g.name: gates[g.gates[0]].mask.clone() for g in groups}


def set_masks(model: nn.Module, groups: list[ChannelGroup], masks: dict[str, torch.Tensor]) -> None:
    gates = gate_modules(model)
    names = [g.name for g in groups]
    if set(masks) != set(names):
        odd = sorted(set(names) - set(masks)) or sorted(set(masks) - set(names))
        raise MaskError(f"masks must name every channel group ({', '.join(names)}), "
                        f"{'missing' if set(names) - set(masks) else 'unknown'}: {', '.join(map(str, odd))[:80]}")
    for g in groups:
        mask = masks[g.name]
        if mask.shape != (g.size,):
            raise MaskError(f"mask for {g.name}: expected {g.size} channels, got {tuple(mask.shape)}")
        if not mask.any():
            raise MaskError(f"mask for {g.name}: keeps no channel (at least one is required)")
        for gate_name in g.gates:
            gates[gate_name].set_mask(mask)
