"""The export stage: unroll the T time steps into a static ONNX graph, simplify, verify with onnxruntime."""

from __future__ import annotations

import contextlib
import copy
import tempfile
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based.base import StepModule
from spikingjelly.activation_based.neuron import BaseNode

from . import __version__
from .artifacts import atomic_path, load_checkpoint, sha256
from .checkpoint import model_from_checkpoint, recipe_of
from .data import eval_batches, graph_input, load_dataset, to_steps
from .errors import SnnCompressError, VerificationError
from .verify import TOLERANCE

ONNX_FORMAT = "snncompress.onnx/1"


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


@dataclass
class ExportResult:
    path: Path
    n_samples: int
    max_abs_diff: float  # onnxruntime vs the exported PyTorch model
    nodes: int
    order: str  # how the time steps were unrolled: step or layer
    fold_agreement: float | None = None  # with fold_bn: share of test predictions unchanged by the fold
    int8: dict | None = None  # with int8: {path, accuracy_fp32, accuracy_int8, agreement}


def quantize_int8(proto: onnx.ModelProto, out_path: Path) -> None:
    """int8 weights, activations quantised per call (onnxruntime dynamic quantisation).

    A spike tensor ({0, 1}) gets scale 1/255 and zero point 0, so spikes stay exact; the weights
    (and the analog input of the first layer) are approximated.
    """
    import logging as _logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    _logging.getLogger().setLevel(_logging.ERROR)  # the quantiser logs a pre-processing hint at WARNING
    with tempfile.TemporaryDirectory() as d, atomic_path(out_path) as tmp:
        src = Path(d) / "fp32.onnx"
        onnx.save(_unshare_gemm_weights(proto), str(src))
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)


def _unshare_gemm_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every Gemm has its own weight initializer.

    The quantiser rewrites a Gemm into a MatMul by transposing its weight in place, so a weight
    shared by the T steps of a step-unrolled readout ends up transposed twice.
    """
    proto = copy.deepcopy(proto)
    inits = {i.name: i for i in proto.graph.initializer}
    seen: set[str] = set()
    for node in proto.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.input[1] in seen:
            twin = copy.deepcopy(inits[node.input[1]])
            twin.name = f"{node.input[1]}__{node.name}"
            proto.graph.initializer.append(twin)
            node.input[1] = twin.name
        seen.add(node.input[1])
    return proto


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

    from .prune.gates import _single_step_forward

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
            _single_step_forward(model.eval(), example)
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


def unrolled_onnx(model: nn.Module, example: torch.Tensor, T: int, encoding: str = "direct", lean: bool = True,
                  order: str = "step") -> onnx.ModelProto:
    """The ONNX graph of a multi-step ``model`` with its T steps unrolled (built on a copy: ``model``
    is left as it is), unverified; :func:`export_onnx` verifies it."""
    net = copy.deepcopy(model)
    if lean:
        lean_neurons(net)
    return _to_onnx(UnrolledSNN(net, T, encoding, order).eval(), example)


def _to_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """Dynamo export (the TorchScript exporter cannot handle spikingjelly 2.0 neurons) + onnxsim."""
    import onnxsim

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
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


def export_onnx(ckpt_path: str | os.PathLike, out_path: str | os.PathLike | None = None, *, fold_bn: bool = False,
                lean: bool = True, int8: bool = False, order: str = "auto", trust_factory: bool = False) -> ExportResult:
    """Export a dense or slim checkpoint to ONNX and verify it with onnxruntime on the test set.

    onnxruntime must give the same predictions as PyTorch and max |Δlogit| ≤ 1e-4, else
    :class:`VerificationError` and nothing is written. ``fold_bn`` folds BatchNorms into their convs
    first (fewer, cheaper ops; the result reports how many test predictions the fold left unchanged).
    ``lean`` exports IF/LIF neurons as :class:`LeanNeuron` (about half the ONNX ops per step, same
    spikes); ``order`` is how the time steps are unrolled (see :class:`UnrolledSNN`): ``auto``
    takes ``step`` and falls back to ``layer`` where the step-unrolled graph fails (a model whose
    readout is not the mean over the steps). The verification always compares with the original
    spikingjelly model. ``int8`` also
    writes ``<out>.int8.onnx`` (int8 weights, see :func:`quantize_int8`) and reports its accuracy.
    ``trust_factory``: see :func:`snncompress.load_model`.
    """
    ckpt_path = Path(ckpt_path)
    out_path = Path(out_path) if out_path else ckpt_path.with_suffix(".onnx")
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, str(ckpt_path), trust_factory)
    meta = ckpt["data"]
    T, enc = meta["T"], meta["encoding"]
    recipe = recipe_of(ckpt)
    data = load_dataset(recipe.data, recipe.seed)
    fold_agreement = None
    if fold_bn:
        from .training import evaluate

        before = evaluate(model, data.x_test, data.y_test, T, enc)[2].argmax(1)
        fold_batchnorm(model, to_steps(graph_input(data.x_test[:2], T, enc), T, enc))
        after = evaluate(model, data.x_test, data.y_test, T, enc)[2].argmax(1)
        fold_agreement = float((before == after).float().mean())
    wrapper = UnrolledSNN(model, T, enc).eval()  # the reference: the model as trained
    with torch.no_grad():
        reference = torch.cat([wrapper(inp) for inp in eval_batches(data.x_test, T, enc)]).numpy()
    example = graph_input(data.x_test[:2], T, enc)
    try:
        used = "step" if order == "auto" else order
        proto, got, diff = _export_verified(model, example, reference, data.x_test, T, enc, lean, used, ckpt_path)
    except SnnCompressError:
        if order != "auto":
            raise
        # a user model whose readout is not the mean over steps cannot be unrolled step by step
        used = "layer"
        proto, got, diff = _export_verified(model, example, reference, data.x_test, T, enc, lean, used, ckpt_path)
    direct = meta["encoding"] == "direct"
    props = {"format": ONNX_FORMAT, "snncompress_version": __version__, "T": str(meta["T"]),
             "encoding": meta["encoding"],
             "input_layout": "NCHW (one image; the graph repeats it over T)" if direct
             else "NTCHW (the spike or frame sequence)",
             "input_shape": json.dumps(["batch", *([] if direct else [meta["T"]]), *meta["input_shape"]]),
             "normalisation": json.dumps({"mean": meta["mean"], "std": meta["std"], "formula": "(x - mean) / std"}),
             "classes": json.dumps(meta["classes"]), "source_checkpoint": ckpt_path.name,
             "source_sha256": sha256(ckpt_path), "source_format": ckpt["format"], "bn_folded": str(fold_bn),
             "lean_neurons": str(lean), "unroll_order": used}
    onnx.helper.set_model_props(proto, props)
    with atomic_path(out_path) as tmp:
        onnx.save(proto, str(tmp))
    quantized = None
    if int8:
        q_path = out_path.with_suffix(".int8.onnx")
        onnx.helper.set_model_props(proto, {**props, "int8_weights": "True"})
        quantize_int8(proto, q_path)
        q_logits = run_onnx(ort_session(q_path), data.x_test, T, enc)
        y = data.y_test.numpy()
        quantized = {"path": str(q_path), "accuracy_fp32": float((got.argmax(1) == y).mean()),
                     "accuracy_int8": float((q_logits.argmax(1) == y).mean()),
                     "agreement": float((q_logits.argmax(1) == got.argmax(1)).mean())}
    return ExportResult(out_path, len(got), diff, len(proto.graph.node), used, fold_agreement, quantized)


def _export_verified(model: nn.Module, example: torch.Tensor, reference: np.ndarray, x: torch.Tensor, T: int,
                     encoding: str, lean: bool, order: str, source: Path) -> tuple[onnx.ModelProto, np.ndarray, float]:
    """(ONNX model, its logits on ``x``, max |Δlogit| against ``reference``) or an error."""
    try:
        proto = unrolled_onnx(model, example, T, encoding, lean, order)
    except Exception as e:  # the exporter raises many types; report it on one line
        msg = str(e).splitlines()[0] if str(e) else ""
        raise SnnCompressError(f"{source}: ONNX export failed ({type(e).__name__}: {msg})") from e
    got = run_onnx(ort_session(proto.SerializeToString()), x, T, encoding)
    diff = float(np.abs(got - reference).max())
    same = bool((got.argmax(1) == reference.argmax(1)).all())
    if not same or diff > TOLERANCE:
        raise VerificationError(f"onnxruntime disagrees with PyTorch (max |Δlogit| {diff:.3g}, same predictions: "
                                f"{same}, unrolled by {order}); nothing written")
    return proto, got, diff


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
