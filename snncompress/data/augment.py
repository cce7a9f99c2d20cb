"""Standard CIFAR augmentation in plain torch, on the training device: a random crop with zero padding and
a horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random ``pad``-padded crop and 50 % horizontal flip of ``[B, C, H, W]`` images.

    Draws from ``generator`` (default: torch's global CPU RNG, which checkpoints save, so resumes stay exact;
    the draws are the same whatever device ``x`` is on). The crop itself runs on ``x``'s device.
    """
    B, C, H, W = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(dev, non_blocking=True)
    left = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(dev, non_blocking=True)
    flip = (torch.rand(B, generator=generator) < 0.5).to(dev, non_blocking=True)
    rows = (top[:, None] + torch.arange(H, device=dev))[:, None, :, None]
    cols = left[:, None] + torch.arange(W, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(B, device=dev)[:, None, None, None], torch.arange(C, device=dev)[None, :, None, None],
                  rows, cols]
