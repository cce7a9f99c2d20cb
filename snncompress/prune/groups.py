"""Channel groups from Torch-Pruning's dependency graph: which convs, BatchNorms and gates share a mask.

Torch-Pruning is imported here only: training and slimming trace graphs, loading a checkpoint never does.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch_pruning as tp

from ..models.modules import step_mode
from .gates import ChannelGate, ChannelGroup, check_supported, gate_modules, single_step_input


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


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning dependency graph of a spiking model, traced in single-step mode.

    Multi-step tracing crashes or silently finds no coupling (see docs/design.md), so the model is
    switched to 's' for the trace and back to 'm' afterwards. The classifier stays in the graph (its
    in-features follow the last group); it is simply never used as a pruning root.
    """
    with step_mode(model, "s"):
        return tp.DependencyGraph().build_dependency(model, example_inputs=single_step_input(example_input),
                                                     customized_pruners={ChannelGate: GatePruner()})


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs are the class logits and must never be pruned (the last Linear/Conv)."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1:]


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """The prunable channel groups of a spiking model, in forward order.

    Each group lists its member convs (whose output channels are coupled, e.g. by a residual add),
    the BatchNorms on those channels, and the gates that enforce the group's mask (if attached).
    On a gated model, a group whose channels reach no gate (e.g. a conv + BN feeding the readout
    with no spiking neuron in between) cannot be masked, so it is left out: it stays dense.
    The model is traced on a copy (Torch-Pruning's tracing leaves hooks and attributes behind).
    """
    traced = copy.deepcopy(model)
    return groups_of_graph(traced, dependency_graph(traced, example_input))


def groups_of_graph(model: nn.Module, dg: tp.DependencyGraph) -> list[ChannelGroup]:
    """:func:`channel_groups` from a dependency graph already traced on ``model``."""
    check_supported(model)
    gated = bool(gate_modules(model))
    names = {m: n for n, m in model.named_modules()}
    order = list(names.values())
    classifier = classifier_layers(model)

    groups: list[ChannelGroup] = []
    seen: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or name in seen or module in classifier:
            continue
        group = dg.get_pruning_group(module, tp.prune_conv_out_channels, idxs=list(range(module.out_channels)))
        members: dict[str, list[str]] = {"convs": [], "bns": [], "gates": [], "consumers": []}
        for dep, _ in group:
            target = dep.target.module
            kind = ("convs" if isinstance(target, nn.Conv2d) and dep.handler == tp.prune_conv_out_channels
                    else "consumers" if dep.handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
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


