"""The bench stage: measure dense-shaped vs slim (and baseline) models.

Params, dense MACs, SOPs (spikingjelly's op_counter, on the test set), firing rate, an energy estimate,
accuracy in PyTorch and onnxruntime, and onnxruntime latency at batch 1 and 32.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.neuron import BaseNode
from spikingjelly.activation_based.op_counter import DispatchCounterMode, MACCounter, SynOpCounter
from spikingjelly.activation_based.op_counter.ac import _spike_nnz
from spikingjelly.activation_based.op_counter.mac import _is_spike

from . import __version__
from .artifacts import load_checkpoint, sha256, write_json, write_text
from .checkpoint import model_from_checkpoint, recipe_of
from .data import encode, eval_batches, load_dataset, to_steps
from .errors import SnnCompressError
from .export import export_onnx, ort_session, read_onnx_metadata, run_onnx
from .prune.gates import kept_fraction
from .slimming import count_macs, count_params
from .training import evaluate

PJ_PER_MAC = 4.6  # 45 nm, Horowitz ISSCC 2014
PJ_PER_AC = 0.9
BATCHES = (1, 32)
BENCH_FORMAT = "snncompress.bench/1"


@dataclass
class BenchSettings:
    threads: int = os.cpu_count() or 1
    warmup: int = 5
    repeats: int = 30


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    return (t != 0).double()


def _uncounted(fn, *args):
    """Run an aten op outside the counting dispatch mode (as spikingjelly's own rules do)."""
    with torch.no_grad(), torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Python)):
        return fn(*args)


def _nz_convolution(args, kwargs, out) -> int:
    x, w, _, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    if _spike_nnz(x) is None:
        return 0
    # every output element sums the input spikes under the non-zero taps: the accumulations actually made
    res = _uncounted(torch.ops.aten.convolution.default, x.double(), _nonzero(w), None, stride, padding, dilation,
                     transposed, output_padding, groups)
    return int(res.sum().item())


def _nz_mm(x: torch.Tensor, y: torch.Tensor) -> int:
    if _spike_nnz(x) is not None:
        return int(_uncounted(torch.ops.aten.mm.default, x.double(), _nonzero(y)).sum().item())
    if _spike_nnz(y) is not None:
        return int(_uncounted(torch.ops.aten.mm.default, _nonzero(x), y.double()).sum().item())
    return 0


class NonzeroSynOpCounter(SynOpCounter):
    """spikingjelly's :class:`SynOpCounter` restricted to non-zero weights (unstructured sparsity).

    For a spike input, SynOpCounter counts every weight a spike fans out to (border-aware); this counter
    counts only the non-zero ones: ``sum(conv(spikes, W != 0))`` for convolutions, ``sum(spikes @ (W != 0))``
    for ``mm`` / ``addmm`` (linear layers); other ops keep SynOpCounter's rules. With no zero weight the two
    agree exactly.
    """

    def __init__(self, extra_ignore_modules: list[type[nn.Module]] | None = None):
        super().__init__(extra_ignore_modules=extra_ignore_modules)
        self.rules.update({
            torch.ops.aten.convolution.default: _nz_convolution,
            torch.ops.aten.mm.default: lambda args, kwargs, out: _nz_mm(args[0], args[1]),
            torch.ops.aten.addmm.default: lambda args, kwargs, out: _nz_mm(args[1], args[2]),
        })


def _nz_mac_convolution(args, kwargs, out) -> int:
    x, w, transposed = args[0], args[1], args[6]
    if _is_spike(x) or _is_spike(w):
        return 0
    return int(w.count_nonzero()) * math.prod(x.shape[2:] if transposed else out.shape[2:]) * x.shape[0]


def _nz_mac_mm(x: torch.Tensor, w: torch.Tensor) -> int:
    return 0 if _is_spike(x) or _is_spike(w) else int(w.count_nonzero()) * x.shape[0]


class NonzeroMACCounter(MACCounter):
    """spikingjelly's :class:`MACCounter` (MACs on analog, non-spike inputs) restricted to non-zero
    weights: a conv makes ``nonzero(W) x output positions`` multiply-accumulates (border taps counted as
    MACCounter counts them), a linear layer ``nonzero(W) x rows``. With no zero weight the two agree."""

    def __init__(self, extra_ignore_modules: list[type[nn.Module]] | None = None):
        super().__init__(extra_ignore_modules=extra_ignore_modules)
        self.rules.update({
            torch.ops.aten.convolution.default: _nz_mac_convolution,
            torch.ops.aten.mm.default: lambda args, kwargs, out: _nz_mac_mm(args[0], args[1]),
            torch.ops.aten.addmm.default: lambda args, kwargs, out: _nz_mac_mm(args[1], args[2]),
        })


def weight_counts(model: nn.Module) -> dict:
    """Conv + linear weights: total, non-zero, and ``connectivity`` = non-zero / total."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in ws)
    nonzero = sum(int(w.count_nonzero()) for w in ws)
    return {"weights": total, "nonzero_weights": nonzero, "connectivity": nonzero / max(1, total)}


@torch.no_grad()
def spike_stats(model: nn.Module, x: torch.Tensor, T: int, encoding: str, batch_size: int = 32) -> dict:
    """SOPs (all weights, and through non-zero weights only) and analog MACs per inference (op_counter),
    and firing rates, over samples ``x``. Also per layer: SOPs of every conv/linear layer and the
    firing rate of every spiking neuron.
    """
    synops, macs = SynOpCounter(), MACCounter(extra_ignore_modules=[nn.BatchNorm2d])  # BN folds at deployment
    effective, macs_nz = NonzeroSynOpCounter(), NonzeroMACCounter(extra_ignore_modules=[nn.BatchNorm2d])
    fired: dict[str, float] = {}
    seen: dict[str, int] = {}

    def hook(name):
        def fn(module, args, out):
            fired[name] = fired.get(name, 0.0) + float(out.sum())
            seen[name] = seen.get(name, 0) + out.numel()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, BaseNode)]
    model.eval()
    try:
        for inp in eval_batches(x, T, encoding, batch_size):
            with DispatchCounterMode([synops, macs, effective, macs_nz]):
                model(to_steps(inp, T, encoding))
            functional.reset_net(model)
    finally:
        for h in handles:
            h.remove()
    n = len(x)
    sops, analog, sops_nz = synops.get_total() / n, macs.get_total() / n, effective.get_total() / n
    analog_nz = macs_nz.get_total() / n
    # op_counter scopes are "<RootClass>.<module name>"
    root = type(model).__name__ + "."
    counts = {k.removeprefix(root): sum(v.values()) for k, v in synops.get_counts().items()}
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return {"sops": sops, "sops_effective": sops_nz, "macs_analog": analog, "macs_analog_effective": analog_nz,
            "firing_rate": sum(fired.values()) / max(1, sum(seen.values())),
            "energy_uj": (analog * PJ_PER_MAC + sops * PJ_PER_AC) * 1e-6,
            "energy_uj_effective": (analog_nz * PJ_PER_MAC + sops_nz * PJ_PER_AC) * 1e-6,
            "per_layer": {"sops": {name: counts.get(name, 0) / n for name in layers},
                          "firing_rate": {name: fired[name] / max(1, seen[name]) for name in fired}}}


def onnx_latency(path: Path, x: np.ndarray, settings: BenchSettings) -> dict[str, dict[str, float]]:
    """Median/min/max milliseconds per call of an ONNX model at each batch size in ``BATCHES``.

    ``x`` holds real model inputs (test samples, encoded), repeated to fill a batch if needed.
    """
    sess = ort_session(path, settings.threads)
    name = sess.get_inputs()[0].name
    out = {}
    for b in BATCHES:
        xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))  # real test images, repeated if needed
        out[str(b)] = time_call(lambda: sess.run(None, {name: xb}), settings.warmup, settings.repeats)
    return out


def time_call(fn, warmup: int, repeats: int) -> dict[str, float]:
    """Median/min/max milliseconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": float(np.median(times)), "min": float(np.min(times)), "max": float(np.max(times))}


def _onnx_for(ckpt_path: Path, onnx_path: Path, trust_factory: bool = False) -> Path:
    """Reuse ``onnx_path`` if it was exported from exactly this checkpoint, else export (and verify) it."""
    if onnx_path.exists():
        try:
            if read_onnx_metadata(onnx_path).get("source_sha256") == sha256(ckpt_path):
                return onnx_path
        except SnnCompressError:
            pass
    return export_onnx(ckpt_path, onnx_path, trust_factory=trust_factory).path


def bench_model(ckpt_path: Path, onnx_path: Path, settings: BenchSettings, trust_factory: bool = False) -> dict:
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, str(ckpt_path), trust_factory)
    recipe = recipe_of(ckpt)
    data = load_dataset(recipe.data, recipe.seed)
    T, enc = ckpt["data"]["T"], ckpt["data"]["encoding"]
    onnx_path = _onnx_for(ckpt_path, onnx_path, trust_factory)

    _, accuracy, _ = evaluate(model, data.x_test, data.y_test, T, enc)
    onnx_logits = run_onnx(ort_session(onnx_path, settings.threads), data.x_test, T, enc)
    masks = ckpt["masks"]
    kept = kept_fraction(masks)
    return {
        "checkpoint": str(ckpt_path), "onnx": str(onnx_path),
        "params": count_params(model),
        **weight_counts(model),
        "macs": count_macs(model, encode(data.x_test[:1], T, enc)),
        **spike_stats(model, data.x_test, T, enc),
        "accuracy": accuracy,
        "accuracy_onnx": float((torch.from_numpy(onnx_logits).argmax(1) == data.y_test).float().mean()),
        "kept_channels": kept,
        "kept_per_group": {g: int(torch.as_tensor(m).sum()) for g, m in masks.items()},
        "group_sizes": {g: len(m) for g, m in masks.items()},
        "latency_ms": onnx_latency(onnx_path, next(eval_batches(data.x_test, T, enc, batch_size=max(BATCHES))).numpy(),
                                   settings),
    }


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "snncompress": __version__}


def bench(dense: str | os.PathLike, slim: str | os.PathLike, out_dir: str | os.PathLike,
          baseline: str | os.PathLike | None = None, settings: BenchSettings | None = None,
          trust_factory: bool = False) -> dict:
    """Benchmark the dense-shaped masked checkpoint against its slim version (and an optional dense
    baseline); write ``bench.json`` and ``report.md`` into ``out_dir`` and return the report dict.
    ``trust_factory``: see :func:`snncompress.load_model`."""
    settings = settings or BenchSettings()
    out_dir = Path(out_dir)
    paths = {"dense": Path(dense), "slim": Path(slim)}
    if baseline:
        paths["baseline"] = Path(baseline)
    onnx_names = {"dense": "dense.onnx", "slim": "model.onnx", "baseline": "baseline.onnx"}
    models = {k: bench_model(p, out_dir / onnx_names[k], settings, trust_factory) for k, p in paths.items()}
    speedup = {b: models["dense"]["latency_ms"][b]["median"] / models["slim"]["latency_ms"][b]["median"]
               for b in models["dense"]["latency_ms"]}
    report = {
        "format": BENCH_FORMAT, "machine": machine(),
        "settings": {"threads": settings.threads, "warmup": settings.warmup, "repeats": settings.repeats,
                     "batches": list(BATCHES), "pj_per_mac": PJ_PER_MAC, "pj_per_ac": PJ_PER_AC,
                     "execution_provider": "CPUExecutionProvider", "graph_optimization": "ORT_ENABLE_ALL"},
        "units": {"params": "count", "macs": "dense multiply-accumulates per inference (all T steps)",
                  "macs_analog": "MACs on non-spike inputs per inference",
                  "macs_analog_effective": "MACs on non-spike inputs through non-zero weights per inference",
                  "sops": "synaptic operations per inference",
                  "sops_effective": "synaptic operations through non-zero weights per inference",
                  "connectivity": "fraction of conv + linear weights that are non-zero",
                  "energy_uj": "microjoules per inference", "latency_ms": "milliseconds per batch",
                  "accuracy": "fraction", "kept_channels": "fraction of conv channels", "firing_rate": "spikes per neuron per step"},
        "models": models,
        "speedup": speedup,
    }
    from .plots import write_plots  # matplotlib is slow to import; only the report needs it

    report["plots"] = write_plots(report, out_dir)
    write_json(report, out_dir / "bench.json")
    write_text(render_markdown(report), out_dir / "report.md")
    return report


ROWS = [("params", "Params", "{:,.0f}"), ("macs", "MACs / inference", "{:,.0f}"), ("sops", "SOPs / inference", "{:,.0f}"),
        ("sops_effective", "SOPs through non-zero weights", "{:,.0f}"), ("connectivity", "Connectivity", "{:.1%}"),
        ("firing_rate", "Firing rate", "{:.4f}"), ("energy_uj", "Energy (µJ)", "{:.3f}"),
        ("accuracy", "Accuracy (PyTorch)", "{:.2%}"), ("accuracy_onnx", "Accuracy (onnxruntime)", "{:.2%}"),
        ("kept_channels", "Kept conv channels", "{:.1%}")]


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (shared by the terminal and markdown renderers)."""
    names = list(report["models"])
    rows = [[label, *(fmt.format(report["models"][n][key]) for n in names)] for key, label, fmt in ROWS]
    for b in report["settings"]["batches"]:
        cells = []
        for n in names:
            lat = report["models"][n]["latency_ms"][str(b)]
            cells.append(f"{lat['median']:.2f} ({lat['min']:.2f}–{lat['max']:.2f})")
        rows.append([f"Latency batch {b} (ms, median (min–max))", *cells])
    return ["", *names], rows


def render_markdown(report: dict) -> str:
    header, rows = table_rows(report)
    s, m = report["settings"], report["machine"]
    lines = [
        "# snncompress bench report", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows), "",
        "Speedup of the slim over the dense-shaped model (median latency): "
        + ", ".join(f"batch {b}: **{v:.2f}×**" for b, v in report["speedup"].items()), "",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, {m['platform']}; torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']} ({s['execution_provider']}, {s['graph_optimization']}), "
        f"{s['threads']} intra-op threads, {s['warmup']} warm-up + {s['repeats']} timed runs per batch size.",
        *(f"![{name}]({file})" for name, file in report.get("plots", {}).items()), "",
        f"Energy estimate: {s['pj_per_mac']} pJ per MAC on non-spike inputs + {s['pj_per_ac']} pJ per SOP "
        "(45 nm, Horowitz ISSCC 2014). SOPs and MACs are per inference over all T steps, averaged over the test set "
        "(spikingjelly op_counter). `dense` is the trained model with its masks applied but all channels present; "
        "`slim` has the pruned channels physically removed.", "",
    ]
    return "\n".join(lines)
