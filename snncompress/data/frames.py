"""Event data already integrated into frames: ``root/<class>/<sample>.npz`` holding ``frames [T, 2, H, W]``.

This is the layout spikingjelly writes when it integrates DVS128 Gesture or CIFAR10-DVS events into
frames. ``root`` has either ``train/`` and ``test/`` subfolders (each with one folder per class) or
the class folders directly (then a seeded split is made).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import SnnCompressError


def load_frames(root: str | Path, T: int) -> tuple[list[str], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """``(classes, (x, y) train-or-all, (x, y) test or None)``; x float32 ``[N, T, C, H, W]``."""
    root = Path(root)
    if not root.is_dir():
        raise SnnCompressError(f"{root}: no such frames directory")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _classes(root / "train")
        return classes, _read_split(root / "train", classes, T), _read_split(root / "test", classes, T)
    classes = _classes(root)
    return classes, _read_split(root, classes, T), None


def _classes(d: Path) -> list[str]:
    classes = sorted(p.name for p in d.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise SnnCompressError(f"{d}: expected one subfolder per class (at least 2) holding .npz files")
    return classes


def _read_split(d: Path, classes: list[str], T: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys, shape = [], [], None
    for label, c in enumerate(classes):
        if not (d / c).is_dir():
            raise SnnCompressError(f"{d}: class folder '{c}' is missing (classes: {', '.join(classes)})")
        for f in sorted((d / c).glob("*.npz")):
            x = _read_sample(f)
            if x.shape[0] != T:
                raise SnnCompressError(f"{f}: holds {x.shape[0]} time steps, the recipe's data.T is {T}")
            if shape is None:
                shape = x.shape
            elif x.shape != shape:
                raise SnnCompressError(f"{f}: frames of shape {list(x.shape)}, expected {list(shape)} like the others")
            xs.append(x)
            ys.append(label)
    if not xs:
        raise SnnCompressError(f"{d}: no .npz samples found")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _read_sample(f: Path) -> np.ndarray:
    try:
        with np.load(f, allow_pickle=False) as z:
            if "frames" not in z.files:
                raise SnnCompressError(f"{f}: no 'frames' array (found: {', '.join(z.files) or 'nothing'})")
            x = z["frames"]
    except SnnCompressError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SnnCompressError(f"{f}: not a readable .npz file ({type(e).__name__})") from e
    if x.ndim != 4 or x.shape[1] != 2 or not np.issubdtype(x.dtype, np.number):
        raise SnnCompressError(f"{f}: 'frames' must be numeric [T, 2, H, W], got {x.dtype} {list(x.shape)}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise SnnCompressError(f"{f}: 'frames' holds NaN or infinite values")
    return x
