"""Runtime sessions: an ONNX model (a file or its bytes) compiled for the CPU by onnxruntime or OpenVINO."""

from __future__ import annotations

import functools
import os
from importlib import metadata
from typing import Callable

import numpy as np
import onnxruntime as ort

from ..config import RUNTIMES
from ..errors import SnnCompressError, UsageError, first_line

Session = Callable[[np.ndarray], np.ndarray]  # an input batch -> the model's first output (float32)

ORT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def ort_session(path_or_bytes: str | os.PathLike | bytes, threads: int | None = None,
                level: str = "all") -> ort.InferenceSession:
    """A CPU onnxruntime session with ``threads`` intra-op threads and a graph-optimisation level."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ORT_LEVELS[level]
    if threads:
        opts.intra_op_num_threads = threads
    src = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


# the pip distribution that provides each runtime's module, and the extra that installs it
_RUNTIME_DIST = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}  # + INFERENCE_NUM_THREADS


def _import_runtime(name: str):
    """The runtime's Python module, imported on first use (OpenVINO is an optional extra); one-line errors."""
    if name not in RUNTIMES:
        raise UsageError(f"unknown runtime {name!r}; allowed: {', '.join(RUNTIMES)}")
    if name == "onnxruntime":
        return ort
    try:
        import openvino
    except ModuleNotFoundError as e:
        if e.name is not None and e.name != "openvino":  # installed, but one of its own imports is missing
            raise SnnCompressError(f"runtime openvino cannot be imported ({first_line(e)}); reinstall the "
                                   "extra: pip install 'snncompress[openvino]'") from e
        raise SnnCompressError("runtime openvino is not installed; install the extra: "
                               "pip install 'snncompress[openvino]'") from e
    except ImportError as e:  # e.g. a shared library that does not load on this machine
        raise SnnCompressError(f"runtime openvino cannot be imported ({first_line(e)}); reinstall the "
                               "extra: pip install 'snncompress[openvino]'") from e
    return openvino


def require_runtime(name: str) -> None:
    """Check that runtime ``name`` (one of :data:`~snncompress.config.RUNTIMES`) is known and installed.

    Raises :class:`~snncompress.errors.SnnCompressError` in one line otherwise (an unknown name: a usage
    error, exit code 2; a runtime that is not installed names the extra that installs it). OpenVINO is
    imported here, on the first call that asks for it, never at import time.
    """
    _import_runtime(name)


def runtime_version(name: str) -> str:
    """The installed version of runtime ``name`` (its pip distribution's, e.g. ``2026.4.1``)."""
    module = _import_runtime(name)
    try:
        return metadata.version(_RUNTIME_DIST[name])
    except metadata.PackageNotFoundError:  # a build without pip metadata (e.g. from source)
        return str(module.__version__)


def runtime_options(name: str, threads: int | None = None) -> dict:
    """What :func:`runtime_session` configures for runtime ``name`` (for reports such as bench.json)."""
    if name == "openvino":
        return {"device": "CPU", **OPENVINO_CONFIG, "INFERENCE_NUM_THREADS": threads or "default"}
    return {"execution_provider": "CPUExecutionProvider", "graph_optimization": "ORT_ENABLE_ALL",
            "intra_op_num_threads": threads or "default"}


@functools.cache
def _openvino_core(module):
    """One OpenVINO Core per process: creating a second Core in a process can segfault (a pytest worker
    died this way; ultralytics/ultralytics#25864). Sessions pass their settings to ``compile_model``,
    never to the Core, so sharing it shares no settings."""
    return module.Core()


def runtime_session(name: str, model: str | os.PathLike | bytes, threads: int | None = None,
                    batch: int | None = None) -> Session:
    """An ONNX model (a file or its bytes) compiled for the CPU by runtime ``name``: call it with an input
    batch, get the model's first output (float32 numpy).

    ``threads``: intra-op threads (None: the runtime's default). ``batch``: OpenVINO compiles the model
    with that static batch size (static shapes run faster; the session then accepts only that batch),
    None keeps the batch dynamic; onnxruntime always runs the graph's dynamic batch and ignores it.
    OpenVINO: ``compile_model(model, "CPU", {INFERENCE_NUM_THREADS, PERFORMANCE_HINT: LATENCY,
    INFERENCE_PRECISION_HINT: f32})``; onnxruntime: :func:`ort_session` with every graph optimisation.
    A session holds one inference request: call it from one thread at a time.
    """
    module = _import_runtime(name)
    if name == "onnxruntime":
        sess = ort_session(model, threads)
        feed, first = sess.get_inputs()[0].name, [sess.get_outputs()[0].name]
        return lambda x: sess.run(first, {feed: np.ascontiguousarray(x, dtype=np.float32)})[0]
    core = _openvino_core(module)
    graph = core.read_model(model, b"") if isinstance(model, bytes) else core.read_model(str(model))
    if batch is not None:
        shape = graph.input(0).get_partial_shape()
        shape[0] = batch
        graph.reshape({graph.input(0): shape})
    config = dict(OPENVINO_CONFIG, **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {}))
    compiled = core.compile_model(graph, "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        # share_inputs: the request reads the caller's array in place, as onnxruntime does; outputs are copies
        return request.infer({0: np.ascontiguousarray(x, dtype=np.float32)}, share_inputs=True)[0]

    return run
