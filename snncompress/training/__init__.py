"""Training with dynamic structured pruning."""

from .loop import TrainResult, evaluate, train

__all__ = ["TrainResult", "evaluate", "train"]
