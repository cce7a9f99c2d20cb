"""The bench stage: measure dense-shaped vs slim (and baseline) models.

Params, dense MACs, SOPs (spikingjelly's op_counter, on the test set), firing rate, an energy estimate,
accuracy in PyTorch and on the deployment runtime (onnxruntime or OpenVINO, its logits verified against
PyTorch's), latency on that runtime at batch 1, 32 and the recipe's ``deploy.batch_size``, and the pruning
budget: its unit, its target and what the slim model reached in that unit.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from .. import __version__
from ..artifacts import check_output, load_checkpoint, write_json, write_text
from ..checkpoint import checkpoint_bits, model_from_checkpoint, recipe_of
from ..config import FLOAT_BITS, DeployCfg, Recipe
from ..data import encode, eval_batches, load_dataset
from ..errors import SnnCompressError, VerificationError
from ..evaluation import batch_logits, evaluate, runtime_agreement
from ..export.nir import nir_exported_from
from ..export.onnx import exported_from, read_onnx_metadata
from ..layout import RunLayout
from ..metrics import PJ_PER_AC, PJ_PER_MAC, count_macs, count_params, spike_stats, weight_counts
from ..prune.costs import unit_class
from ..prune.costs.memory import model_weight_bytes
from ..prune.gates import kept_fraction
from ..registry import BUDGET_UNITS, is_trusted
from ..runtime.sessions import require_runtime, runtime_options, runtime_session, runtime_version
from ..runtime.timing import timer

BATCHES = (1, 32)  # always timed; the recipe's deploy.batch_size is added when it is another
BENCH_FORMAT = "snncompress.bench/1"


def available_cores() -> int:
    """Cores this process may run on (CPU affinity, e.g. taskset or a container's cpuset), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


@dataclass
class BenchSettings:
    """How the bench times the exported models."""

    threads: int = field(default_factory=available_cores)  # the runtime's intra-op threads
    warmup: int = 5
    repeats: int = 30
    runtime: str = "onnxruntime"  # one of config.RUNTIMES; openvino is an optional extra

    @classmethod
    def from_deploy(cls, deploy: DeployCfg, **overrides) -> "BenchSettings":
        """The settings a recipe's ``deploy`` section asks for (runtime; threads, where set); ``overrides``
        that are not None replace them (e.g. a CLI option the user gave)."""
        settings = cls(runtime=deploy.runtime, **({"threads": deploy.threads} if deploy.threads else {}))
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def timed_batches(recipe: Recipe) -> list[int]:
    """The batch sizes the bench times: 1, 32 and the batch a latency budget is measured at."""
    return sorted({*BATCHES, recipe.deploy.batch_size})


def onnx_latency(path: Path, x: np.ndarray, settings: BenchSettings,
                 batches: list[int] | tuple[int, ...] = BATCHES) -> dict[str, dict[str, float]]:
    """Median/min/max milliseconds per call of an ONNX model at each batch size, on ``settings.runtime``.

    ``x`` holds real model inputs (test samples, encoded), repeated to fill a batch if needed. OpenVINO
    compiles the model once per batch size with a static batch (faster than a dynamic one); onnxruntime
    runs the graph's dynamic batch.
    """
    return {str(b): timer(settings.runtime, path, np.ascontiguousarray(np.resize(x, (b, *x.shape[1:]))),
                          settings.threads, settings.warmup)(settings.repeats)  # real test inputs, repeated if needed
            for b in batches}


def verified_logits(path: Path, reference: np.ndarray, x: torch.Tensor, T: int, encoding: str,
                    settings: BenchSettings) -> tuple[np.ndarray, dict]:
    """The runtime's logits of the ONNX file on the test set, checked against PyTorch's as the export checks
    onnxruntime's (:func:`~snncompress.evaluation.runtime_agreement`), else :class:`VerificationError`.

    A file exported with BatchNorm folded computes a different function by design (float rounding at the
    threshold): its agreement is reported, not enforced."""
    session = runtime_session(settings.runtime, path, settings.threads)
    logits = batch_logits(lambda inp: session(inp.numpy()), x, T, encoding)
    check = runtime_agreement(logits, reference)
    props = read_onnx_metadata(path)
    exact_export = props.get("bn_folded", "False") != "True"
    if exact_export and not check["ok"]:
        raise VerificationError(f"{settings.runtime} disagrees with PyTorch on {path} (max |Δlogit| "
                                f"{check['max_abs_diff']:.3g} in {check['samples_off']} of {check['samples']} "
                                f"samples, same predictions: {check['same_predictions']}); nothing written")
    return logits, {"runtime": settings.runtime, "samples": check["samples"], "max_abs_diff": check["max_abs_diff"],
                    "samples_off": check["samples_off"], "agreement": check["agreement"], "enforced": exact_export}


def bench_model(ckpt_path: Path, onnx_path: Path, settings: BenchSettings, trust_factory: bool = False,
                batches: list[int] | tuple[int, ...] = BATCHES) -> dict:
    """Every figure of one model: counts and accuracy in PyTorch, accuracy (verified against PyTorch) and
    latency of its ONNX export on the runtime ``settings`` names."""
    if not exported_from(onnx_path, ckpt_path):  # a missing, stale or foreign file
        raise SnnCompressError(f"{onnx_path}: not an ONNX export of {ckpt_path}; export it first")
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, str(ckpt_path), trust_factory)
    recipe = recipe_of(ckpt)
    data = load_dataset(recipe.data, recipe.seed)
    T, enc = ckpt["data"]["T"], ckpt["data"]["encoding"]

    _, accuracy, logits = evaluate(model, data.x_test, data.y_test, T, enc)
    onnx_logits, check = verified_logits(onnx_path, logits.numpy(), data.x_test, T, enc, settings)
    masks = ckpt["masks"]
    kept = kept_fraction(masks)
    bits = checkpoint_bits(ckpt)
    return {
        "checkpoint": str(ckpt_path), "onnx": str(onnx_path),
        "params": count_params(model),
        **weight_counts(model),
        # the deployed weights' memory at the bit width they were trained at, and as float32
        "weight_bits": bits,
        "weight_bytes": model_weight_bytes(model, bits),
        "weight_bytes_fp32": model_weight_bytes(model, FLOAT_BITS),
        "macs": count_macs(model, encode(data.x_test[:1], T, enc)),
        **spike_stats(model, data.x_test, T, enc),
        "accuracy": accuracy,
        # the ONNX file on the bench's runtime (settings.runtime); the key predates the runtime choice
        "accuracy_onnx": float((torch.from_numpy(onnx_logits).argmax(1) == data.y_test).float().mean()),
        "runtime_check": check,
        "kept_channels": kept,
        "kept_per_group": {g: int(torch.as_tensor(m).sum()) for g, m in masks.items()},
        "group_sizes": {g: len(m) for g, m in masks.items()},
        # what the training selected in its budget's unit (macs, sops, latency), from the last mask update
        "trained_budget": next((h["budget"] for h in reversed(ckpt.get("history") or []) if "budget" in h), None),
        "latency_ms": onnx_latency(onnx_path, next(eval_batches(data.x_test, T, enc, batch_size=max(batches))).numpy(),
                                   settings, batches),
    }


def budget_figures(recipe: Recipe, dense: dict, slim: dict) -> dict | None:
    """The pruning budget of a structured recipe and what the slim model reached, in every registered budget
    unit as a ratio of the slim model to the dense one (each unit says where its figure is,
    ``CostUnit.achieved``): kept channels, MACs, median latency at the recipe's ``deploy.batch_size``
    (against the dense-shaped model, which has the dense model's shapes), SOPs against the dense SOPs the
    training measured (only a SOP budget records them), ... None for a dense recipe and for unstructured
    methods (their budget is a weight sparsity, reported as connectivity). ``trained``: what the training's
    last mask update selected, in its unit."""
    p = recipe.prune
    if p is None or p.unstructured:
        return None
    batch, trained = recipe.deploy.batch_size, dense.get("trained_budget")

    def achieved(name: str) -> float | None:
        if name not in BUDGET_UNITS and not is_trusted(name):  # a user's unit the caller did not trust
            return None
        return unit_class(name).achieved(dense, slim, batch, trained if trained and trained["unit"] == name else None)

    ratios = {name: achieved(name) for name in dict.fromkeys([*BUDGET_UNITS.names(), p.budget_unit])}
    return {"unit": p.budget_unit, "target": p.keep, "achieved": ratios[p.budget_unit], "ratios": ratios,
            "latency_batch": batch, "trained": trained}


def nir_figures(path: Path, slim: dict) -> dict:
    """What bench reports for the NIR file of the slim model: the same network (same spikes: the export verified
    it), so the slim model's SOPs, energy and firing; its nodes and neurons as the file holds them."""
    from ..export.nir import neuron_count, node_counts, read_nir

    graph = read_nir(path)
    return {"path": str(path), "same_network_as": "slim", "bytes": path.stat().st_size, "nodes": node_counts(graph),
            "neurons": neuron_count(graph), "neurons_slim": slim.get("neurons"),
            **{k: slim[k] for k in ("sops", "sops_effective", "firing_rate", "energy_uj") if k in slim}}


def machine(runtime: str = "onnxruntime") -> dict:
    """The machine and the versions of what ran the bench (the runtime's version under its own name)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            runtime: runtime_version(runtime), "snncompress": __version__}


def bench_models(models: dict[str, tuple[Path, Path]], out_dir: str | os.PathLike,
                 settings: BenchSettings | None = None, trust_factory: bool = False) -> dict:
    """Benchmark ``{"dense": (ckpt, onnx), "slim": (ckpt, onnx)[, "baseline": (ckpt, onnx)]}``: the dense-shaped
    masked checkpoint against its slim version (and an optional dense baseline), each with the ONNX file
    exported from it; write ``bench.json``, ``report.md`` and the plots into ``out_dir``; return the report.

    ``settings`` None: as the dense checkpoint's recipe asks (``deploy.runtime``, ``deploy.threads``). The
    batch sizes timed are 1, 32 and the recipe's ``deploy.batch_size``; a structured recipe's budget (unit,
    target, what the slim model reached) is reported under ``budget``. ``trust_factory``: see
    :func:`snncompress.load_model`."""
    out_dir = check_output(out_dir, directory=True)
    recipe = recipe_of(load_checkpoint(Path(models["dense"][0])))
    settings = settings or BenchSettings.from_deploy(recipe.deploy)
    require_runtime(settings.runtime)
    batches = timed_batches(recipe)
    measured = {k: bench_model(Path(ckpt), Path(onnx_path), settings, trust_factory, batches)
                for k, (ckpt, onnx_path) in models.items()}
    speedup = {b: measured["dense"]["latency_ms"][b]["median"] / measured["slim"]["latency_ms"][b]["median"]
               for b in measured["dense"]["latency_ms"]}
    report = {
        "format": BENCH_FORMAT, "machine": machine(settings.runtime),
        "settings": {"runtime": settings.runtime, "runtime_version": runtime_version(settings.runtime),
                     "runtime_options": runtime_options(settings.runtime, settings.threads),
                     "static_batch": settings.runtime == "openvino",  # compiled per timed batch size
                     "threads": settings.threads, "warmup": settings.warmup, "repeats": settings.repeats,
                     "batches": batches, "pj_per_mac": PJ_PER_MAC, "pj_per_ac": PJ_PER_AC},
        "units": {"params": "count", "macs": "dense multiply-accumulates per inference (all T steps)",
                  "weight_bytes": "conv + linear weights at weight_bits bits, plus a 32-bit bias per output channel "
                                  "(BatchNorm folded); weight_bytes_fp32: the same with float32 weights",
                  "macs_analog": "MACs on non-spike inputs per inference",
                  "macs_analog_effective": "MACs on non-spike inputs through non-zero weights per inference",
                  "sops": "synaptic operations per inference",
                  "sops_effective": "synaptic operations through non-zero weights per inference",
                  "connectivity": "fraction of conv + linear weights that are non-zero",
                  "energy_uj": "microjoules per inference", "latency_ms": "milliseconds per batch",
                  "accuracy": "fraction", "accuracy_onnx": "fraction, the ONNX file on settings.runtime",
                  "kept_channels": "fraction of conv channels", "firing_rate": "spikes per neuron per step",
                  "budget": "target and achieved: fractions of the dense model in the budget's unit (SOPs: as the training measured them)"},
        "models": measured,
        "speedup": speedup,
    }
    budget = budget_figures(recipe, measured["dense"], measured["slim"])
    if budget is not None:
        report["budget"] = budget
    layout = RunLayout(out_dir)
    if "slim" in models and nir_exported_from(layout.nir, Path(models["slim"][0])):
        report["nir"] = nir_figures(layout.nir, measured["slim"])
    from ..plots import write_plots  # matplotlib is slow to import; only the report needs it

    report["plots"] = write_plots(report, out_dir)
    write_json(report, layout.bench)
    write_text(render_markdown(report), layout.report)
    return report


ROWS = [("params", "Params", "{:,.0f}"), ("weight_bytes", "Weight memory (bytes)", "{:,.0f}"),
        ("macs", "MACs / inference", "{:,.0f}"), ("sops", "SOPs / inference", "{:,.0f}"),
        ("sops_effective", "SOPs through non-zero weights", "{:,.0f}"), ("connectivity", "Connectivity", "{:.1%}"),
        ("firing_rate", "Firing rate", "{:.4f}"), ("energy_uj", "Energy (µJ)", "{:.3f}"),
        ("accuracy", "Accuracy (PyTorch)", "{:.2%}"), ("accuracy_onnx", "Accuracy ({runtime})", "{:.2%}"),
        ("kept_channels", "Kept conv channels", "{:.1%}")]

def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (shared by the terminal and markdown renderers)."""
    names = list(report["models"])
    runtime = report["settings"].get("runtime", "onnxruntime")  # reports written before the runtime choice
    rows = [[label.format(runtime=runtime), *(fmt.format(report["models"][n][key]) if key in report["models"][n]
                                              else "n/a" for n in names)]  # n/a: a report from before the figure
            for key, label, fmt in ROWS]
    for b in report["settings"]["batches"]:
        cells = []
        for n in names:
            lat = report["models"][n]["latency_ms"][str(b)]
            cells.append(f"{lat['median']:.2f} ({lat['min']:.2f}–{lat['max']:.2f})")
        rows.append([f"Latency batch {b} (ms, median (min–max))", *cells])
    return ["", *names], rows


def budget_sentence(report: dict) -> str:
    """One sentence: the budget's unit and target, what the slim model reached in it and in the other units."""
    bud, runtime = report["budget"], report["settings"]["runtime"]
    label = {name: unit_class(name).label if name in BUDGET_UNITS else name for name in bud["ratios"]}
    others = ", ".join(f"{label[k]} {_percent(v)}" for k, v in bud["ratios"].items() if k != bud["unit"])
    return (f"Pruning budget: keep {bud['target']:.1%} of the dense model's {label[bud['unit']]} "
            f"(`prune.budget_unit: {bud['unit']}`, `prune.keep: {bud['target']}`); the slim model has "
            f"**{_percent(bud['achieved'])}**; in the other units: {others} (latency: the median at batch "
            f"{bud['latency_batch']} on {runtime}).")


def check_sentence(report: dict) -> str:
    """How the runtime's logits compare with PyTorch's on the test set, per model."""
    parts = []
    for name, m in report["models"].items():
        c = m["runtime_check"]
        parts.append(f"{name}: same predictions, max |Δlogit| {c['max_abs_diff']:.2g}" if c["enforced"] else
                     f"{name}: {c['agreement']:.2%} of predictions agree, max |Δlogit| {c['max_abs_diff']:.2g} "
                     "(exported with BatchNorm folded: not held to PyTorch's logits)")
    return f"Its logits against PyTorch's on {c['samples']} test samples: " + "; ".join(parts) + "."


def _percent(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def render_markdown(report: dict) -> str:
    header, rows = table_rows(report)
    s, m = report["settings"], report["machine"]
    options = ", ".join(f"{k} {v}" for k, v in s["runtime_options"].items())
    batch = "a static batch compiled per batch size" if s.get("static_batch") else "a dynamic batch"
    lines = [
        "# snncompress bench report", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows), "",
        "Speedup of the slim over the dense-shaped model (median latency): "
        + ", ".join(f"batch {b}: **{v:.2f}×**" for b, v in report["speedup"].items()), "",
        *([budget_sentence(report), ""] if "budget" in report else []),
        f"Runtime: **{s['runtime']} {s['runtime_version']}** ({options}; {batch}), {s['threads']} intra-op threads, "
        f"{s['warmup']} warm-up + {s['repeats']} timed runs per batch size. {check_sentence(report)}", "",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, {m['platform']}; torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}.",
        *(f"![{name}]({file})" for name, file in report.get("plots", {}).items()), "",
        *([f"NIR file `{Path(report['nir']['path']).name}`: the slim network (same spikes, so the slim column's SOPs "
           f"and energy), {report['nir']['neurons']:,} neurons, nodes: "
           + ", ".join(f"{v} {k}" for k, v in report["nir"]["nodes"].items()) + ".", ""] if "nir" in report else []),
        f"Energy estimate: {s['pj_per_mac']} pJ per MAC on non-spike inputs + {s['pj_per_ac']} pJ per SOP "
        "(45 nm, Horowitz ISSCC 2014). SOPs and MACs are per inference over all T steps, averaged over the test set "
        "(spikingjelly op_counter). `dense` is the trained model with its masks applied but all channels present; "
        "`slim` has the pruned channels physically removed.", "",
    ]
    return "\n".join(lines)
