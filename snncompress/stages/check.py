"""The check stage: does a model fit a chip? A NIR file, or a checkpoint laid out as the NIR graph its export
would write, against a registered hardware target's published limits (:mod:`snncompress.targets`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..artifacts import load_checkpoint
from ..checkpoint import model_from_checkpoint
from ..errors import UsageError
from ..registry import TARGETS
from ..targets import TargetReport, core_layers


def check_target(path: str | os.PathLike, target: str = "speck", *, trust_factory: bool = False) -> TargetReport:
    """Check the model in ``path`` (a ``.nir`` file, or a dense or slim checkpoint) against hardware ``target``.

    A checkpoint is laid out as for NIR export (BatchNorm and gates folded, average pools as sum pools), so what
    NIR cannot express (max pooling) is refused in one line, as the export refuses it. Nothing is written.
    """
    from ..export.nir import nir_body, read_nir, to_nir_graph

    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; allowed: {', '.join(TARGETS.names())}")
    path = Path(path)
    if path.suffix == ".nir":
        graph = read_nir(path)
    else:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, str(path), trust_factory)
        example = torch.zeros(2, *ckpt["data"]["input_shape"])
        graph = to_nir_graph(nir_body(model, example), example, {})
    meta = {str(k): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in (graph.metadata or {}).items()}
    return TARGETS.get(target)().check(core_layers(graph), meta)
