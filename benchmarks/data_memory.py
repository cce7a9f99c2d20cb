"""Peak memory (RSS) of a DVS128-Gesture-sized frames dataset: load it, then read every sample once.

Writes the data synthetically in the real layout (spikingjelly's integrated frames: ``train/`` and
``test/``, one folder per class, ``<sample>.npz`` holding ``frames [T, 2, H, W]``): 1,176 training and
288 test samples of 16 x 2 x 128 x 128 (2.5 GB of float32 in all), sparse event counts saved
compressed. The measurement runs in a fresh process (its own peak RSS, from getrusage).

    python benchmarks/data_memory.py --out data_memory.json [--data DIR]
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

T, HW, CLASSES, TRAIN, TEST = 16, 128, 11, 1176, 288

MEASURE = """
import sys, time
from snncompress.config import DataCfg
from snncompress.data import load_dataset
t0 = time.perf_counter()
d = load_dataset(DataCfg(name="frames", root=sys.argv[1], T={T}, encoding="frames", batch_size=16), 0)
loaded = time.perf_counter() - t0
total = 0.0
for x in (d.x_train, d.x_test):
    for i in range(0, len(x), 16):
        total += float(x[i:i + 16].sum())
print(loaded, time.perf_counter() - t0, type(d.x_train).__name__)
""".format(T=T)


def write_frames(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN), ("test", TEST)):
        for i in range(n):
            d = root / split / f"gesture{i % CLASSES:02d}"
            d.mkdir(parents=True, exist_ok=True)
            frames = rng.poisson(0.05, (T, 2, HW, HW)).astype(np.float32)  # sparse event counts
            np.savez_compressed(d / f"sample{i:04d}.npz", frames=frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data_memory.json"))
    ap.add_argument("--data", type=Path, help="reuse frames written by an earlier run")
    args = ap.parse_args()
    root = args.data or Path(tempfile.mkdtemp(prefix="snnc-frames-"))
    if not (root / "train").is_dir():
        t0 = time.perf_counter()
        write_frames(root)
        print(f"wrote {TRAIN + TEST} samples to {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    proc = subprocess.Popen([sys.executable, "-c", MEASURE, str(root)], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    if os.waitstatus_to_exitcode(status):
        raise SystemExit("the measurement failed")
    loaded, total, kind = out.split()
    result = {"machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
              "samples": {"train": TRAIN, "test": TEST}, "sample_shape": [T, 2, HW, HW], "x_type": kind,
              "peak_rss_mib": usage.ru_maxrss / 1024, "load_s": float(loaded), "load_and_read_all_s": float(total),
              "float32_size_mib": (TRAIN + TEST) * T * 2 * HW * HW * 4 / 2**20}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
