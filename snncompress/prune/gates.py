"""Channel gates: how a keep-mask is enforced, and which channels form one group.

A gate multiplies a spiking neuron's input channels by 0/1 (it sits right before the neuron: after
the BatchNorm, or after the residual add). A gated channel feeds 0 into its neuron, which therefore
never spikes (reset to a potential below threshold, positive threshold), so the next layer receives
nothing from it and physically removing the channel changes nothing. The gate is a parameter (never
given to the optimiser) so that ``gate.grad`` -- the first-order effect of reopening a closed
channel on the loss -- is available as the regrowth signal.

Gates are attached to any spikingjelly model (built-in or user-supplied) by :func:`attach_gates`;
Torch-Pruning knows how to prune them (:class:`GatePruner`), so its dependency graph tells which
gates belong to which channel group, residual couplings included.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based.neuron import BaseNode

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


class GatePruner(tp.pruner.function.BasePruningFunc):
    """Teaches Torch-Pruning that a gate is a per-channel layer (in channels = out channels)."""

    def prune_out_channels(self, layer: ChannelGate, idxs) -> ChannelGate:
        keep = sorted(set(range(layer.gate.numel())) - set(idxs))
        layer.gate = self._prune_parameter_and_grad(layer.gate, keep, 0)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: ChannelGate) -> int:
        return layer.gate.numel()

    get_in_channels = get_out_channels


@dataclass
class ChannelGroup:
    """Output channels that must be kept or removed together (one conv, or convs joined by an add)."""

    name: str
    size: int
    convs: list[str]
    bns: list[str] = field(default_factory=list)
    gates: list[str] = field(default_factory=list)


def _gate_input(module: BaseNode, args: tuple) -> tuple:
    return (module.gate(args[0]), *args[1:])


def check_supported(model: nn.Module) -> None:
    """Refuse, naming the module, what channel pruning cannot handle exactly."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)):
            raise ValueError(f"{name} ({type(m).__name__}): only Conv2d layers are supported")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"{name} (Conv2d, groups={m.groups}): grouped/depthwise convolution is not supported")
        if isinstance(m, BaseNode):
            if not isinstance(m, SUPPORTED_NEURONS):
                raise ValueError(f"{name} ({type(m).__name__}): neuron type with unknown zero-input behaviour; "
                                 f"supported: {', '.join(c.__name__ for c in SUPPORTED_NEURONS)}")
            v_reset = m.v_reset if m.v_reset is not None else 0.0
            if not (m.v_threshold > 0 and v_reset < m.v_threshold):
                raise ValueError(f"{name} ({type(m).__name__}): needs v_threshold > 0 and v_reset < v_threshold "
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
            _single_step_forward(model, example_input)
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


def _single_step_input(example_input: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    # graphs are traced in single-step mode: drop the time axis of [T,B,C,H,W]
    return example_input[0] if example_input.dim() == ndim + 1 else example_input


def _single_step_forward(model: nn.Module, example_input: torch.Tensor):
    functional.set_step_mode(model, "s")
    try:
        functional.reset_net(model)
        return model(_single_step_input(example_input))
    finally:
        functional.reset_net(model)
        functional.set_step_mode(model, "m")
        functional.invalidate_reset_cache(model)


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning dependency graph of a spiking model, traced in single-step mode.

    Multi-step tracing crashes or silently finds no coupling (DESIGN.md), so the model is switched
    to 's' for the trace and back to 'm' afterwards. The classifier stays in the graph (its
    in-features follow the last group); it is simply never used as a pruning root.
    """
    functional.set_step_mode(model, "s")
    try:
        functional.reset_net(model)
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=_single_step_input(example_input),
                                                   customized_pruners={ChannelGate: GatePruner()})
        functional.reset_net(model)
    finally:
        functional.set_step_mode(model, "m")
        functional.invalidate_reset_cache(model)
    return dg


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs are the class logits and must never be pruned (the last Linear/Conv)."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1:]


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """The prunable channel groups of a spiking model, in forward order.

    Each group lists its member convs (whose output channels are coupled, e.g. by a residual add),
    the BatchNorms on those channels, and the gates that enforce the group's mask (if attached).
    On a gated model, a group whose channels reach no gate (e.g. a conv + BN feeding the readout
    with no spiking neuron in between) cannot be masked, so it is left out: it stays dense.
    """
    check_supported(model)
    gated = bool(gate_modules(model))
    traced = copy.deepcopy(model)
    names = {m: n for n, m in traced.named_modules()}
    order = list(names.values())
    dg = dependency_graph(traced, example_input)
    classifier = classifier_layers(traced)

    groups: list[ChannelGroup] = []
    seen: set[str] = set()
    for name, module in traced.named_modules():
        if not isinstance(module, nn.Conv2d) or name in seen or module in classifier:
            continue
        group = dg.get_pruning_group(module, tp.prune_conv_out_channels, idxs=list(range(module.out_channels)))
        members: dict[str, list[str]] = {"convs": [], "bns": [], "gates": []}
        for dep, _ in group:
            target = dep.target.module
            kind = ("convs" if isinstance(target, nn.Conv2d) and dep.handler == tp.prune_conv_out_channels
                    else "bns" if isinstance(target, nn.modules.batchnorm._BatchNorm)
                    else "gates" if isinstance(target, ChannelGate) else None)
            if kind and names[target] not in members[kind]:
                members[kind].append(names[target])
        for v in members.values():
            v.sort(key=order.index)
        seen.update(members["convs"])
        if gated and not members["gates"]:
            continue
        groups.append(ChannelGroup(name=members["convs"][0], size=module.out_channels, **members))
    return groups


def kept_fraction(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of all channels (over every group) that the masks keep."""
    return sum(int(torch.as_tensor(m).sum()) for m in masks.values()) / sum(len(m) for m in masks.values())


def get_masks(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    gates = gate_modules(model)
    return {g.name: gates[g.gates[0]].mask.clone() for g in groups}


def set_masks(model: nn.Module, groups: list[ChannelGroup], masks: dict[str, torch.Tensor]) -> None:
    gates = gate_modules(model)
    for g in groups:
        mask = masks[g.name]
        if mask.shape != (g.size,):
            raise ValueError(f"mask for {g.name}: expected {g.size} channels, got {tuple(mask.shape)}")
        if not mask.any():
            raise ValueError(f"mask for {g.name}: keeps no channel (at least one is required)")
        for gate_name in g.gates:
            gates[gate_name].set_mask(mask)
