"""Models written the way spikingjelly's tutorials write them: for multi-step input only.

The forward takes ``x_seq [T, B, C, H, W]`` and returns ``x_seq.mean(0)``: called in single-step mode
it would average over the batch. No snncompress imports: this is what a user brings.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate


class CSNN(nn.Module):
    """spikingjelly's convolutional SNN tutorial, sized for 8x8 inputs: two conv-BN-IF-pool blocks, then
    Linear-IF-Linear-IF; the output is the firing rate of the last neurons (spikes averaged over T)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 8, size: int = 8):
        super().__init__()
        self.conv_fc = nn.Sequential(
            layer.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(channels),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.MaxPool2d(2, 2),
            layer.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(channels),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.MaxPool2d(2, 2),
            layer.Flatten(),
            layer.Linear(channels * (size // 4) ** 2, channels * 4, bias=False),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.Linear(channels * 4, num_classes, bias=False),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
        )
        functional.set_step_mode(self, step_mode="m")

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self.conv_fc(x_seq).mean(0)


class MembraneCSNN(CSNN):
    """The same network with a membrane-potential readout: the last Linear's output averaged over T."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 8, size: int = 8):
        super().__init__(in_channels, num_classes, channels, size)
        del self.conv_fc[-1]

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self.conv_fc(x_seq).mean(0)


def csnn(in_channels: int, num_classes: int, channels: int = 8) -> CSNN:
    return CSNN(in_channels, num_classes, channels)


def membrane_csnn(in_channels: int, num_classes: int, channels: int = 8) -> MembraneCSNN:
    return MembraneCSNN(in_channels, num_classes, channels)
