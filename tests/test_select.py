"""The selector's and schedule's arithmetic on small hand-computed cases."""

import pytest
import torch

from snncompress.prune.schedule import is_update_epoch, keep_fraction_at
from snncompress.prune.select import select_masks
from snncompress.config import PruneCfg


def test_global_selection_by_activity_with_min_per_group():
    act = {"a": torch.tensor([0.9, 0.8, 0.7, 0.6]), "b": torch.tensor([0.1, 0.05, 0.3, 0.2])}
    grow = {n: torch.zeros(4) for n in act}
    # keep 4 of 8; min 1 per group: b keeps its best (0.3 at idx 2), then the 3 globally best of the rest
    m = select_masks(act, grow, keep_fraction=0.5, regrow_fraction=0.0, min_channels=1)
    assert m["a"].tolist() == [True, True, True, False]
    assert m["b"].tolist() == [False, False, True, False]


def test_min_channels_keeps_every_layer_alive():
    act = {"a": torch.tensor([5.0, 4.0, 3.0, 2.0]), "b": torch.tensor([0.0, 0.0, 0.1, 0.0])}
    m = select_masks(act, {n: torch.zeros(4) for n in act}, keep_fraction=0.25, regrow_fraction=0.0, min_channels=1)
    assert m["a"].sum() == 1 and m["b"].tolist() == [False, False, True, False]


def test_regrowth_picks_largest_gradient_among_unselected():
    act = {"a": torch.tensor([0.9, 0.8, 0.0, 0.0]), "b": torch.tensor([0.7, 0.0, 0.0, 0.0])}
    grow = {"a": torch.tensor([100.0, 0.0, 0.2, 0.1]), "b": torch.tensor([0.0, 0.3, 0.0, 5.0])}
    # keep 4 of 8, regrow 1/8 of all channels = 1: activity takes a0, a1, b0; regrowth b3 (5.0)
    # (a0's large gradient does not count: it is already kept)
    m = select_masks(act, grow, keep_fraction=0.5, regrow_fraction=0.125, min_channels=1)
    assert m["a"].tolist() == [True, True, False, False]
    assert m["b"].tolist() == [True, False, False, True]


def test_ties_go_to_lower_index():
    act = {"a": torch.zeros(4)}
    m = select_masks(act, {"a": torch.zeros(4)}, keep_fraction=0.5, regrow_fraction=0.0, min_channels=1)
    assert m["a"].tolist() == [True, True, False, False]


def test_cubic_ramp_schedule():
    cfg = PruneCfg(keep=0.2, regrow=0.1, warmup_epochs=2, ramp_epochs=4, finetune_epochs=2)
    assert keep_fraction_at(cfg, 0) == 1.0 and keep_fraction_at(cfg, 1) == 1.0
    # epoch 2 is the first ramp step: t = 1/4 -> 0.2 + 0.8 * 0.75^3
    assert keep_fraction_at(cfg, 2) == pytest.approx(0.2 + 0.8 * 0.75 ** 3)
    assert keep_fraction_at(cfg, 5) == pytest.approx(0.2)
    assert keep_fraction_at(cfg, 9) == pytest.approx(0.2)
    updates = [e for e in range(10) if is_update_epoch(cfg, 10, e)]
    assert updates == [2, 3, 4, 5, 6, 7]  # none in warm-up, none in the last 2 (frozen fine-tune)


def test_round_masks_fills_up_to_the_multiple_with_best_scores():
    from snncompress.prune.select import round_masks

    masks = {"a": torch.tensor([True, False, False, False, True, False]), "b": torch.tensor([True] * 3 + [False] * 2)}
    scores = {"a": torch.tensor([9.0, 1.0, 5.0, 3.0, 8.0, 4.0]), "b": torch.zeros(5)}
    out = round_masks(masks, scores, 4)
    # a: 2 kept -> 4: add the best closed ones (5.0 at idx 2, 4.0 at idx 5); b: 3 -> 4 (size 5), lowest index on ties
    assert out["a"].tolist() == [True, False, True, False, True, True]
    assert out["b"].tolist() == [True, True, True, True, False]
    assert round_masks({"c": torch.ones(3, dtype=torch.bool)}, {"c": torch.zeros(3)}, 8)["c"].sum() == 3  # capped
