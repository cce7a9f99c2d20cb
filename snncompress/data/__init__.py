"""Datasets (offline) and input encoders."""

from .datasets import Dataset, load_dataset
from .encoding import encode

__all__ = ["Dataset", "load_dataset", "encode"]
