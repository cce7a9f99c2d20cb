"""Offline datasets, loaded into memory as normalised tensors with a seeded stratified split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..recipe import DataCfg


@dataclass
class Dataset:
    x_train: torch.Tensor  # [N, C, H, W], normalised
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: float
    std: float

    @property
    def input_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])

    def meta(self, cfg: DataCfg) -> dict:
        """What later stages need to rebuild the inputs (stored in checkpoints and ONNX metadata)."""
        return {"name": cfg.name, "T": cfg.T, "encoding": cfg.encoding, "input_shape": self.input_shape,
                "mean": self.mean, "std": self.std, "classes": self.classes}


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()  # 1797 real 8x8 images, pixel values 0..16, shipped with scikit-learn
    return (d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64), [str(c) for c in d.target_names]


_LOADERS = {"digits": _digits}


def load_dataset(cfg: DataCfg, seed: int) -> Dataset:
    """Load ``cfg.name``, split it (stratified, seeded), normalise with the training set's statistics."""
    x, y, classes = _LOADERS[cfg.name]()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=cfg.test_fraction, random_state=seed, stratify=y)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    norm = lambda a: torch.from_numpy((a - mean) / std)  # noqa: E731
    return Dataset(norm(x_tr), torch.from_numpy(y_tr), norm(x_te), torch.from_numpy(y_te), classes, mean, std)
