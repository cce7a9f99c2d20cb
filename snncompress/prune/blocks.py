"""The channel block of this CPU: how many output channels a deployment runtime computes at once."""

from __future__ import annotations

import torch


def channel_block() -> int:
    """Output channels per SIMD block of onnxruntime's and OpenVINO's blocked conv layouts on this CPU:
    16 with AVX-512, 8 with AVX2 (NCHWc / nChw8c), 1 elsewhere (no blocked layout to fill).

    Detected from the instruction set PyTorch dispatches to on this machine (``torch.backends.cpu``),
    which both runtimes choose their blocks by as well.
    """
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return 16 if cap.startswith("AVX512") else 8 if cap.startswith("AVX2") else 1


def resolve_round_to(round_to: int | str) -> int:
    """``prune.round_to`` as a number of channels (``auto``: :func:`channel_block`)."""
    return channel_block() if round_to == "auto" else int(round_to)


def ceil_to(n: int, block: int, cap: int) -> int:
    """``n`` rounded up to a multiple of ``block``, at most ``cap`` (0 stays 0)."""
    return min(cap, -(-n // block) * block) if n else 0
