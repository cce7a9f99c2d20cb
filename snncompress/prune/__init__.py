"""Pruning algorithms on a gated model, free of any training loop or file: gates and channel groups,
scorers (the methods), selection, schedules, weight masks, and the :class:`~.pruner.Pruner` protocol."""
