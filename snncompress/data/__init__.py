"""Datasets (offline) and input encoders."""

from .datasets import Dataset, load_dataset
from .encoding import EVAL_BATCH, encode, eval_batches, graph_input, to_steps

__all__ = ["EVAL_BATCH", "Dataset", "load_dataset", "encode", "eval_batches", "graph_input", "to_steps"]
