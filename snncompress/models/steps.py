"""Step modes: the models train in multi-step mode ('m'); graph tracing needs single-step mode ('s')."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.nn as nn
from spikingjelly.activation_based import functional


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
