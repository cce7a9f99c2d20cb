"""Physical channel removal with Torch-Pruning (the slim stage and the latency calibration run it; loading a slim.pt does not)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import functional

from ..errors import MaskError
from .gates import strip_gates
from .groups import dependency_graph, groups_of_graph


def slim(model: nn.Module, keep: dict[str, torch.Tensor], example_input: torch.Tensor) -> nn.Module:
    """Return a copy of ``model`` without gates, whose group channels are cut to ``keep``.

    ``keep`` maps a group name (see :func:`~snncompress.prune.gates.channel_groups`) to a bool tensor over
    its channels; groups not named keep all channels. Conv/BN output channels and every consumer's input
    channels (residual couplings included) are removed by Torch-Pruning on a graph traced in single-step mode.
    """
    out = copy.deepcopy(model)
    dg = dependency_graph(out, example_input)
    groups = {g.name: g for g in groups_of_graph(out, dg)}
    unknown = set(keep) - set(groups)
    if unknown:
        raise MaskError(f"unknown channel group(s) {sorted(unknown)}; groups: {', '.join(groups)}")
    modules = dict(out.named_modules())
    for name, mask in keep.items():
        g = groups[name]
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (g.size,):
            raise MaskError(f"{name}: mask has shape {tuple(mask.shape)}, the group has {g.size} channels")
        if not mask.any():
            raise MaskError(f"{name}: mask keeps no channel (at least one is required)")
        removed = (~mask).nonzero().flatten().tolist()
        if removed:
            dg.get_pruning_group(modules[g.convs[0]], tp.prune_conv_out_channels, idxs=removed).prune()
    strip_gates(out)  # every remaining gate is open: multiplying by 1 is dropped
    functional.invalidate_reset_cache(out)  # modules changed: spikingjelly's cache of what to reset is stale
    return out
