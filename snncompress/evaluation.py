"""Running a model on a test set: accuracy, and equivalence checks between two models naming the first
layer that differs (used by the stages that must prove their artifact computes the same function)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.neuron import BaseNode

from .data import EVAL_BATCH, eval_batches, to_steps

TOLERANCE = 1e-4
# A runtime's float arithmetic (another conv algorithm, summation order) can move a membrane potential
# that sits at the threshold across it: one spike flips and that sample's logits move by a spike's
# weight (the quickstart baseline: 1 of 360 test samples, |Δlogit| 0.02, same prediction). Up to this
# share of samples may differ so, as long as every prediction is the same; a wrong graph moves them all.
FLIPPED_SHARE = 0.01


def runtime_agreement(got: np.ndarray, reference: np.ndarray) -> dict:
    """How a runtime's logits compare with PyTorch's on a test set, and whether they agree: every
    prediction the same, and every sample's logits within :data:`TOLERANCE` but at most
    :data:`FLIPPED_SHARE` of them (the spikes float rounding flipped at the threshold)."""
    per_sample = np.abs(got - reference).max(1)
    agreement = float((got.argmax(1) == reference.argmax(1)).mean())
    off = int((per_sample > TOLERANCE).sum())
    return {"samples": len(per_sample), "max_abs_diff": float(per_sample.max()), "same_predictions": agreement == 1,
            "agreement": agreement, "samples_off": off, "ok": agreement == 1 and off <= FLIPPED_SHARE * len(per_sample)}


@torch.no_grad()
def batch_logits(run: Callable[[torch.Tensor], torch.Tensor | np.ndarray], x: torch.Tensor, T: int, encoding: str,
                 batch_size: int = EVAL_BATCH) -> np.ndarray:
    """The logits ``run`` gives for dataset samples ``x``, batch by batch: ``run`` takes a batch of model inputs
    (:func:`~snncompress.data.eval_batches`: the same spikes for every model and runtime compared) and returns
    its logits (a PyTorch model, a runtime session, a NIR simulation)."""
    out = [run(inp) for inp in eval_batches(x, T, encoding, batch_size)]
    return np.concatenate([o.detach().float().cpu().numpy() if torch.is_tensor(o) else np.asarray(o) for o in out])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, T: int, encoding: str = "direct",
             batch_size: int = EVAL_BATCH) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, logits) of a multi-step model on a normalised image set."""
    model.eval()
    device = next(model.parameters()).device

    def run(inp: torch.Tensor) -> torch.Tensor:
        try:
            return model(to_steps(inp, T, encoding).to(device))
        finally:
            functional.reset_net(model)

    out = torch.from_numpy(batch_logits(run, x, T, encoding, batch_size))
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item(), out


@dataclass
class Equivalence:
    n_samples: int
    max_abs_diff: float
    same_predictions: bool
    first_bad_layer: str | None = None
    float64: Equivalence | None = None  # the float64 re-check, run where float32 disagrees

    @property
    def exact(self) -> bool:
        """Same predictions and logits within :data:`TOLERANCE`."""
        return self.same_predictions and self.max_abs_diff <= TOLERANCE

    @property
    def ok(self) -> bool:
        """Exact in float32, or, where float32 rounding flipped a spike, exact in float64."""
        return self.exact or (self.float64 is not None and self.float64.exact)


def _neuron_outputs(model: nn.Module, x_seq: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    outs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o))
               for n, m in model.named_modules() if isinstance(m, BaseNode)]
    try:
        logits = model(x_seq)
    finally:
        for h in handles:
            h.remove()
        functional.reset_net(model)
    return logits, outs


@torch.no_grad()
def compare_models(reference: nn.Module, candidate: nn.Module, x: torch.Tensor, T: int, encoding: str,
                   kept: dict[str, torch.Tensor] | None = None, batch_size: int = EVAL_BATCH,
                   recheck_float64: bool = True) -> Equivalence:
    """Compare logits of ``candidate`` against ``reference`` on images ``x``.

    ``kept`` maps a neuron name to the reference channels the candidate still has, so that on a
    mismatch the first neuron whose spikes differ can be named. Where float32 disagrees and
    ``recheck_float64``, both models are compared again in float64 (on copies): removing channels
    changes the order of a conv's sums, and in float32 that can flip a spike whose membrane
    potential sits exactly at the threshold; a correct rewrite agrees in float64, a wrong one does not.
    """
    reference.eval()
    candidate.eval()
    worst, same, bad = 0.0, True, None
    for inp in eval_batches(x, T, encoding, batch_size):
        x_seq = to_steps(inp, T, encoding)
        ref, ref_spikes = _neuron_outputs(reference, x_seq)
        out, out_spikes = _neuron_outputs(candidate, x_seq)
        worst = max(worst, (ref - out).abs().max().item())
        same &= bool((ref.argmax(1) == out.argmax(1)).all())
        if bad is None and (not same or worst > TOLERANCE):
            bad = _first_differing(ref_spikes, out_spikes, kept or {})
    eq = Equivalence(len(x), worst, same, bad if not (same and worst <= TOLERANCE) else None)
    if not eq.exact and recheck_float64 and x.dtype == torch.float32:
        eq.float64 = compare_models(copy.deepcopy(reference).double(), copy.deepcopy(candidate).double(),
                                    x.double(), T, encoding, kept, batch_size, recheck_float64=False)
    return eq


def _first_differing(ref: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
                     kept: dict[str, torch.Tensor]) -> str:
    for name, r in ref.items():
        o = out.get(name)
        if name in kept:
            r = r.index_select(-3, kept[name].nonzero().flatten())
        if o is None or o.shape != r.shape or not torch.equal(o, r):
            return name
    return "classifier"
