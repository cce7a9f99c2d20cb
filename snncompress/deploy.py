"""How a trained spiking model runs where it is deployed: its T time steps unrolled into one static graph
(lean neuron arithmetic, optional BatchNorm folding), that graph in ONNX, and the runtimes that run it
(onnxruntime; OpenVINO, an optional extra imported only when asked for) and time it.

The export stage writes and verifies these graphs; the bench stage times them; benchmarks/speedup.py
measures exactly the graph that export writes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based.base import StepModule
from spikingjelly.activation_based.neuron import BaseNode

from .artifacts import sha256
from .config import RUNTIMES
from .data import eval_batches, to_steps
from .errors import SnnCompressError, UsageError, first_line
from .prune.gates import single_step_forward

ONNX_FORMAT = "snncompress.onnx/1"


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of the named loggers (the root logger for ``""``) for the block, then restore them."""
    loggers = [logging.getLogger(n or None) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


UNROLL_ORDERS = ("step", "layer")


class UnrolledSNN(nn.Module):
    """Model input -> logits in one graph: resets the neurons, lays out the T steps, runs them all.

    The input is the image ``[B, C, H, W]`` for direct encoding (repeated over T inside the graph),
    and the spike / frame sequence ``[B, T, C, H, W]`` for Poisson and frame inputs.

    ``order="layer"`` runs the model as trained, in multi-step mode: each layer over all T steps,
    then the next. ``order="step"`` switches ``net`` to single-step mode and runs the whole network
    once per step (the readout averaged over the steps, as the models do): no per-layer split and
    concatenation of the steps, and a working set of one step, which measured ~25 % faster in
    onnxruntime at batch 32 (see benchmarks/speedup.py). Both compute the same numbers.
    """

    def __init__(self, net: nn.Module, T: int, encoding: str = "direct", order: str = "layer"):
        super().__init__()
        if order not in UNROLL_ORDERS:
            raise ValueError(f"unknown unroll order {order!r}; allowed: {', '.join(UNROLL_ORDERS)}")
        self.net, self.T, self.encoding, self.order = net, T, encoding, order
        if order == "step":
            functional.set_step_mode(net, "s")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self.net)
        if self.order == "layer":
            return self.net(to_steps(x, self.T, self.encoding))
        for m in self.net.modules():
            if isinstance(m, LeanNeuron):
                m.v = None
        steps = [x] * self.T if self.encoding == "direct" else x.unbind(1)
        return torch.stack([self.net(x_t) for x_t in steps]).mean(0)


class LeanNeuron(nn.Module, StepModule):
    """An IF/LIF neuron with as few ONNX ops per step as spikingjelly's arithmetic allows.

    Per step: charge (3 ops for LIF, 1 for IF), compare and cast, and a reset in two cheap
    arithmetic ops (onnxruntime's ``Where`` is about ten times slower per element than a ``Mul``).
    It performs the same float operations in the same order as spikingjelly's CPU kernel, so spikes
    are bitwise identical (a reset to 0 can differ only in the sign of zero, which no later
    comparison sees); the export verifies this against the original model. A gate attached to the
    neuron (dense-shaped models) is applied first. Multi-step calls start from rest; single-step
    calls carry the membrane potential ``v`` until it is set back to ``None``.
    """

    def __init__(self, node: BaseNode):
        super().__init__()
        self.lif = isinstance(node, neuron.LIFNode)
        self.tau = float(node.tau) if self.lif else 1.0
        self.decay_input = bool(getattr(node, "decay_input", True))
        self.v_threshold, self.v_reset = float(node.v_threshold), node.v_reset
        self.gate = node.gate if hasattr(node, "gate") else None
        self.step_mode, self.v = node.step_mode, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            x = self.gate(x)
        if self.step_mode == "s":
            s, self.v = self._step(x, self.v)
            return s
        v, spikes = None, []
        for x_t in x.split(1):  # steps keep their T axis of 1: no Squeeze/Unsqueeze nodes
            s, v = self._step(x_t, v)
            spikes.append(s)
        return torch.cat(spikes)

    def _step(self, x: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(spikes, membrane potential after the reset) of one step; ``v`` None means at rest."""
        r = 0.0 if self.v_reset is None else float(self.v_reset)
        if v is None and r == 0.0:  # v starts at the rest potential 0: v + (x - v)/tau == x/tau
            h = x / self.tau if self.lif and self.decay_input else x
        else:
            v = torch.full_like(x, r) if v is None else v
            if not self.lif:
                h = v + x
            elif self.decay_input:
                h = v + (x - (v if r == 0.0 else v - r)) / self.tau
            else:
                h = v - (v if r == 0.0 else v - r) / self.tau + x
        s = (h >= self.v_threshold).to(h.dtype)
        # onnxruntime's Where costs about ten Muls per element: reset with arithmetic where it is
        # exact (h - h * s is h or exactly 0; the soft reset is spikingjelly's own formula)
        if self.v_reset is None:
            return s, h - s * self.v_threshold
        if r == 0.0:
            return s, h - h * s
        return s, torch.where(h >= self.v_threshold, r, h)


@torch.no_grad()
def steps_unroll_exactly(model: nn.Module, inputs: torch.Tensor, T: int, encoding: str) -> bool:
    """Whether ``model`` computes the same logits run step by step as run layer by layer (PyTorch, on a copy).

    Step order runs the network once per step and averages the readout over the steps, as the built-in
    models do; a model whose forward fails in single-step mode, or whose readout is not that mean (e.g.
    a sum over steps), must be unrolled layer by layer.
    """
    net = copy.deepcopy(model).eval()
    layer = UnrolledSNN(net, T, encoding, "layer")(inputs)
    try:
        step = UnrolledSNN(net, T, encoding, "step")(inputs)
    except Exception:  # a forward written for multi-step input only: it cannot run step by step
        return False
    finally:
        functional.set_step_mode(net, "m")
    return step.shape == layer.shape and bool(torch.allclose(step, layer, rtol=1e-4, atol=1e-5))


def lean_neurons(model: nn.Module) -> int:
    """Replace every plain IF/LIF neuron by a :class:`LeanNeuron` (in place); returns how many."""
    nodes = [(n, m) for n, m in model.named_modules() if type(m) in (neuron.IFNode, neuron.LIFNode)]
    for name, node in nodes:
        _set_module(model, name, LeanNeuron(node))
    return len(nodes)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every BatchNorm that directly consumes a conv's output into that conv (in place, eval mode).

    The pairs are found by tracing one single-step forward. Returns the number of folds. Folding
    changes float rounding, so a membrane potential sitting exactly at the threshold can flip a spike:
    check the folded model's predictions (``export_onnx(fold_bn=True)`` reports the agreement).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # tensors kept alive so that ids are not reused
    pairs: list[tuple[str, str]] = []
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: outputs.__setitem__(id(out), (n, out)))
               for n, m in convs.items()]
    handles += [m.register_forward_pre_hook(lambda mod, a, n=n: pairs.append((outputs[id(a[0])][0], n))
                                            if id(a[0]) in outputs else None) for n, m in bns.items()]
    try:
        with torch.no_grad():
            single_step_forward(model.eval(), example)
    finally:
        for h in handles:
            h.remove()
    for conv_name, bn_name in pairs:
        _set_module(model, conv_name, fuse_conv_bn_eval(convs[conv_name], bns[bn_name]))
        _set_module(model, bn_name, nn.Identity())
    return len(pairs)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


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


def run_onnx(sess: ort.InferenceSession, x: torch.Tensor, T: int, encoding: str) -> np.ndarray:
    """Logits of an exported model over dataset samples ``x`` (the same inputs :func:`eval_batches` gives PyTorch)."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: inp.numpy()})[0] for inp in eval_batches(x, T, encoding)])


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


def runtime_session(name: str, model: str | os.PathLike | bytes, threads: int | None = None,
                    batch: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
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
    core = module.Core()  # a Core of its own: properties set here never reach another session
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


def run_session(session: Callable[[np.ndarray], np.ndarray], x: torch.Tensor, T: int, encoding: str) -> np.ndarray:
    """Logits of a :func:`runtime_session` over dataset samples ``x`` (the inputs :func:`eval_batches` gives PyTorch)."""
    return np.concatenate([session(inp.numpy()) for inp in eval_batches(x, T, encoding)])


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


def unrolled_onnx(model: nn.Module, example: torch.Tensor, T: int, encoding: str = "direct", lean: bool = True,
                  order: str = "step") -> onnx.ModelProto:
    """The ONNX graph of a multi-step ``model`` with its T steps unrolled (built on a copy: ``model``
    is left as it is), unverified; :func:`export_onnx` verifies it."""
    net = copy.deepcopy(model)
    if lean:
        lean_neurons(net)
    return to_onnx(UnrolledSNN(net, T, encoding, order).eval(), example)


def to_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """Dynamo export (the TorchScript exporter cannot handle spikingjelly 2.0 neurons) + onnxsim."""
    import onnxsim

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_loggers("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes={"x": {0: batch}},
                                    input_names=["input"], output_names=["logits"], verbose=False)
    proto = program.model_proto
    # onnxsim's graph-optimisation passes reorder float arithmetic in the neuron update; a membrane
    # potential sitting at the threshold then flips a spike (measured: |Δlogit| 0.57 on digits).
    # Constant folding and shape inference alone keep onnxruntime bit-exact with PyTorch.
    simplified, ok = onnxsim.simplify(proto, perform_optimization=False)
    if ok:
        proto = simplified
    onnx.checker.check_model(proto)
    return proto


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata snncompress wrote into an ONNX file; refuses files it did not write."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise SnnCompressError(f"{path}: not a readable ONNX file ({type(e).__name__})") from e
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("format") != ONNX_FORMAT:
        raise SnnCompressError(f"{path}: not an ONNX model written by snncompress (no '{ONNX_FORMAT}' metadata)")
    return props


def exported_from(onnx_path: Path, ckpt_path: Path) -> bool:
    """Whether ``onnx_path`` exists and was exported from exactly ``ckpt_path``."""
    try:
        return onnx_path.exists() and read_onnx_metadata(onnx_path).get("source_sha256") == sha256(ckpt_path)
    except SnnCompressError:
        return False
