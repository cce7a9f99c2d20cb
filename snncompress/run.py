"""``snncompress run``: train -> slim -> export -> bench into one run directory, stage by stage.

Orchestration lives here, above the stages (which never import one another): :func:`run_pipeline`
runs them in order, and :func:`bench` exports whatever ONNX file is missing or stale before it measures.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from . import distributed
from .artifacts import check_output, load_checkpoint, locked, write_json
from .checkpoint import check_model_options, recipe_of
from .config import Recipe
from .data import load_dataset
from .errors import SnnCompressError
from .export.nir import nir_exported_from
from .export.onnx import exported_from
from .layout import RunLayout
from .registry import trusted
from .runtime.sessions import require_runtime
from .stages.bench import BenchSettings, bench_models
from .stages.export import export_nir, export_onnx
from .stages.slim import slim_checkpoint
from .stages.train import starting_model, train

RUN_FORMAT = "snncompress.run/1"
STAGES = ("train", "baseline", "slim", "export", "bench")
DISTRIBUTED_STAGES = ("train", "baseline")  # under torchrun; the others run on rank 0 alone


def export_all(checkpoints: dict[str, Path], onnx_paths: dict[str, Path], trust_factory: bool = False,
               nir: tuple[Path, Path] | None = None) -> None:
    """Export (and verify) every checkpoint whose ONNX file is missing or was exported from something else;
    ``nir=(checkpoint, path)`` also exports that checkpoint to NIR where its file is missing or stale."""
    if nir is not None and not nir_exported_from(nir[1], nir[0]):  # first: it refuses what NIR cannot express
        export_nir(nir[0], nir[1], trust_factory=trust_factory)
    for name, ckpt in checkpoints.items():
        if not exported_from(onnx_paths[name], ckpt):
            export_onnx(ckpt, onnx_paths[name], trust_factory=trust_factory)


def bench(dense: str | os.PathLike, slim: str | os.PathLike, out_dir: str | os.PathLike,
          baseline: str | os.PathLike | None = None, settings: BenchSettings | None = None,
          trust_factory: bool = False) -> dict:
    """Benchmark the dense-shaped masked checkpoint against its slim version (and an optional dense
    baseline); write ``bench.json``, ``report.md`` and plots into ``out_dir`` and return the report dict.

    Each model is timed as the ONNX file the run layout names in ``out_dir`` (``model.onnx``,
    ``dense.onnx``, ``baseline.onnx``), exported and verified first where it is missing or stale.
    ``settings`` None: the runtime and threads of the dense checkpoint recipe's ``deploy`` section.
    ``trust_factory``: see :func:`snncompress.load_model`.
    """
    layout = RunLayout(out_dir)
    checkpoints = {"dense": Path(dense), "slim": Path(slim), **({"baseline": Path(baseline)} if baseline else {})}
    settings = settings or BenchSettings.from_deploy(recipe_of(load_checkpoint(checkpoints["dense"])).deploy)
    require_runtime(settings.runtime)  # before the exports: a runtime that is not installed fails at once
    export_all(checkpoints, layout.onnx, trust_factory)
    return bench_models({k: (p, layout.onnx[k]) for k, p in checkpoints.items()}, out_dir, settings, trust_factory)


def run_pipeline(recipe: Recipe, out_dir: str | Path, progress: bool = True, resume: bool = False,
                 log: Callable[[str], None] = lambda _: None) -> dict | None:
    """Run every stage into ``out_dir`` (its layout: :class:`~snncompress.layout.RunLayout`); return the
    bench report.

    With ``resume=True``, stages that ``run.json`` records as done (and whose outputs exist) are
    skipped and unfinished trainings continue from their last checkpoint.

    The last checkpoint (end of the frozen-mask fine-tune) is slimmed, not ``best.pt``: the best
    epoch is chosen on the test set, so reporting it would overstate accuracy.

    Under ``torchrun`` every process takes part in the training stages; then the others leave and
    rank 0 alone slims, exports and benches (and writes ``run.json``). They return None.

    User code the recipe names (a model factory, a method, a budget unit) is trusted for the call.
    """
    with distributed.session(), trusted(*recipe.user_code()):
        return _run(recipe, RunLayout(out_dir), progress, resume, log)


def _run(recipe: Recipe, out: RunLayout, progress: bool, resume: bool, log: Callable[[str], None]) -> dict | None:
    main = distributed.is_main()
    log = log if main else (lambda _: None)
    check_output(out.root, directory=True)
    if recipe.prune is None:
        raise SnnCompressError("run needs a prune section (a recipe with prune: null has nothing to slim; use train)")
    require_runtime(recipe.deploy.runtime)  # the bench runs on it: fail before training, not after
    check_model_options(recipe)
    recipe_json = recipe.model_dump(mode="json")
    status = {"format": RUN_FORMAT, "recipe": recipe_json, "stages": {}}
    if recipe.model.weights:  # checked before anything is written: weights that do not fit leave no run behind
        status["weights"] = starting_model(recipe, load_dataset(recipe.data, recipe.seed))[3]
    if resume and out.status.exists():
        previous = json.loads(out.status.read_text())
        if previous.get("recipe") != recipe_json:
            raise SnnCompressError(f"{out.status}: this run used a different recipe; resume with the same one")
        status["stages"] = previous.get("stages", {})
    with locked(out.root) if main else nullcontext():  # a second run into the same directory is refused
        distributed.barrier()  # every rank has read run.json before rank 0 rewrites it
        save_status = (lambda: write_json(status, out.status)) if main else (lambda: None)

        checkpoints = {"slim": out.slim, "dense": out.ckpt, **({"baseline": out.baseline_ckpt} if recipe.baseline else {})}
        outputs = {"train": out.ckpt, "baseline": out.baseline_ckpt, "slim": out.slim, "export": out.onnx["slim"],
                   "bench": out.bench}
        actions = {
            "train": lambda: train(recipe, out.train_dir, progress=progress, resume=resume),
            "baseline": lambda: train(recipe.dense(), out.baseline_dir, progress=progress, resume=resume),
            "slim": lambda: slim_checkpoint(out.ckpt, out.slim),
            "export": lambda: export_all(checkpoints, out.onnx, nir=(out.slim, out.nir) if recipe.export.nir else None),
            "bench": lambda: bench_models({k: (p, out.onnx[k]) for k, p in checkpoints.items()}, out.root),
        }
        for stage in STAGES:
            if stage == "baseline" and not recipe.baseline:
                continue
            done = status["stages"].get(stage, {}).get("status") == "done" and outputs[stage].exists()
            if distributed.is_distributed() and stage in DISTRIBUTED_STAGES:
                distributed.check_agree("done" if done else "to do", f"the state of stage {stage}",
                                        "every rank must see the same run directory (across nodes: a shared filesystem)")
            elif distributed.is_distributed():
                distributed.shutdown()  # training is over: the other ranks leave, rank 0 goes on alone
                if not main:
                    return None
            if done:
                log(f"{stage}: done, skipped")
                continue
            log(stage)
            status["stages"][stage] = {"status": "running", "started": time.time()}
            save_status()
            try:
                actions[stage]()
            except BaseException:
                status["stages"][stage]["status"] = "failed"
                save_status()
                raise
            status["stages"][stage].update(status="done", finished=time.time())
            save_status()
        return json.loads(out.bench.read_text())
