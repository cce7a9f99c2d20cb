"""The built-in methods' own options (``prune.options`` in a recipe), torch-free so that the recipe schema checks
them before torch is imported. Each method class names its model (``Options = ...``); the registry's declaration
of a built-in method points at the same model, and a test checks that both agree.

A method of your own declares its options the same way: a pydantic model as the class attribute ``Options``
(docs/methods.md, "Adding a method").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import PQIndex


class MethodOptions(BaseModel):
    """The base of a method's options (unknown keys refused); with no fields, a method without options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CriticalityOptions(MethodOptions):
    """``criticality`` (Chen et al.)."""

    l1_gamma: float = Field(1e-4, ge=0)  # weight of the L1 penalty on BN gamma in the loss
    # update: at each mask update, in eval mode over the training set (the paper's); training: in train mode over
    # the training batches of the update window (cheaper for a large training set)
    measure: Literal["update", "training"] = "update"
    batches: int | None = Field(None, ge=1, le=1 << 20)  # measure update: the first n training batches; null: all


class CriticalityWeightOptions(MethodOptions):
    """``criticality_unstructured`` (Chen et al.)."""

    weight_regrow: float = Field(0.5, ge=0, lt=1)  # share r of the kept weights chosen by channel criticality


class PQOptions(PQIndex):
    """``pq`` (Shen et al.): the PQ index constants (as ``budget: pq`` takes them) and the rewiring."""

    scope: Literal["layer", "neuron"] = "layer"  # PQ index and rewiring count per layer or per output neuron
    er_init: bool = True  # Erdos-Renyi(-kernel) per-layer densities at init (false: the same density everywhere)
