"""Channel gates: how a keep-mask is enforced, and which channels form one group.

A gate multiplies the BatchNorm output by 0/1 right before the spiking neuron. A gated channel feeds
0 into its neuron, which therefore never spikes (v_reset = 0 or soft reset, positive threshold), so
the next layer receives nothing from it and physically removing the channel changes nothing.
The gate is a parameter (never given to the optimiser) so that ``gate.grad`` -- the first-order
effect of reopening a closed channel on the loss -- is available as the regrowth signal.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import functional


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
        return self.gate.detach() > 0.5

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


def strip_gates(model: nn.Module) -> nn.Module:
    """Replace every :class:`ChannelGate` by ``nn.Identity`` (in place) and return the model."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ChannelGate):
                setattr(module, child_name, nn.Identity())
    return model


def gate_modules(model: nn.Module) -> dict[str, ChannelGate]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ChannelGate)}


def _single_step_input(example_input: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    # Torch-Pruning traces the net in single-step mode: drop the time axis of [T,B,C,H,W]
    return example_input[0] if example_input.dim() == ndim + 1 else example_input


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning dependency graph of a *gate-free* spiking model, traced in single-step mode.

    Multi-step tracing crashes or silently finds no coupling (DESIGN.md), so the caller's model is
    switched to 's' for the trace and back to 'm' afterwards.
    """
    functional.set_step_mode(model, "s")
    try:
        functional.reset_net(model)
        # the classifier stays in the graph (so its in-features follow the last group); it is simply
        # never used as a pruning root
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=_single_step_input(example_input))
        functional.reset_net(model)
    finally:
        functional.set_step_mode(model, "m")
        functional.invalidate_reset_cache(model)
    return dg


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs are the class logits and must never be pruned (the last Linear/Conv)."""
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1:]
    return last


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """The prunable channel groups of a gated spiking model, in forward order.

    Each group lists its member convs (whose output channels are coupled, e.g. by a residual add),
    the BatchNorms on those channels, and the gates that enforce the group's mask.
    """
    stripped = strip_gates(copy.deepcopy(model))
    names = {m: n for n, m in stripped.named_modules()}
    dg = dependency_graph(stripped, example_input)
    gate_of_conv = _gates_by_conv(model)
    classifier = classifier_layers(stripped)

    groups: list[ChannelGroup] = []
    seen: set[str] = set()
    for name, module in stripped.named_modules():
        if not isinstance(module, nn.Conv2d) or name in seen or module in classifier:
            continue
        if module.groups != 1:
            raise ValueError(f"{name}: grouped/depthwise convolution is not supported")
        group = dg.get_pruning_group(module, tp.prune_conv_out_channels, idxs=list(range(module.out_channels)))
        convs, bns = [], []
        for dep, _ in group:
            target, handler = dep.target.module, dep.handler
            if handler == tp.prune_conv_out_channels and names.get(target) not in convs:
                convs.append(names[target])
            elif handler == tp.prune_batchnorm_out_channels and names.get(target) not in bns:
                bns.append(names[target])
        convs.sort(key=list(names.values()).index)
        seen.update(convs)
        gates = [gate_of_conv[c] for c in convs if c in gate_of_conv]
        groups.append(ChannelGroup(name=convs[0], size=module.out_channels, convs=convs, bns=bns, gates=gates))
    return groups


def _gates_by_conv(model: nn.Module) -> dict[str, str]:
    """Each gate belongs to the conv that precedes it in module order (conv -> BN -> gate -> neuron)."""
    out, last_conv = {}, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = name
        elif isinstance(module, ChannelGate) and last_conv is not None:
            out[last_conv] = name
    return out


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
