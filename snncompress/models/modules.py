"""What the models share: a network described as named stages, step modes (the models train in multi-step
mode 'm'; graph tracing needs single-step mode 's'), and replacing a submodule by name."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Iterator

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from ..schema import Positive, at_most

# the registered models' width multiplier: every channel count times it (rounded, at least 1); bounded, as it
# sizes every layer
Width = Annotated[Positive, at_most(64)]


@contextmanager
def step_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Run the block with ``model`` in step mode ``mode`` ('s' or 'm') from a reset state, then reset it
    and put it back in multi-step mode (spikingjelly caches which modules to reset: invalidated too)."""
    functional.set_step_mode(model, mode)
    try:
        functional.reset_net(model)
        yield model
    finally:
        functional.reset_net(model)
        functional.set_step_mode(model, "m")
        functional.invalidate_reset_cache(model)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``model`` by ``new``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class StagedSNN(nn.Module):
    """A spiking network that describes itself as named stages: one time step through :meth:`stages` in order
    is its single-step forward (class scores before any readout over T), and its logits are those scores
    averaged over the T steps.

    What reads a network's layout (the NIR export) asks for its stages instead of attribute names; a user's
    model can take part by defining ``stages()`` the same way (the export verifies the result).
    """

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``(attribute name, module)`` of each stage, in order."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        # [T, B, classes] in multi-step mode; single-step mode (used for graph tracing) has no T axis
        return x.mean(0) if x.dim() == 3 else x
