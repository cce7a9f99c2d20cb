"""Writers of tiny datasets in the official on-disk formats (for tests)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _images(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # class-dependent brightness so that a tiny net can learn something
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    x = rng.integers(0, 80, (n, 3, 32, 32)) + (labels * (170 // max(1, n_classes - 1)))[:, None, None, None]
    return x.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


def write_cifar10_bin(root: Path, n_train: int = 50, n_test: int = 20) -> Path:
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for i in range(1, 6):
        x, y = _images(n_train // 5, 10, i)
        (d / f"data_batch_{i}.bin").write_bytes(np.concatenate([y[:, None].astype(np.uint8), x.reshape(len(x), -1)], 1).tobytes())
    x, y = _images(n_test, 10, 99)
    (d / "test_batch.bin").write_bytes(np.concatenate([y[:, None].astype(np.uint8), x.reshape(len(x), -1)], 1).tobytes())
    (d / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return d


def write_cifar10_py(root: Path, n_train: int = 50, n_test: int = 20) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        x, y = _images(n_train // 5, 10, i)
        _dump(d / f"data_batch_{i}", {b"batch_label": b"training batch", b"labels": y.tolist(),
                                      b"data": x.reshape(len(x), -1), b"filenames": [b"f.png"] * len(x)})
    x, y = _images(n_test, 10, 99)
    _dump(d / "test_batch", {b"batch_label": b"testing batch", b"labels": y.tolist(), b"data": x.reshape(len(x), -1)})
    _dump(d / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072})
    return d


def write_cifar100_py(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x, y = _images(n, 100, seed)
        _dump(d / name, {b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(), b"data": x.reshape(n, -1)})
    _dump(d / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    return d


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are Python 2 pickles (protocol 2)


def write_frames(root: Path, T: int = 2, classes: int = 2, per_class: int = 8, hw: int = 8, split: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for part in (["train", "test"] if split else [""]):
        for c in range(classes):
            d = root / part / f"gesture{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                frames = rng.poisson(0.5 + 2.0 * c, (T, 2, hw, hw)).astype(np.float32)  # event counts
                np.savez(d / f"sample{i}.npz", frames=frames)
    return root
