"""Input encoders: turn a static image batch [B, C, H, W] into a spike-time sequence [T, B, C, H, W]."""

from __future__ import annotations

import torch


def encode(x: torch.Tensor, T: int, encoding: str = "direct") -> torch.Tensor:
    """Direct encoding: the (analog) image is presented at every one of the T steps."""
    if encoding != "direct":
        raise ValueError(f"unknown encoding {encoding!r}; allowed: direct")
    return x.unsqueeze(0).repeat(T, *([1] * x.dim()))
