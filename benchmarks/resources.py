"""Training time per epoch (SCA vs dense) and peak memory (RSS) of export and bench.

Writes JSON + markdown. Each measured step runs in its own process (`snncompress` CLI), so the
peak RSS is that step's alone (getrusage of the finished child).

    python benchmarks/resources.py --out resources.json [--epochs 2]

Training: the MNIST-5k VGG recipe (recipes/mnist5k-vgg.yaml, shortened), SCA vs prune: null.
Export / bench: VGG-16 at 32x32, T = 4 (width 1), trained for one epoch on a small synthetic
dataset written in the CIFAR-10 binary layout (the timing does not depend on the data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml


def run(*args: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one snncompress command in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "snncompress", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would be a running max)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"snncompress {' '.join(args)} failed ({proc.returncode})")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def write_cifar_bin(root: Path, n_train: int = 500, n_test: int = 200) -> None:
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}.bin", n_train // 5) for i in range(1, 6)), ("test_batch.bin", n_test)]:
        labels = rng.integers(0, 10, (n, 1), dtype=np.uint8)
        (d / name).write_bytes(np.concatenate([labels, rng.integers(0, 256, (n, 3072), dtype=np.uint8)], 1).tobytes())
    (d / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("resources.json"))
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snnc-resources-"))
    base = yaml.safe_load(Path("recipes/mnist5k-vgg.yaml").read_text())
    e = args.epochs
    rows = {}
    for label, prune in (("dense", None), ("sca", {**base["prune"], "warmup_epochs": 0, "ramp_epochs": e,
                                                   "finetune_epochs": 0, "update_every": 1})):
        recipe = {**base, "baseline": False, "train": {**base["train"], "epochs": e}, "prune": prune}
        path = work / f"{label}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        seconds, _ = run("train", str(path), "--out", str(work / label))
        metrics = [json.loads(line) for line in (work / label / "metrics.jsonl").read_text().splitlines()]
        rows[f"train_{label}_s_per_epoch"] = float(np.mean([m["seconds"] for m in metrics]))

    write_cifar_bin(work / "cifar")
    vgg = {"name": "vgg16-resources", "model": {"name": "vgg16"}, "data": {"name": "cifar10", "root": str(work / "cifar"),
           "T": 4, "batch_size": 32}, "train": {"epochs": 2, "device": "cpu"},
           "prune": {"keep": 0.25, "regrow": 0.05, "warmup_epochs": 0, "ramp_epochs": 1, "finetune_epochs": 1}}
    (work / "vgg.yaml").write_text(yaml.safe_dump(vgg))
    run("train", str(work / "vgg.yaml"), "--out", str(work / "vgg"))
    run("slim", str(work / "vgg" / "ckpt.pt"), "-o", str(work / "vgg" / "slim.pt"))
    rows["export_vgg16_s"], rows["export_vgg16_peak_rss_mib"] = run("export", str(work / "vgg" / "ckpt.pt"), "--onnx",
                                                                     "-o", str(work / "vgg" / "dense.onnx"))
    rows["bench_vgg16_s"], rows["bench_vgg16_peak_rss_mib"] = run("bench", "--dense", str(work / "vgg" / "ckpt.pt"),
                                                                   "--slim", str(work / "vgg" / "slim.pt"),
                                                                   "-o", str(work / "vgg"), "--repeats", "20")
    result = {"machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "platform": platform.platform()}, "epochs": e, **rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = "\n".join([f"Machine: {result['machine']['processor']}, {result['machine']['cpu_count']} cores.", "",
                    "| measure | value |", "|---|---|", *(f"| {k} | {v:.2f} |" for k, v in rows.items())]) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
