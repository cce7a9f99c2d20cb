"""Command-line interface: a thin layer over the library (one function per command)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress spiking neural networks: train with dynamic structured pruning, slim, export to ONNX, bench.")
# Everything printed is plain text: file names, recipe names, metadata and keys come from files and users, and
# rich would take their brackets for markup ("[/]" crashes it); control characters are escaped (see say).
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)
_state = {"debug": False, "trust_factory": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
          trust_factory: bool = typer.Option(False, "--trust-code", "--trust-factory",
                                             help="Let a checkpoint that names user code (a model factory) "
                                                  "import and run it.")) -> None:
    _state["debug"] = debug
    _state["trust_factory"] = trust_factory


def printable(text: object) -> str:
    """``text`` with every non-printable character (ESC, CR, newline, ...) written as its escape: a string from a
    file cannot move the cursor, clear the screen or forge a line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(text))


def say(text: object, style: str | None = None, stderr: bool = False) -> None:
    """Print one line of plain text (:func:`printable`)."""
    (err_console if stderr else console).print(Text(printable(text), style=style or ""), soft_wrap=True)


def _table(report: dict) -> Table:
    from .stages.bench import table_rows

    header, rows = table_rows(report)
    t = Table(*header, title="snncompress bench")
    for r in rows:
        t.add_row(*map(printable, r))
    return t


def _print_bench(report: dict, out_dir: Path) -> None:
    console.print(_table(report))  # cells: printable()
    s = report["settings"]
    say(f"speedup (slim vs dense-shaped, median latency on {s['runtime']} {s['runtime_version']}): "
        + ", ".join(f"batch {b}: {v:.2f}x" for b, v in report["speedup"].items()))
    if "budget" in report:
        b = report["budget"]
        pct = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731 (a model that never spikes has no SOP ratio)
        ratios = ", ".join(f"{k} {pct(v)}" for k, v in b["ratios"].items())
        say(f"budget: keep {pct(b['target'])} of the {b['unit']}; the slim model has "
            f"{pct(b['achieved'])} (of the dense-shaped model: {ratios}; latency at batch "
            f"{b['latency_batch']})")
    from .layout import RunLayout

    layout = RunLayout(out_dir)
    say(f"wrote {layout.bench} and {layout.report}")


@app.command("train")
def train_cmd(recipe: Path = typer.Argument(..., help="YAML recipe"),
              out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default runs/<recipe name>)"),
              resume: bool = typer.Option(False, "--resume", help="Continue from OUT/ckpt.pt (same recipe)")) -> None:
    """Train a spiking network (with the recipe's dynamic pruning) into OUT: ckpt.pt, best.pt, metrics.jsonl."""
    from .config import load_recipe

    r = load_recipe(recipe)  # a bad recipe is reported before torch is imported
    from . import distributed
    from .stages.train import train

    with distributed.session():  # under torchrun: one process per device, rank 0 reports
        res = train(r, out or Path("runs") / r.name, resume=resume)
        if not distributed.is_main():
            return
    last = res.metrics[-1]
    say(f"test accuracy {last['test_acc']:.4f}, kept channels {last['kept_channels']:.3f}; "
        f"wrote {res.ckpt}, {res.best}, {res.out_dir / 'metrics.jsonl'}")
    if b := res.budget:
        say(f"budget: the masks cost {b['selected'] / b['dense']:.1%} of the dense model's {b['unit']} "
            f"(target {b['target'] / b['dense']:.1%})")
        if b["selected"] > b["target"] * (1 + 1e-6):
            say("  the target is below the smallest network the method keeps (prune.min_channels per "
                "group, counted in whole channel blocks for latency); that network was kept")


@app.command("slim")
def slim_cmd(ckpt: Path = typer.Argument(..., help="Training checkpoint (ckpt.pt / best.pt)"),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default slim.pt beside CKPT)")) -> None:
    """Physically remove pruned channels and verify the slim model equals the masked one on the test set."""
    from .stages.slim import slim_checkpoint

    r = slim_checkpoint(ckpt, out, trust_factory=_state["trust_factory"])
    say(f"params {r.params[0]:,} -> {r.params[1]:,} ({r.params[1] / r.params[0]:.1%}); "
        f"MACs/inference {r.macs[0]:,} -> {r.macs[1]:,} ({r.macs[1] / r.macs[0]:.1%})")
    for g, (k, n) in r.kept.items():
        say(f"  {g}: {n} -> {k} channels")
    eq = r.equivalence
    if eq.exact:
        say(f"verified on {eq.n_samples} test samples: same predictions, "
            f"max |Δlogit| {eq.max_abs_diff:.2g}; wrote {r.path}")
    else:
        say(f"verified on {eq.n_samples} test samples in float64: same predictions, max |Δlogit| "
            f"{eq.float64.max_abs_diff:.2g}. In float32, rounding flips spikes at the threshold: max "
            f"|Δlogit| {eq.max_abs_diff:.2g}, same predictions: {eq.same_predictions}; wrote {r.path}")


@app.command("export")
def export_cmd(ckpt: Path = typer.Argument(..., help="Dense or slim checkpoint"),
               onnx: bool = typer.Option(False, "--onnx", help="Export to ONNX (CPUs, GPUs)"),
               nir: bool = typer.Option(False, "--nir", help="Export to NIR (neuromorphic hardware; needs average "
                                                             "pooling and hard-reset IF/LIF neurons)"),
               out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default CKPT with .onnx "
                                                                             "or .nir)"),
               fold_bn: bool = typer.Option(False, "--fold-bn", help="Fold BatchNorm into the convs (faster; may flip "
                                                                     "spikes at the threshold: agreement is reported)"),
               sj_neurons: bool = typer.Option(False, "--sj-neurons", help="Export spikingjelly's own neuron ops "
                                                                           "instead of the leaner, equivalent form"),
               int8: bool = typer.Option(False, "--int8", hidden=True),  # removed: refused with what replaces it
               unroll: str = typer.Option("auto", "--unroll", help="step: the whole network once per time step "
                                                                   "(faster at large batch); layer: each layer over "
                                                                   "all steps, as trained; auto: step, else layer")) -> None:
    """Unroll the T time steps into a static ONNX graph and verify it with onnxruntime, or write the network as
    a NIR graph and verify it read back and simulated."""
    from .errors import SnnCompressError

    if int8:
        from .errors import UsageError

        raise UsageError("export --int8 was removed (post-training int8 that onnxruntime ran slower than float32); "
                         "train with a quant section instead: its export has integer convs (see README, "
                         "Quantisation-aware training)")
    if onnx == nir:
        raise SnnCompressError("choose one export format: --onnx or --nir")
    if nir:
        from .stages.export import export_nir

        n = export_nir(ckpt, out, trust_factory=_state["trust_factory"])
        say(f"BatchNorm folded: max |Δlogit| {n.fold_max_abs_diff:.2g} against the model as trained, "
            f"{n.fold_agreement:.2%} of test predictions unchanged"
            + (" (exact in float64: float32 rounding at the threshold)" if n.fold_float64_exact else ""))
        say(f"verified: read back with nir.read and simulated by spikingjelly on {n.n_samples} test samples: "
            f"same predictions, max |Δlogit| {n.max_abs_diff:.2g}; "
            + ", ".join(f"{v} {k}" for k, v in n.nodes.items())
            + f" nodes, {n.neurons:,} neurons, {n.bytes:,} bytes; wrote {n.path}")
        return
    from .stages.export import export_onnx

    r = export_onnx(ckpt, out, fold_bn=fold_bn, lean=not sj_neurons, order=unroll,
                    trust_factory=_state["trust_factory"])
    if r.fold_agreement is not None:
        say(f"BatchNorm folded: {r.fold_agreement:.2%} of test predictions unchanged by the fold")
    say(f"verified with onnxruntime on {r.n_samples} test samples: same predictions, "
        f"max |Δlogit| {r.max_abs_diff:.2g}; {r.nodes} nodes, unrolled by {r.order}; wrote {r.path}")
    if r.integer_convs:
        say(f"{r.integer_convs} conv nodes on spikes are integer convs ({r.weight_bits}-bit weights, uint8 spikes)")


@app.command("bench")
def bench_cmd(run_dir: Optional[Path] = typer.Argument(None, help="Run directory written by `snncompress run`"),
              dense: Optional[Path] = typer.Option(None, help="Dense-shaped (masked) checkpoint"),
              slim: Optional[Path] = typer.Option(None, help="Slim checkpoint"),
              baseline: Optional[Path] = typer.Option(None, help="Dense baseline checkpoint"),
              out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory"),
              threads: Optional[int] = typer.Option(None, min=1, help="The runtime's intra-op threads (default: "
                                                                      "the recipe's deploy.threads, else the cores "
                                                                      "this process may use)"),
              repeats: int = typer.Option(30, min=20, help="Timed runs per batch size"),
              runtime: Optional[str] = typer.Option(None, "--runtime", help="onnxruntime or openvino (pip install "
                                                    "'snncompress[openvino]'); default: the recipe's "
                                                    "deploy.runtime")) -> None:
    """Measure the slim model against the dense-shaped one: latency, SOPs, MACs, firing, energy, accuracy."""
    from .runtime.sessions import require_runtime
    from .errors import SnnCompressError
    from .layout import RunLayout
    from .run import bench
    from .stages.bench import BenchSettings

    if runtime is not None:
        require_runtime(runtime)  # an unknown or missing runtime is refused before anything is read
    if run_dir is not None:
        if not run_dir.is_dir():
            raise SnnCompressError(f"{run_dir}: no such run directory")
        layout = RunLayout(run_dir)
        dense = dense or layout.ckpt
        slim = slim or layout.slim
        if baseline is None and layout.baseline_ckpt.exists():
            baseline = layout.baseline_ckpt
        out = out or run_dir
    if dense is None or slim is None:
        raise SnnCompressError("give a RUN_DIR, or both --dense and --slim")
    out = out or slim.parent
    from .artifacts import load_checkpoint
    from .checkpoint import recipe_of

    deploy = recipe_of(load_checkpoint(dense)).deploy  # what the user did not give comes from the recipe
    settings = BenchSettings.from_deploy(deploy, runtime=runtime, threads=threads, repeats=repeats)
    _print_bench(bench(dense, slim, out, baseline=baseline, settings=settings, trust_factory=_state["trust_factory"]), out)


@app.command("run")
def run_cmd(recipe: Path = typer.Argument(..., help="YAML recipe"),
            out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<recipe name>)"),
            resume: bool = typer.Option(False, "--resume", help="Skip finished stages, continue unfinished training")) -> None:
    """train -> slim -> export -> bench, all into one run directory (training on every torchrun process)."""
    from .config import load_recipe

    r = load_recipe(recipe)
    from .run import run_pipeline

    out = out or Path("runs") / r.name
    report = run_pipeline(r, out, resume=resume, log=lambda stage: say(f"▶ {stage}", "bold cyan"))
    if report is not None:  # None: a rank > 0 under torchrun, done after training
        _print_bench(report, out)


def _csv(text: str, what: str, cast=str) -> list:
    from .errors import SnnCompressError

    try:
        items = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SnnCompressError(f"{what}: expected a comma-separated list, got {text!r}") from None
    if not items:
        raise SnnCompressError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


@app.command("compare")
def compare_cmd(recipe: Path = typer.Argument(..., help="YAML recipe (model, data, training, schedule)"),
                methods: str = typer.Option("sca,criticality,pq,random,l1", "--methods",
                                            help="Comma-separated pruning methods"),
                keep: Optional[str] = typer.Option(None, "--keep", help="Comma-separated budgets: channel keep "
                                                   "fraction (structured), the same weight count (unstructured); "
                                                   "default: the recipe's prune.keep"),
                seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds recipe.seed ... recipe.seed + N - 1"),
                baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline",
                                                        help="Also a dense run per seed (default: the recipe's baseline)"),
                out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory (default runs/<name>-compare)"),
                jobs: int = typer.Option(1, "--jobs", help="Variants run at once in worker processes, sharing the "
                                         "cores and GPUs (1 to 256; 1: one after the other in this process)")) -> None:
    """Train, slim and bench every method at the same budgets and seeds; compare.json, compare.md, compare.png."""
    from .config import load_recipe

    r = load_recipe(recipe)
    from .compare import compare

    out = out or Path("runs") / f"{r.name}-compare"
    keeps = _csv(keep, "--keep", float) if keep is not None else None
    result = compare(r, out, _csv(methods, "--methods"), keeps, seeds, baseline,
                     log=lambda line: say(f"▶ {line}", "bold cyan"), jobs=jobs)
    for line in (out / "compare.md").read_text().splitlines():
        say(line)
    say(f"wrote {out / 'compare.json'} ({len(result['rows'])} rows), {out / 'compare.md'}, "
        f"{out / 'compare.png'}")


@app.command("check")
def check_cmd(path: Path = typer.Argument(..., help="A NIR file (.nir) or a checkpoint (.pt)"),
              target: str = typer.Option("speck", "--target", "-t", help="Hardware target (registered: speck)")) -> None:
    """Check a model against a chip's published limits: one line per violation and exit 1, else the per-core use."""
    from .errors import SnnCompressError
    from .stages.check import check_target

    r = check_target(path, target, trust_factory=_state["trust_factory"])
    for v in r.violations:
        say(v)
    for n in r.notes:
        say(f"note: {n}")
    if not r.fits:
        raise SnnCompressError(f"{path} does not fit {r.target}: {len(r.violations)} violation"
                               f"{'s' if len(r.violations) > 1 else ''} (listed above)")
    table = Table(*r.header, title=printable(f"{path} on {r.target}: fits"))
    for row in r.rows:
        table.add_row(*map(printable, row))
    console.print(table)


@app.command("info")
def info_cmd(path: Optional[Path] = typer.Argument(None, help="A checkpoint (.pt), ONNX or NIR model to describe")) -> None:
    """Versions, registered models and methods, or what a checkpoint / ONNX / NIR file holds."""
    from importlib.metadata import version

    if path is None:
        from .registry import BUDGET_UNITS, METHODS, TARGETS, list_models

        from importlib.metadata import PackageNotFoundError

        try:
            openvino = f"openvino {version('openvino')}"
        except PackageNotFoundError:
            openvino = "openvino not installed (optional: pip install 'snncompress[openvino]')"
        say(f"snncompress {__version__}; " + "; ".join(
            f"{pkg} {version(pkg)}" for pkg in ("torch", "spikingjelly", "torch-pruning", "onnx", "onnxruntime", "nir"))
            + f"; {openvino}")
        say(f"models: {', '.join(list_models())}")
        say("methods: " + ", ".join(f"{m} ({METHODS.meta(m)['family']})" for m in METHODS.names()))
        say(f"budget units: {', '.join(BUDGET_UNITS.names())}")
        say(f"hardware targets: {', '.join(TARGETS.names())}")
        return
    if path.suffix == ".nir":
        from .export.nir import NIR_FORMAT, describe_nodes, read_nir

        graph = read_nir(path)
        table = Table("node", "type", "input", "output", title=printable(f"{path} ({len(graph.nodes)} nodes, "
                                                                         f"{len(graph.edges)} edges)"))
        for row in describe_nodes(graph):
            table.add_row(*map(printable, row))
        console.print(table)
        meta = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in (graph.metadata or {}).items()}
        if meta.get("format") != NIR_FORMAT:
            say(f"metadata: none from snncompress (no '{NIR_FORMAT}' format entry)")
        for k, v in meta.items():
            say(f"{k}: {v}")
        return
    if path.suffix == ".onnx":
        from .export.onnx import read_onnx_metadata

        for k, v in read_onnx_metadata(path).items():
            say(f"{k}: {v}")
        return
    from .artifacts import load_checkpoint
    from .checkpoint import describe_spec
    from .registry import is_code_string

    ck = load_checkpoint(path)
    kept = {g: f"{int(m.sum())}/{m.numel()}" for g, m in ck["masks"].items()}
    method = (ck["recipe"].get("prune") or {}).get("method")
    for line in (f"format: {ck['format']}", f"recipe: {ck['recipe'].get('name')}", f"model: {describe_spec(ck['model'])}",
                 f"method: {method}{' (user code, not imported)' if is_code_string(method or '') else ''}",
                 f"epoch: {ck.get('epoch')}", f"metrics: {ck.get('metrics')}", f"kept channels: {kept}"):
        say(line)
    if "weight_masks" in ck:
        from .prune.weights import unpack_masks

        wm = unpack_masks(ck["weight_masks"])
        kept_w = sum(int(m.sum()) for m in wm.values())
        say(f"kept weights: {kept_w}/{sum(m.numel() for m in wm.values())} (conv + linear)")


def main() -> None:
    """Entry point: user errors become one line on stderr and their exit code (tracebacks with --debug);
    anything else is an internal error, reported as such in one line with exit code 3 (see errors.py)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # not torchrun (read here: torch is not imported yet)
        return _main()
    # Under torchrun a rank ends with os._exit once its output is flushed: it has left the job (barrier,
    # destroy_process_group) and every file it wrote is complete, but the interpreter's teardown of
    # torch's C++ threads can still abort a finished rank ("terminate called without an active
    # exception", SIGABRT; seen about once in 20-40 runs of two ranks on loaded CPUs), which makes
    # torchrun report a failed job.
    try:
        _main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None = None) -> None:
    """The command line ``argv`` (default: the process's), errors reported as :func:`main` says."""
    from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, SnnCompressError, first_line

    # torch warns on every run of a custom op that Triton (a GPU compiler) is missing: noise on CPU
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
    try:
        app(args=argv, standalone_mode=False)
    except SnnCompressError as e:
        if _state["debug"]:
            raise
        # escaped: rich would take a message's own brackets ("snncompress[openvino]", a path) for markup
        err_console.print(Text("error: ", style="bold red") + Text(printable(e)), soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        say("interrupted", stderr=True)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit:
        raise
    except Exception as e:
        if isinstance(e, typer.Abort):
            sys.exit(1)
        if isinstance(e, typer.TyperException) and hasattr(e, "show"):  # usage errors (typer vendors click)
            e.show()
            sys.exit(e.exit_code)
        if _state["debug"]:
            raise
        err_console.print(Text("internal error: ", style="bold red") + Text(printable(first_line(e)) + (
            " (a bug in snncompress, not in your input; rerun with --debug for the traceback and please report it)")),
            soft_wrap=True)
        sys.exit(EXIT_INTERNAL)
