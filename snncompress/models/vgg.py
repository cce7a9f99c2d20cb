"""Spiking VGG: [Conv -> BN -> spiking neuron] blocks with 2x2 pooling (max or average), then a linear readout."""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Any, Literal, Sequence

import torch.nn as nn
from pydantic import AfterValidator, PlainValidator
from spikingjelly.activation_based import functional, layer

from ..schema import PositiveInt, at_most
from ..registry import register_model
from .modules import StagedSNN, Width
from .neuron import NeuronCfg, make_neuron

POOLS = ("max", "avg")  # "avg": what NIR and neuromorphic chips accept (they have no max pooling)
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


MAX_CHANNELS = 16_384  # a conv's width (times model.width): a bound that stops runaway allocations
MAX_LAYERS = 512


def _layer(v: Any) -> int | str:
    if v == "M" or (isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_CHANNELS):
        return v
    raise ValueError(f"must be a conv width (an int in [1, {MAX_CHANNELS:,}]) or 'M' (2x2 pool, see model.pool)")


def _has_a_conv(layers: list) -> list:
    if not any(isinstance(v, int) for v in layers):
        raise ValueError("needs at least one conv width (an int)")
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"at most {MAX_LAYERS} entries")
    return layers


Layers = Annotated[list[Annotated[int | str, PlainValidator(_layer)]], AfterValidator(_has_a_conv)]
Pool = Literal["max", "avg"]


def scaled(channels: int, width: float) -> int:
    """A channel count times the width multiplier (at least 1)."""
    return max(1, round(channels * width))


def conv_block(in_ch: int, out_ch: int, neuron: NeuronCfg | dict | None) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=layer.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        bn=layer.BatchNorm2d(out_ch),
        spike=make_neuron(neuron),
    ))


class SpikingVGG(StagedSNN):
    """Input ``[T, B, C, H, W]``; output logits ``[B, classes]`` (the readout averaged over T)."""

    def __init__(self, in_channels: int, num_classes: int, layers: Sequence[int | str],
                 neuron: NeuronCfg | dict | None = None, width: float = 1.0, readout_pool: int = 1, pool: str = "max"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; allowed: {', '.join(POOLS)}")
        blocks, c, n_conv, n_pool = OrderedDict(), in_channels, 0, 0
        for v in layers:
            if v == "M":
                n_pool += 1
                blocks[f"pool{n_pool}"] = layer.MaxPool2d(2, 2) if pool == "max" else layer.AvgPool2d(2, 2)
            else:
                n_conv += 1
                blocks[f"conv{n_conv}"] = conv_block(c, scaled(int(v), width), neuron)
                c = scaled(int(v), width)
        self.features = nn.Sequential(blocks)
        # adaptive average pooling keeps the readout independent of the input size; a p x p grid
        # (readout_pool > 1) keeps coarse spatial layout, which larger inputs such as MNIST need
        self.pool = layer.AdaptiveAvgPool2d((readout_pool, readout_pool))
        self.flatten = layer.Flatten(start_dim=1)
        self.classifier = layer.Linear(c * readout_pool * readout_pool, num_classes)
        functional.set_step_mode(self, "m")

    def stages(self) -> list[tuple[str, nn.Module]]:
        return [("features", self.features), ("pool", self.pool), ("flatten", self.flatten),
                ("classifier", self.classifier)]


@register_model("vgg")
def vgg(in_channels: int, num_classes: int, layers: Layers = (64, 128, "M", 256, "M", 256),
        neuron: NeuronCfg = NeuronCfg(), width: Width = 1.0, readout_pool: Annotated[PositiveInt, at_most(64)] = 1,
        pool: Pool = "max") -> SpikingVGG:
    """Spiking VGG with configurable widths (``"M"`` = 2x2 pool, ``pool``: max or avg, "avg" for NIR: chips have
    no max pooling), each scaled by ``width``; the readout averages the last feature map to ``readout_pool`` x
    ``readout_pool`` (1: global pooling; MNIST-sized inputs need 3)."""
    return SpikingVGG(in_channels, num_classes, layers, neuron, width, readout_pool, pool)


@register_model("vgg16")
def vgg16(in_channels: int, num_classes: int, neuron: NeuronCfg = NeuronCfg(), width: Width = 1.0,
          pool: Pool = "max") -> SpikingVGG:
    """VGG-16's 13 convs (five 2x2 pools, max or avg: inputs need H, W >= 32)."""
    return SpikingVGG(in_channels, num_classes, VGG16, neuron, width, pool=pool)
