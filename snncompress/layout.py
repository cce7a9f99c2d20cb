"""Where every file of a run directory lives: the one owner of those names.

``snncompress run`` writes, and ``bench RUN_DIR``, ``compare`` and resumes read::

    run.json                                  recipe and each stage's status
    train/{ckpt.pt,best.pt,metrics.jsonl}     pruned training (masks in the checkpoint)
    baseline/...                              dense training of the same recipe (if recipe.baseline)
    slim.pt                                   pruned channels removed, verified
    model.onnx  dense.onnx  [baseline.onnx]   the slim, dense-shaped and baseline models, verified
    [model.nir]                               the slim model as NIR (recipe export.nir), verified
    bench.json  report.md  *.png              the measurements
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CKPT, BEST, METRICS = "ckpt.pt", "best.pt", "metrics.jsonl"  # what a training writes into its directory


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def status(self) -> Path:
        return self.root / "run.json"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def baseline_dir(self) -> Path:
        return self.root / "baseline"

    @property
    def ckpt(self) -> Path:
        """The pruned training's last checkpoint (what is slimmed)."""
        return self.train_dir / CKPT

    @property
    def baseline_ckpt(self) -> Path:
        return self.baseline_dir / CKPT

    @property
    def slim(self) -> Path:
        return self.root / "slim.pt"

    @property
    def onnx(self) -> dict[str, Path]:
        """ONNX file of each benched model: the slim model, the dense-shaped masked one, the baseline."""
        return {"slim": self.root / "model.onnx", "dense": self.root / "dense.onnx",
                "baseline": self.root / "baseline.onnx"}

    @property
    def nir(self) -> Path:
        """The slim model as NIR, for neuromorphic hardware (written when the recipe sets ``export.nir``)."""
        return self.root / "model.nir"

    @property
    def bench(self) -> Path:
        return self.root / "bench.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"
