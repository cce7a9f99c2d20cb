"""The slim stage: physically remove gated channels from a checkpoint and prove nothing changed."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import CKPT_FORMAT, SLIM_FORMAT, check_output, load_checkpoint, save_torch, sha256
from ..checkpoint import example_input, model_from_checkpoint, recipe_of
from ..data import encode, load_dataset
from ..errors import SnnCompressError, VerificationError
from ..evaluation import Equivalence, compare_models
from ..metrics import count_macs, count_params
from ..prune.gates import gate_modules, neuron_of
from ..prune.shapes import apply_index, removed_channels
from ..prune.surgery import kept_index


@dataclass
class SlimResult:
    path: Path
    params: tuple[int, int]  # before, after
    macs: tuple[int, int]  # per inference (all T steps), before, after
    equivalence: Equivalence
    kept: dict[str, tuple[int, int]]  # group -> (kept, total)


def slim_checkpoint(ckpt_path: str | os.PathLike, out_path: str | os.PathLike | None = None,
                    trust_factory: bool = False) -> SlimResult:
    """Slim a training checkpoint into ``out_path`` (default: ``slim.pt`` beside it).

    The slim model is compared with the masked model on the whole test set: identical predictions and
    max |Δlogit| ≤ 1e-4, in float32 or, where float32 rounding flipped a spike at the threshold, in
    float64 (see :func:`~snncompress.evaluation.compare_models`); else :class:`VerificationError` naming
    the first differing layer, and nothing is written. ``trust_factory``: see :func:`snncompress.load_model`.
    """
    ckpt_path = Path(ckpt_path)
    out_path = check_output(out_path or ckpt_path.with_name("slim.pt"), directory=False, inputs=(ckpt_path,))
    ckpt = load_checkpoint(ckpt_path)
    if ckpt["format"] != CKPT_FORMAT:
        raise SnnCompressError(f"{ckpt_path}: already slim (format {ckpt['format']}); slim takes a training checkpoint")
    masked = model_from_checkpoint(ckpt, str(ckpt_path), trust_factory)
    x_ex = example_input(ckpt)
    masks = {g: torch.as_tensor(m, dtype=torch.bool) for g, m in ckpt["masks"].items()}
    if "kept_index" in ckpt:  # train removed the closed channels already (the slim fine-tune): its weights are slim
        state, index = ckpt["state_dict"], ckpt["kept_index"]
    else:
        index = kept_index(masked, masks, x_ex)
        state = apply_index(copy.deepcopy(masked), index).state_dict()
    # weight masks are in dense shapes; the slim weights carry the pruned entries as zeros instead
    out = {**{k: v for k, v in ckpt.items() if k != "weight_masks"}, "format": SLIM_FORMAT, "state_dict": state,
           "kept_index": index, "removed": removed_channels(masks),
           "source_sha256": sha256(ckpt_path)}
    # what is verified is the model as slim.pt will load it (rebuilt from its shapes, no surgery)
    reloaded = model_from_checkpoint(out, str(out_path), trust_factory)

    recipe = recipe_of(ckpt)
    data = load_dataset(recipe.data, recipe.seed)
    kept_by_neuron = {neuron_of(name): gate.mask for name, gate in gate_modules(masked).items()}
    eq = compare_models(masked, reloaded, data.x_test, ckpt["data"]["T"], ckpt["data"]["encoding"], kept_by_neuron)
    if not eq.ok:
        in64 = f"; in float64 max |Δlogit| {eq.float64.max_abs_diff:.3g}" if eq.float64 else ""
        raise VerificationError(
            f"slim model differs from the masked model at layer {eq.first_bad_layer} "
            f"(max |Δlogit| {eq.max_abs_diff:.3g}, same predictions: {eq.same_predictions}{in64}); nothing written"
        )
    x_seq = encode(data.x_test[:1], ckpt["data"]["T"], ckpt["data"]["encoding"])
    out["verification"] = {"n_samples": eq.n_samples, "max_abs_diff": eq.max_abs_diff,
                           "same_predictions": eq.same_predictions,
                           "float64_max_abs_diff": eq.float64.max_abs_diff if eq.float64 else None}
    save_torch(out, out_path)
    return SlimResult(
        out_path, (count_params(masked), count_params(reloaded)),
        (count_macs(masked, x_seq), count_macs(reloaded, x_seq)), eq,
        {g: (int(m.sum()), m.numel()) for g, m in masks.items()},
    )
