"""Spiking ResNets (tdBN style, Zheng et al. 2021) and SEW-ResNets (Fang et al. 2021, ADD connection).

Both take ``[T, B, C, H, W]`` in multi-step mode and ``[B, C, H, W]`` in single-step mode (the mode
Torch-Pruning traces in) and return logits ``[B, classes]`` (the readout averaged over T).

* Spiking ResNet block: ``sn2(bn2(conv2(sn1(bn1(conv1(x))))) + shortcut(x))`` -- the add comes
  before the block's last neuron, so the channel gate (which sits in front of a neuron) gates the sum.
* SEW block (ADD): ``sn2(bn2(conv2(sn1(bn1(conv1(x)))))) + shortcut(x)`` -- spikes are added, and a
  downsampling shortcut is conv1x1 + BN + neuron, so every addend comes out of a gated neuron.

Either way the channels joined by an add form one channel group (see ``prune.gates.channel_groups``).
"tdBN style" is the block layout; the BatchNorm is spikingjelly's multi-step BatchNorm2d, which
normalises over T and B together as tdBN does, without tdBN's extra alpha * V_th scaling.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer

from ..registry import register_model
from .modules import StagedSNN, Width
from .neuron import NeuronCfg, make_neuron
from .vgg import scaled


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int) -> list[tuple[str, nn.Module]]:
    return [("conv", layer.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)),
            ("bn", layer.BatchNorm2d(out_ch))]


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN + neuron layers with a residual add (``sew=False``: before the last neuron)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, neuron: NeuronCfg | dict | None, sew: bool):
        super().__init__()
        self.sew = sew
        self.conv1 = layer.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = layer.BatchNorm2d(out_ch)
        self.sn1 = make_neuron(neuron)
        self.conv2 = layer.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = layer.BatchNorm2d(out_ch)
        self.sn2 = make_neuron(neuron)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            parts = conv_bn(in_ch, out_ch, 1, stride)
            if sew:  # SEW adds spikes to spikes: the shortcut ends in its own neuron
                parts.append(("sn", make_neuron(neuron)))
            self.downsample = nn.Sequential(OrderedDict(parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.sn1(self.bn1(self.conv1(x)))))
        return self.sn2(out) + identity if self.sew else self.sn2(out + identity)


class SpikingResNet(StagedSNN):
    """Stem (3x3 conv + BN + neuron), stages of basic blocks, global average pool, linear readout."""

    def __init__(self, in_channels: int, num_classes: int, stem: int, stages: Sequence[tuple[int, int, int]],
                 neuron: NeuronCfg | dict | None = None, width: float = 1.0, sew: bool = False):
        super().__init__()
        c = scaled(stem, width)
        self.stem = nn.Sequential(OrderedDict([*conv_bn(in_channels, c, 3, 1), ("sn", make_neuron(neuron))]))
        for i, (channels, blocks, stride) in enumerate(stages, start=1):
            out = scaled(channels, width)
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(c, out, stride if b == 0 else 1, neuron, sew))
                c = out
            self.add_module(f"layer{i}", nn.Sequential(*stage))
        self._stage_names = ["stem", *(f"layer{i}" for i in range(1, len(stages) + 1)), "pool", "flatten",
                             "classifier"]
        self.pool = layer.AdaptiveAvgPool2d((1, 1))
        self.flatten = layer.Flatten(start_dim=1)
        self.classifier = layer.Linear(c, num_classes)  # registered last: the readout is never pruned
        functional.set_step_mode(self, "m")

    def stages(self) -> list[tuple[str, nn.Module]]:
        return [(name, getattr(self, name)) for name in self._stage_names]


# (stem width, [(stage width, blocks, first stride), ...]) as in the SNN literature's CIFAR variants
LAYOUTS: dict[str, tuple[int, list[tuple[int, int, int]]]] = {
    "resnet18": (64, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]),
    "resnet19": (128, [(128, 3, 1), (256, 3, 2), (512, 2, 2)]),
    "resnet20": (16, [(16, 3, 1), (32, 3, 2), (64, 3, 2)]),
}


def _resnet(layout: str, sew: bool, in_channels: int, num_classes: int, neuron: NeuronCfg | dict | None,
            width: float) -> SpikingResNet:
    stem, stages = LAYOUTS[layout]
    return SpikingResNet(in_channels, num_classes, stem, stages, neuron, width, sew)


@register_model("resnet18")
def resnet18(in_channels: int, num_classes: int, neuron: NeuronCfg = NeuronCfg(),
             width: Width = 1.0) -> SpikingResNet:
    """CIFAR ResNet-18: 3x3 stem 64, stages 64-128-256-512 x 2 blocks, strides 1/2/2/2."""
    return _resnet("resnet18", False, in_channels, num_classes, neuron, width)


@register_model("resnet19")
def resnet19(in_channels: int, num_classes: int, neuron: NeuronCfg = NeuronCfg(),
             width: Width = 1.0) -> SpikingResNet:
    """ResNet-19 (Zheng et al. 2021): stem 128, stages 128-256-512 x 3/3/2 blocks, strides 1/2/2."""
    return _resnet("resnet19", False, in_channels, num_classes, neuron, width)


@register_model("resnet20")
def resnet20(in_channels: int, num_classes: int, neuron: NeuronCfg = NeuronCfg(),
             width: Width = 1.0) -> SpikingResNet:
    """CIFAR ResNet-20: stem 16, stages 16-32-64 x 3 blocks, strides 1/2/2."""
    return _resnet("resnet20", False, in_channels, num_classes, neuron, width)


@register_model("sew_resnet18")
def sew_resnet18(in_channels: int, num_classes: int, neuron: NeuronCfg = NeuronCfg(),
                 width: Width = 1.0) -> SpikingResNet:
    """SEW-ResNet (ADD) with the ResNet-18 layout."""
    return _resnet("resnet18", True, in_channels, num_classes, neuron, width)


@register_model("sew_resnet19")
def sew_resnet19(in_channels: int, num_classes: int, neuron: NeuronCfg = NeuronCfg(),
                 width: Width = 1.0) -> SpikingResNet:
    """SEW-ResNet (ADD) with the ResNet-19 layout."""
    return _resnet("resnet19", True, in_channels, num_classes, neuron, width)


@register_model("sew_resnet20")
def sew_resnet20(in_channels: int, num_classes: int, neuron: NeuronCfg = NeuronCfg(),
                 width: Width = 1.0) -> SpikingResNet:
    """SEW-ResNet (ADD) with the ResNet-20 layout."""
    return _resnet("resnet20", True, in_channels, num_classes, neuron, width)
