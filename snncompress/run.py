"""``snncompress run``: train -> slim -> export -> bench into one run directory, stage by stage."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from . import distributed
from .artifacts import write_json
from .benchmark import bench
from .errors import SnnCompressError
from .export import export_onnx
from .models import trust_factory
from .recipe import Recipe
from .slimming import slim_checkpoint
from .training import train

RUN_FORMAT = "snncompress.run/1"
STAGES = ("train", "baseline", "slim", "export", "bench")
DISTRIBUTED_STAGES = ("train", "baseline")  # under torchrun; the others run on rank 0 alone


def run_pipeline(recipe: Recipe, out_dir: str | Path, progress: bool = True, resume: bool = False,
                 log: Callable[[str], None] = lambda _: None) -> dict | None:
    """Run every stage; return the bench report. Layout of ``out_dir``::

        run.json                                 recipe and each stage's status
        train/{ckpt.pt,best.pt,metrics.jsonl}   pruned training (masks in the checkpoint)
        baseline/...                             dense training of the same recipe (if recipe.baseline)
        slim.pt  model.onnx  dense.onnx  [baseline.onnx]  bench.json  report.md

    With ``resume=True``, stages that ``run.json`` records as done (and whose outputs exist) are
    skipped and unfinished trainings continue from their last checkpoint.

    The last checkpoint (end of the frozen-mask fine-tune) is slimmed, not ``best.pt``: the best
    epoch is chosen on the test set, so reporting it would overstate accuracy.

    Under ``torchrun`` every process takes part in the training stages; then the others leave and
    rank 0 alone slims, exports and benches (and writes ``run.json``). They return None.
    """
    with distributed.session():
        return _run(recipe, Path(out_dir), progress, resume, log)


def _run(recipe: Recipe, out: Path, progress: bool, resume: bool, log: Callable[[str], None]) -> dict | None:
    main = distributed.is_main()
    log = log if main else (lambda _: None)
    if recipe.prune is None:
        raise SnnCompressError("run needs a prune section (a recipe with prune: null has nothing to slim; use train)")
    if recipe.model.factory:  # the user's own recipe names it: trusted for every stage, resumed ones too
        trust_factory(recipe.model.factory)
    status_path = out / "run.json"
    recipe_json = recipe.model_dump(mode="json")
    status = {"format": RUN_FORMAT, "recipe": recipe_json, "stages": {}}
    if resume and status_path.exists():
        previous = json.loads(status_path.read_text())
        if previous.get("recipe") != recipe_json:
            raise SnnCompressError(f"{status_path}: this run used a different recipe; resume with the same one")
        status["stages"] = previous.get("stages", {})
    distributed.barrier()  # every rank has read run.json before rank 0 rewrites it
    save_status = (lambda: write_json(status, status_path)) if main else (lambda: None)

    outputs = {"train": out / "train" / "ckpt.pt", "baseline": out / "baseline" / "ckpt.pt",
               "slim": out / "slim.pt", "export": out / "model.onnx", "bench": out / "bench.json"}
    actions = {
        "train": lambda: train(recipe, out / "train", progress=progress, resume=resume),
        "baseline": lambda: train(recipe.dense(), out / "baseline", progress=progress, resume=resume),
        "slim": lambda: slim_checkpoint(outputs["train"], outputs["slim"]),
        "export": lambda: export_onnx(outputs["slim"], outputs["export"]),
        "bench": lambda: bench(outputs["train"], outputs["slim"], out,
                               baseline=outputs["baseline"] if recipe.baseline else None),
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
    return json.loads(outputs["bench"].read_text())
