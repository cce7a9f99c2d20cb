"""The conv and linear layers of a network as a cost unit sees them: sizes, groups, dense MACs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from ...errors import SnnCompressError
from ..gates import ChannelGroup


@dataclass
class Layer:
    """A conv or linear layer (sizes of one inference: batch 1, all T steps)."""

    name: str
    kind: str  # "conv" or "linear"
    in_group: str | None  # the channel group its input channels belong to (None: never pruned, e.g. the image)
    out_group: str | None  # the group of its output channels (None: never pruned, e.g. the classifier)
    n_in: int  # input channels (a linear layer after a flatten: the channels of its input, not the features)
    n_out: int
    macs: int  # dense MACs of one inference, as torch's FlopCounterMode counts them
    in_shape: tuple[int, ...]  # one sample's input in one step: (C, H, W) or (features,)
    conv: tuple = ()  # (kernel, stride, padding, dilation) of a conv

    @property
    def taps(self) -> int:
        """Weights joining one input channel to one output channel: kernel height x width for a conv, the features
        of one input channel for a linear layer (after a flatten)."""
        return self.conv[0][0] * self.conv[0][1] if self.conv else self.in_shape[0] // self.n_in

    @property
    def out_hw(self) -> tuple[int, int]:
        """Height and width of a conv's output ((1, 1) for a linear layer)."""
        if not self.conv:
            return 1, 1
        (kh, kw), stride, padding, dilation = self.conv
        h, w = self.in_shape[1:]
        return ((h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1,
                (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1)


def model_layers(model: nn.Module, example: torch.Tensor, groups: list[ChannelGroup]) -> list[Layer]:
    """Every conv and linear layer of a multi-step ``model`` with its groups and dense MACs (one forward, batch 1)."""
    out_group = {c: g.name for g in groups for c in g.convs}
    in_group = {c: g.name for g in groups for c in g.consumers}
    sizes = {g.name: g.size for g in groups}
    seen: dict[str, Layer] = {}

    def hook(name):
        def fn(module, args, out):
            x = args[0]
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1] // module.groups
                macs, shape = out.numel() * module.in_channels * k, tuple(x.shape[-3:])
                n_in, n_out = module.in_channels, module.out_channels
                conv = (module.kernel_size, module.stride, module.padding, module.dilation)
            else:
                macs, shape, conv = out.numel() * module.in_features, (module.in_features,), ()
                n_in, n_out = sizes.get(in_group.get(name), module.in_features), module.out_features
            if name in seen:  # a layer called again (shared) costs again
                seen[name].macs += macs
                return
            seen[name] = Layer(name, "conv" if conv else "linear", in_group.get(name), out_group.get(name),
                               n_in, n_out, macs, shape, conv)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example[:, :1])
    finally:
        for h in handles:
            h.remove()
        functional.reset_net(model)
    for layer in seen.values():
        if layer.in_group and layer.kind == "linear" and layer.in_shape[0] % layer.n_in:
            raise SnnCompressError(f"{layer.name}: {layer.in_shape[0]} input features are not a whole number of "
                                   f"channels of {layer.in_group} ({layer.n_in}); budgets in MACs, SOPs or latency "
                                   "need a flatten of whole channels")
    return list(seen.values())
