"""CIFAR-10/100 from a local directory, in the official binary or python layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SnnCompressError
from .safe_pickle import load_pickle

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]

_LAYOUTS = {
    # name: [(folder, kind, train files, test files, class-names file)]
    "cifar10": [("cifar-10-batches-bin", "bin", [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"],
                 "batches.meta.txt"),
                ("cifar-10-batches-py", "py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta")],
    "cifar100": [("cifar-100-binary", "bin", ["train.bin"], ["test.bin"], "fine_label_names.txt"),
                 ("cifar-100-python", "py", ["train"], ["test"], "meta")],
}
_CLASSES = {"cifar10": 10, "cifar100": 100}


def load_cifar(name: str, root: str | Path) -> Arrays:
    """``(x_train, y_train, x_test, y_test, classes)``; images uint8 ``[N, 3, 32, 32]``.

    ``root`` is the extracted archive folder or its parent. Every expected file must be present.
    """
    root = Path(root)
    for folder, kind, train, test, meta in _LAYOUTS[name]:
        d = root if root.name == folder else root / folder
        if d.is_dir():
            missing = [f for f in (*train, *test, meta) if not (d / f).is_file()]
            if missing:
                raise SnnCompressError(f"{d}: incomplete {name} directory, missing {', '.join(missing)}")
            read = _read_bin if kind == "bin" else _read_py
            x_tr, y_tr = _concat([read(d / f, name) for f in train])
            x_te, y_te = _concat([read(d / f, name) for f in test])
            classes = _class_names(d / meta, kind, name)
            return x_tr, y_tr, x_te, y_te, classes
    expected = " or ".join(f"{root}/{folder}/ ({', '.join([*tr, *te, meta])})" for folder, _, tr, te, meta in _LAYOUTS[name])
    raise SnnCompressError(f"{root}: no {name} data found; expected {expected}")


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_bin(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    # records: <label byte> (cifar10) or <coarse byte><fine byte> (cifar100), then 3072 pixel bytes
    label_bytes = 1 if name == "cifar10" else 2
    record = label_bytes + 3072
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise SnnCompressError(f"{path}: size {raw.size} bytes is not a whole number of {record}-byte {name} records")
    raw = raw.reshape(-1, record)
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), raw[:, label_bytes - 1].astype(np.int64)


def _read_py(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle(path)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    if not isinstance(batch, dict) or b"data" not in batch or key not in batch:
        raise SnnCompressError(f"{path}: not a {name} python batch (needs the keys b'data' and {key!r})")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise SnnCompressError(f"{path}: expected uint8 data of shape [N, 3072] and N labels, "
                               f"got {data.dtype} {list(data.shape)} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(path: Path, kind: str, name: str) -> list[str]:
    if kind == "bin":
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        meta = load_pickle(path)
        key = b"label_names" if name == "cifar10" else b"fine_label_names"
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in (meta.get(key, []) if isinstance(meta, dict) else [])]
    if len(names) != _CLASSES[name]:
        raise SnnCompressError(f"{path}: expected {_CLASSES[name]} class names, found {len(names)}")
    return names
