"""``snncompress compare``: every method from one recipe, at the same budgets and seeds, side by side.

Each variant is a full :func:`run_pipeline` (train -> slim -> export -> bench) in
``OUT/<method>-keep<k>-seed<s>/``; finished stages are skipped on a rerun, so an interrupted compare
continues where it stopped. The rows are aggregated into ``compare.json``, ``compare.md`` (mean ± std
over seeds) and ``compare.png`` (accuracy vs SOPs and vs latency, with the Pareto front).

How ``--keep k`` maps to a budget:

- structured methods keep the fraction ``k`` of the conv channels (``prune.keep = k``; a recipe's ``prune.regrow``
  scaled by ``k / recipe keep`` so regrowth is the same share of the kept channels, or each method's default);
- unstructured methods get the same number of weights: ``prune.sparsity = 1 - D(k)``, where ``D(k)`` is the
  fraction of conv + linear weights left in the architecture slimmed *uniformly* to ``k`` of every
  group's channels (at least ``min_channels``) -- e.g. about ``k^2`` for a plain VGG.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import statistics
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable

import torch

from .artifacts import check_output, locked, write_json, write_text
from .checkpoint import build_model, model_spec
from .config import STRUCTURED_ONLY, PruneCfg, Recipe, parse_recipe
from .data import encode, load_dataset
from .errors import SnnCompressError, UsageError, VerificationError
from .layout import RunLayout
from .metrics import weight_counts
from .plots import plot_pareto
from .prune.groups import channel_groups
from .prune.weights import round_half_up
from .prune.surgery import slim
from .registry import METHODS, trusted
from .run import bench, run_pipeline
from .stages.bench import BenchSettings
from .stages.slim import slim_checkpoint
from .stages.train import train

COMPARE_FORMAT = "snncompress.compare/1"
MAX_JOBS = 256


def weight_density_for_keep(recipe: Recipe, keep: float) -> float:
    """``D(keep)``: conv + linear weights of the model slimmed uniformly to ``keep`` of each group's channels
    (the first ``max(min(min_channels, size), round_half_up(keep * size))``), over those of the full model."""
    data = load_dataset(recipe.data, recipe.seed)
    example = encode(data.x_train[:2], recipe.data.T, recipe.data.encoding)
    model = build_model(model_spec(recipe, data.input_shape[0], len(data.classes)), example, len(data.classes))
    floor = (recipe.prune or PruneCfg()).min_channels
    masks = {g.name: torch.arange(g.size) < max(min(floor, g.size), round_half_up(keep * g.size))
             for g in channel_groups(model, example)}
    return weight_counts(slim(model, masks, example))["weights"] / weight_counts(model)["weights"]


def variant_recipe(recipe: Recipe, method: str, keep: float, seed: int, density: float | None = None) -> Recipe:
    """The recipe of one variant: ``method`` at budget ``keep`` (see the module docstring) and ``seed``.

    ``density`` is ``D(keep)`` (needed for unstructured methods). Schedule and ``min_channels`` come from the
    recipe's prune section; the method's options too where it is the recipe's method (another method runs with
    its defaults).
    """
    if method not in METHODS:
        raise SnnCompressError(f"compare: unknown method {method!r}; choose from {', '.join(METHODS.names())}")
    base = recipe.prune or PruneCfg()
    defaults = {k: f.default for k, f in PruneCfg.model_fields.items()}
    prune = {**base.model_dump(mode="json"), "method": method}
    if METHODS.meta(method)["family"] == "unstructured":
        if density is None:
            raise ValueError("variant_recipe: an unstructured method needs the weight density D(keep)")
        prune.update({k: defaults[k] for k in STRUCTURED_ONLY}, sparsity=max(0.0, 1.0 - density))
    else:
        # regrowth stays the same share of the kept channels as in the recipe (unset: each method's default)
        regrow = None if base.unstructured or base.regrow is None else base.regrow / base.keep * keep
        prune.update(keep=keep, regrow=regrow, sparsity=None)
    if method != base.method:  # another method's options are not this one's
        prune["options"] = {}
    data = {**recipe.model_dump(mode="json"), "name": f"{recipe.name}-{method}-keep{keep:g}-seed{seed}",
            "seed": seed, "baseline": False, "prune": prune}
    return parse_recipe(data, f"compare variant {method} keep {keep:g} seed {seed}")


def _row(method: str, keep: float, seed: int, variant: Recipe | None, report: dict, run_dir: Path) -> dict:
    dense, sl = report["models"]["dense"], report["models"]["slim"]
    p = variant.prune if variant is not None else None
    return {
        "method": method, "family": "dense" if p is None else "unstructured" if p.unstructured else "structured",
        "keep": keep, "seed": seed, "sparsity": p.sparsity if p is not None else None, "run_dir": str(run_dir),
        "accuracy": sl["accuracy"], "accuracy_onnx": sl["accuracy_onnx"], "kept_channels": sl["kept_channels"],
        # non-zero weights left, over the weights of the full (dense-shaped) architecture
        "connectivity": sl["nonzero_weights"] / dense["weights"],
        "sops": sl["sops_effective"], "sops_all_weights": sl["sops"], "macs": sl["macs"], "params": sl["params"],
        "energy_uj": sl["energy_uj_effective"],
        "latency_ms": {b: v["median"] for b, v in sl["latency_ms"].items()},
    }


def _dense_reference(recipe: Recipe, seed: int, out: Path, progress: bool, settings: BenchSettings | None) -> dict:
    """The recipe trained without pruning (slim removes nothing), benched like the variants."""
    layout = RunLayout(out)
    dense = recipe.model_copy(update={"seed": seed}).dense()
    res = train(dense, layout.train_dir, progress=progress, resume=True)
    if not layout.slim.exists():
        slim_checkpoint(res.ckpt, layout.slim)
    if not layout.bench.exists():
        bench(res.ckpt, layout.slim, out, settings=settings)
    return json.loads(layout.bench.read_text())


def compare(recipe: Recipe, out_dir: str | Path, methods: list[str], keeps: list[float] | None = None,
            seeds: int = 1, baseline: bool | None = None, progress: bool = True,
            log: Callable[[str], None] = lambda _: None, settings: BenchSettings | None = None,
            jobs: int = 1) -> dict:
    """Train, slim and bench every method x keep x seed; write compare.json, compare.md, compare.png.

    ``keeps`` default to the recipe's ``prune.keep``; seeds are ``recipe.seed ... recipe.seed + seeds - 1``;
    ``baseline`` (default: the recipe's) adds one dense run per seed as the reference row ``dense``. User code
    the recipe names is trusted for the call, as ``run`` trusts it.

    ``jobs`` (1 to 256) > 1 runs the variants in that many spawned worker processes, the cores split between
    them (torch threads) and variant i on GPU ``i % count`` where torch sees CUDA devices; the rows are the same
    and in the same order as with ``jobs=1`` (in this process, one after the other). Workers show no progress
    bars and ``log`` gets each variant's start and end, not its stages. A worker imports what the recipe names
    as the parent does; a method or model registered in Python must be registered by a module the workers
    import (a script's top level, which then needs the usual ``if __name__ == "__main__":`` guard).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise UsageError(f"compare: --jobs must be an integer from 1 to {MAX_JOBS}, got {jobs!r}")
    out = check_output(out_dir, directory=True)
    with trusted(*recipe.user_code()):
        return _compare(recipe, out, methods, keeps, seeds, baseline, progress, log, settings, jobs)


def _compare(recipe: Recipe, out: Path, methods: list[str], keeps: list[float] | None, seeds: int,
             baseline: bool | None, progress: bool, log: Callable[[str], None], settings: BenchSettings | None,
             jobs: int) -> dict:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SnnCompressError(f"compare: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                               f"choose from {', '.join(METHODS.names())}")
    if keeps is None:
        if recipe.prune is None or recipe.prune.unstructured:
            raise SnnCompressError("compare: give --keep (the recipe has no structured prune.keep)")
        keeps = [recipe.prune.keep]
    if any(not 0 < k <= 1 for k in keeps):
        raise SnnCompressError(f"compare: every keep must be in (0, 1], got {keeps}")
    baseline = recipe.baseline if baseline is None else baseline
    seed_list = list(range(recipe.seed, recipe.seed + seeds))
    densities = {k: weight_density_for_keep(recipe, k) for k in keeps} \
        if any(METHODS.meta(m)["family"] == "unstructured" for m in methods) else {}
    # the variants, in row order: (method, keep, seed, D(keep), run directory); method "dense" is the baseline
    variants = [(method, keep, seed, densities.get(keep), out / f"{method}-keep{keep:g}-seed{seed}")
                for keep in keeps for seed in seed_list for method in methods]
    variants += [("dense", 1.0, seed, None, out / f"dense-seed{seed}") for seed in seed_list] if baseline else []
    with locked(out):  # a second compare into the same directory is refused
        rows = _run_variants(recipe, variants, jobs, progress, log, settings)
        result = {"format": COMPARE_FORMAT, "recipe": recipe.model_dump(mode="json"), "methods": methods,
                  "keeps": keeps, "seeds": seed_list,
                  "density_for_keep": {f"{k:g}": d for k, d in densities.items()}, "rows": rows}
        write_json(result, out / "compare.json")
        summary = summarise(rows)
        write_text(render_compare_markdown(result, summary), out / "compare.md")
        plot_pareto(summary, out / "compare.png", recipe.name)
        return result


def _label(variant: tuple) -> str:
    method, keep, seed = variant[:3]
    return f"dense seed {seed}" if method == "dense" else f"{method} keep {keep:g} seed {seed}"


def _run_variants(recipe: Recipe, variants: list[tuple], jobs: int, progress: bool, log: Callable[[str], None],
                  settings: BenchSettings | None) -> list[dict]:
    """The variants' rows, in order: one after the other here (``jobs == 1``), else in ``jobs`` worker processes
    (no more than there are variants), each started when a worker is free. The first exception other than a
    variant's failed verification is raised here; no variant starts after it (those running finish first)."""
    recipe_json = recipe.model_dump(mode="json")  # workers get plain data and parse it again

    def finished(i: int, row: dict) -> dict:
        log(f"{_label(variants[i])}: " + (f"failed: {row['error']}" if "error" in row else "done"))
        return row

    if jobs == 1:
        rows = []
        for i, v in enumerate(variants):
            log(f"{_label(v)} -> {v[4]}")
            rows.append(finished(i, _run_variant(recipe_json, v, settings, progress, log=log)))
        return rows
    workers = min(jobs, len(variants))
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    gpus = torch.cuda.device_count()
    rows_at: dict[int, dict] = {}
    todo = iter(enumerate(variants))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {}
        while True:
            for i, v in itertools.islice(todo, workers - len(running)):
                log(f"{_label(v)} -> {v[4]}")
                running[pool.submit(_run_variant, recipe_json, v, settings, False, threads,
                                    i % gpus if gpus else None)] = i
            if not running:
                break
            for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                i = running.pop(future)
                rows_at[i] = finished(i, future.result())  # a worker's exception is raised here
    return [rows_at[i] for i in range(len(variants))]


def _run_variant(recipe_json: dict, variant: tuple, settings: BenchSettings | None, progress: bool,
                 threads: int | None = None, gpu: int | None = None,
                 log: Callable[[str], None] = lambda _: None) -> dict:
    """One variant's row (a failed verification: a row with its ``error``), in this process or a worker's.
    ``threads``: torch's intra-op threads for it; ``gpu``: the CUDA device it trains on."""
    recipe = parse_recipe(recipe_json, "compare recipe")
    method, keep, seed, density, run_dir = variant
    with trusted(*recipe.user_code()):  # what the parent trusts (the contextvar does not cross processes)
        if threads is not None:  # a worker process
            torch.set_num_threads(threads)
            # torch warns on every run of a custom op that Triton (a GPU compiler) is missing: silenced as the CLI does
            logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
        if gpu is not None:  # "cuda" (train.device cuda or auto) now means this GPU. Untested: written and tested
            torch.cuda.set_device(gpu)  # on a CPU-only machine, where this path never runs
        if method == "dense":
            report = _dense_reference(recipe, seed, run_dir, progress, settings)
            return _row("dense", 1.0, seed, None, report, run_dir)
        variant_r = variant_recipe(recipe, method, keep, seed, density)
        try:
            report = run_pipeline(variant_r, run_dir, progress=progress, resume=True,
                                  log=lambda stage: log(f"{method}: {stage}"))
        except VerificationError as e:
            # one variant that fails verification must not sink a long comparison: record it, go on
            return {"method": method, "keep": keep, "seed": seed, "run_dir": str(run_dir), "error": str(e)}
        return _row(method, keep, seed, variant_r, report, run_dir)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


SUMMARY_KEYS = ("accuracy", "kept_channels", "connectivity", "sops", "macs", "params", "latency_1", "latency_32")


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (method, keep), in row order: ``n`` and ``{key: (mean, std)}`` over the seeds
    (failed variants, rows with an ``error``, are left out)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in (r for r in rows if "error" not in r):
        groups.setdefault((r["method"], r["keep"]), []).append(r)
    out = []
    for (method, keep), rs in groups.items():
        values = {k: [r[k] for r in rs] for k in SUMMARY_KEYS[:-2]}
        values.update({f"latency_{b}": [r["latency_ms"][b] for r in rs] for b in ("1", "32")})
        out.append({"method": method, "keep": keep, "family": rs[0]["family"], "n": len(rs),
                    **{k: _mean_std(v) for k, v in values.items()}})
    return out


def _fmt(ms: tuple[float, float], fmt: str, scale: float = 1.0) -> str:
    return f"{fmt.format(ms[0] * scale)} ± {fmt.format(ms[1] * scale)}"


def render_compare_markdown(result: dict, summary: list[dict]) -> str:
    """The mean ± std table, its legend, and the failed variants (if any)."""
    cols = ["method", "keep", "seeds", "accuracy (%)", "kept channels (%)", "connectivity (%)", "SOPs (M)",
            "MACs (M)", "params", "latency b1 (ms)", "latency b32 (ms)"]
    lines = [f"# snncompress compare: {result['recipe']['name']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in summary:
        lines.append("| " + " | ".join([
            s["method"], f"{s['keep']:g}", str(s["n"]), _fmt(s["accuracy"], "{:.2f}", 100),
            _fmt(s["kept_channels"], "{:.1f}", 100), _fmt(s["connectivity"], "{:.1f}", 100),
            _fmt(s["sops"], "{:.3f}", 1e-6), _fmt(s["macs"], "{:.2f}", 1e-6), _fmt(s["params"], "{:,.0f}"),
            _fmt(s["latency_1"], "{:.2f}"), _fmt(s["latency_32"], "{:.2f}")]) + " |")
    dens = ", ".join(f"keep {k} -> {v:.2%} of the weights" for k, v in result["density_for_keep"].items())
    lines += ["", "Mean ± sample standard deviation over seeds " + ", ".join(map(str, result["seeds"])) + ". "
              "All figures are of the slim model (pruned channels removed). `keep`: the fraction of conv channels "
              "for structured methods; unstructured methods get the same number of weights as the uniformly "
              "slimmed architecture at that keep" + (f" ({dens})" if dens else "") + ". `connectivity`: non-zero "
              "conv + linear weights over those of the full architecture. SOPs count accumulations through "
              "non-zero weights only (per inference, all T steps, test-set mean); MACs are dense; latency is the "
              "onnxruntime median on this machine (see each run's report.md).", ""]
    failed = [r for r in result["rows"] if "error" in r]
    if failed:
        lines += ["Failed variants (left out of the table; rerun to retry):", "",
                  *(f"- {r['method']} keep {r['keep']:g} seed {r['seed']}: {r['error']}" for r in failed), ""]
    return "\n".join(lines)
