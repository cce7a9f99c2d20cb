"""Standard CIFAR augmentation in plain torch: random crop with zero padding, horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random ``pad``-padded crop and 50 % horizontal flip of ``[B, C, H, W]`` images.

    Draws from ``generator`` (default: torch's global RNG, which checkpoints save, so resumes stay exact).
    """
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    flip = torch.rand(B, generator=generator) < 0.5
    rows = (top[:, None] + torch.arange(H))[:, None, :, None]
    cols = left[:, None] + torch.arange(W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]
