"""Timing a call, and a network on a runtime."""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from .sessions import runtime_session


def time_call(fn: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    """Median/min/max milliseconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": float(np.median(times)), "min": float(np.min(times)), "max": float(np.max(times))}


def timer(runtime: str, model: str | os.PathLike | bytes, x: np.ndarray, threads: int | None,
          warmup: int) -> Callable[[int], dict[str, float]]:
    """An ONNX model compiled by ``runtime`` for the batch of ``x`` (its real inputs): ``timer(repeats)`` is the
    median/min/max milliseconds per call of ``repeats`` calls after ``warmup`` untimed ones. The model is
    compiled once, so it can be timed in several rounds (e.g. alternating with another one)."""
    run = runtime_session(runtime, model, threads, batch=len(x))
    return lambda repeats: time_call(lambda: run(x), warmup, repeats)
