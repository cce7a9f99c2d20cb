"""The export stage: unroll the T time steps into a static ONNX graph, simplify, verify with onnxruntime."""

from __future__ import annotations

import contextlib
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
from spikingjelly.activation_based import functional

from . import __version__
from .artifacts import atomic_path, load_checkpoint, sha256
from .checkpoint import model_from_checkpoint, recipe_of
from .data import eval_batches, graph_input, load_dataset, to_steps
from .errors import SnnCompressError, VerificationError
from .verify import TOLERANCE

ONNX_FORMAT = "snncompress.onnx/1"


class UnrolledSNN(nn.Module):
    """Model input -> logits in one graph: resets the neurons, lays out the T steps, runs them all.

    The input is the image ``[B, C, H, W]`` for direct encoding (repeated over T inside the graph),
    and the spike / frame sequence ``[B, T, C, H, W]`` for Poisson and frame inputs.
    """

    def __init__(self, net: nn.Module, T: int, encoding: str = "direct"):
        super().__init__()
        self.net, self.T, self.encoding = net, T, encoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self.net)
        return self.net(to_steps(x, self.T, self.encoding))


@dataclass
class ExportResult:
    path: Path
    n_samples: int
    max_abs_diff: float
    nodes: int


def ort_session(path_or_bytes: str | os.PathLike | bytes, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    src = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, x: torch.Tensor, T: int, encoding: str) -> np.ndarray:
    """Logits of an exported model over dataset samples ``x`` (the same inputs :func:`eval_batches` gives PyTorch)."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: inp.numpy()})[0] for inp in eval_batches(x, T, encoding)])


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


def export_onnx(ckpt_path: str | os.PathLike, out_path: str | os.PathLike | None = None,
                trust_factory: bool = False) -> ExportResult:
    """Export a dense or slim checkpoint to ONNX and verify it with onnxruntime on the test set.

    onnxruntime must give the same predictions as PyTorch and max |Δlogit| ≤ 1e-4, else
    :class:`VerificationError` and nothing is written. ``trust_factory``: see :func:`snncompress.load_model`.
    """
    ckpt_path = Path(ckpt_path)
    out_path = Path(out_path) if out_path else ckpt_path.with_suffix(".onnx")
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, str(ckpt_path), trust_factory)
    meta = ckpt["data"]
    wrapper = UnrolledSNN(model, meta["T"], meta["encoding"]).eval()
    recipe = recipe_of(ckpt)
    data = load_dataset(recipe.data, recipe.seed)
    try:
        proto = _to_onnx(wrapper, graph_input(data.x_test[:2], meta["T"], meta["encoding"]))
    except Exception as e:  # the exporter raises many types; report it on one line
        raise SnnCompressError(f"{ckpt_path}: ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    direct = meta["encoding"] == "direct"
    props = {"format": ONNX_FORMAT, "snncompress_version": __version__, "T": str(meta["T"]),
             "encoding": meta["encoding"],
             "input_layout": "NCHW (one image; the graph repeats it over T)" if direct
             else "NTCHW (the spike or frame sequence)",
             "input_shape": json.dumps(["batch", *([] if direct else [meta["T"]]), *meta["input_shape"]]),
             "normalisation": json.dumps({"mean": meta["mean"], "std": meta["std"], "formula": "(x - mean) / std"}),
             "classes": json.dumps(meta["classes"]), "source_checkpoint": ckpt_path.name,
             "source_sha256": sha256(ckpt_path), "source_format": ckpt["format"]}
    onnx.helper.set_model_props(proto, props)

    T, enc = meta["T"], meta["encoding"]
    with torch.no_grad():
        reference = torch.cat([wrapper(inp) for inp in eval_batches(data.x_test, T, enc)]).numpy()
    got = run_onnx(ort_session(proto.SerializeToString()), data.x_test, T, enc)
    diff = float(np.abs(got - reference).max())
    same = bool((got.argmax(1) == reference.argmax(1)).all())
    if not same or diff > TOLERANCE:
        raise VerificationError(f"onnxruntime disagrees with PyTorch (max |Δlogit| {diff:.3g}, "
                                f"same predictions: {same}); nothing written")
    with atomic_path(out_path) as tmp:
        onnx.save(proto, str(tmp))
    return ExportResult(out_path, len(got), diff, len(proto.graph.node))


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
