"""Input encoders: what the network sees at each of its T steps.

``graph_input`` is what a deployed (ONNX) model takes: the image ``[B, C, H, W]`` for direct
encoding (the graph repeats it), and the spike/frame sequence ``[B, T, C, H, W]`` otherwise (Poisson
spikes are drawn outside the graph so that runtimes can be compared on the same spikes).
``to_steps`` turns a graph input into the network's multi-step input ``[T, B, C, H, W]``.
"""

from __future__ import annotations

import torch

ENCODINGS = ("direct", "poisson", "frames")


def graph_input(x: torch.Tensor, T: int, encoding: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dataset samples -> model input. Poisson draws from ``generator`` (default: the global RNG)."""
    if encoding == "direct":
        return x
    if encoding == "poisson":  # x holds intensities in [0, 1]; a pixel fires with that probability per step
        # drawn by the CPU generator whatever x's device: the same spikes on every device, resumes exact
        u = torch.rand((x.shape[0], T, *x.shape[1:]), generator=generator, dtype=x.dtype).to(x.device)
        return (u < x.unsqueeze(1)).to(x.dtype)
    if encoding == "frames":  # already [B, T, C, H, W]
        return x
    raise ValueError(f"unknown encoding {encoding!r}; allowed: {', '.join(ENCODINGS)}")


def to_steps(inp: torch.Tensor, T: int, encoding: str) -> torch.Tensor:
    """Model input -> ``[T, B, C, H, W]``."""
    if encoding == "direct":
        return inp.unsqueeze(0).repeat(T, *([1] * inp.dim()))
    return inp.transpose(0, 1).contiguous()


def encode(x: torch.Tensor, T: int, encoding: str = "direct", generator: torch.Generator | None = None) -> torch.Tensor:
    """Dataset samples -> the network's multi-step input ``[T, B, C, H, W]``."""
    return to_steps(graph_input(x, T, encoding, generator), T, encoding)


# evaluation batch: 64 images x T steps keeps VGG-16's activations small (peak RSS of bench 4.5 ->
# 1.6 GB, and faster: cache-sized tensors) without costing throughput on CPU
EVAL_BATCH = 64


def eval_batches(x: torch.Tensor, T: int, encoding: str, batch_size: int = EVAL_BATCH, seed: int = 0):
    """Model inputs over a dataset, batch by batch, deterministic (Poisson spikes from a fixed seed),
    so every model and runtime compared on the same data sees exactly the same spikes."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(x), batch_size):
        yield graph_input(x[i:i + batch_size], T, encoding, gen)
