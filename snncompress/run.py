"""``snncompress run``: train -> slim -> export -> bench into one run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .benchmark import bench
from .export import export_onnx
from .recipe import Recipe
from .slimming import slim_checkpoint
from .train import train


def run_pipeline(recipe: Recipe, out_dir: str | Path, progress: bool = True,
                 log: Callable[[str], None] = lambda _: None) -> dict:
    """Run every stage; return the bench report. Layout of ``out_dir``::

        train/{ckpt.pt,best.pt,metrics.jsonl}   pruned training (masks in the checkpoint)
        baseline/...                             dense training of the same recipe (if recipe.baseline)
        slim.pt  model.onnx  dense.onnx  [baseline.onnx]  bench.json  report.md

    The last checkpoint (end of the frozen-mask fine-tune) is slimmed, not ``best.pt``: the best
    epoch is chosen on the test set, so reporting it would overstate accuracy.
    """
    out = Path(out_dir)
    if recipe.prune is None:
        raise ValueError("run needs a prune section (a recipe with prune: null has nothing to slim; use train)")
    log("train (pruned)")
    trained = train(recipe, out / "train", progress=progress)
    baseline = None
    if recipe.baseline:
        log("train (dense baseline)")
        baseline = train(recipe.dense(), out / "baseline", progress=progress).ckpt
    log("slim")
    slimmed = slim_checkpoint(trained.ckpt, out / "slim.pt")
    log(f"export ({slimmed.path.name} -> model.onnx)")
    export_onnx(slimmed.path, out / "model.onnx")
    log("bench")
    return bench(trained.ckpt, slimmed.path, out, baseline=baseline)
