"""Unstructured pruning (issue 4): schedule, magnitude/criticality split, ER densities, PQ rewiring counts,
weight-mask enforcement and storage, effective SOPs, then training, slimming and exact resume."""

import math

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based.op_counter import DispatchCounterMode, MACCounter, SynOpCounter

import snncompress
from snncompress.metrics import NonzeroMACCounter, NonzeroSynOpCounter, weight_counts
from snncompress.errors import RecipeError
from snncompress.prune.gates import ChannelGroup
from snncompress.prune.options import PQOptions
from snncompress.prune.pq import pq_index
from snncompress.prune.schedule import sparsity_at
from snncompress.prune.unstructured import magnitude_criticality_masks, pq_rewire
from snncompress.prune.weights import (WeightMasks, channel_masks, ensure_rows, er_densities, pack_masks,
                                       unpack_masks)
from snncompress.config import PruneCfg, parse_recipe

from .conftest import TINY, cli, kill_training_after, write_recipe

UNSTRUCTURED_PRUNE = {"warmup_epochs": 1, "ramp_epochs": 2, "finetune_epochs": 1, "min_channels": 1}


def _cfg(**kw) -> PQOptions:
    return PQOptions(**kw)


# --- arithmetic ------------------------------------------------------------------------------------

def test_sparsity_schedule_is_cubic():
    cfg = PruneCfg(method="criticality_unstructured", sparsity=0.8, warmup_epochs=2, ramp_epochs=4)
    # s_t = 0.8 (1 - (1 - t/4)^3), t = epoch - 2 + 1
    expected = [0.0, 0.0, 0.8 * (1 - 0.75 ** 3), 0.8 * (1 - 0.5 ** 3), 0.8 * (1 - 0.25 ** 3), 0.8, 0.8]
    assert [sparsity_at(cfg, e) for e in range(7)] == pytest.approx(expected)
    assert sparsity_at(cfg, 2) == pytest.approx(0.4625) and sparsity_at(cfg, 3) == pytest.approx(0.7)


def _split_case():
    # layer a: 2 output channels (criticality 0.1, 0.9); layer b: no spiking neuron after it (no criticality)
    w = {"a": torch.tensor([[5.0, 1.0], [0.5, -4.0]]), "b": torch.tensor([[3.0, -0.2, 2.0]])}
    return w, {"a": torch.tensor([0.1, 0.9]), "b": None}


def test_magnitude_criticality_split_hand():
    w, crit = _split_case()
    # |w| order: a00 5, a11 4, b0 3, b2 2, a01 1, a10 0.5, b1 0.2
    # keep 4, r = 0.5: 2 by magnitude (a00, a11), 2 by criticality among the rest: a10 (channel 0.9), a01 (0.1)
    m = magnitude_criticality_masks(w, crit, n_keep=4, regrow_share=0.5)
    assert m["a"].tolist() == [[True, True], [True, True]] and m["b"].tolist() == [[False, False, False]]
    # r = 0.25: round_half_up(1) = 1 by criticality (a10), 3 by magnitude (a00, a11, b0)
    m = magnitude_criticality_masks(w, crit, n_keep=4, regrow_share=0.25)
    assert m["a"].tolist() == [[True, False], [True, True]] and m["b"].tolist() == [[True, False, False]]
    # r = 0: plain global magnitude
    m = magnitude_criticality_masks(w, crit, n_keep=4, regrow_share=0.0)
    assert m["a"].tolist() == [[True, False], [False, True]] and m["b"].tolist() == [[True, False, True]]
    # keep 5, r = 0.5: round_half_up(2.5) = 3 by criticality: a10, a01, then (no criticality left) b by |w|: b0
    m = magnitude_criticality_masks(w, crit, n_keep=5, regrow_share=0.5)
    assert m["a"].all() and m["b"].tolist() == [[True, False, False]]


def test_er_density_formula_hand():
    # conv (4, 2, 3, 3): n = 72, raw = (4 + 2 + 3 + 3) / 72 = 1/6; linear (10, 4): n = 40, raw = 14/40 = 0.35
    shapes = [(4, 2, 3, 3), (10, 4)]
    # density 0.5: eps = 56 / (72/6 + 0.35 * 40) = 56/26 -> (1/6 * 56/26, 0.35 * 56/26)
    assert er_densities(shapes, 0.5) == pytest.approx([56 / 26 / 6, 0.35 * 56 / 26])
    # density 0.8: eps = 89.6/26 puts the linear at 1.206 > 1 -> dense; eps = (89.6 - 40) / 12 for the conv
    d = er_densities(shapes, 0.8)
    assert d == pytest.approx([49.6 / 72, 1.0])
    assert sum(di * n for di, n in zip(d, (72, 40))) == pytest.approx(0.8 * 112)


def test_pq_rewire_counts_layer_scope_hand():
    # one row, kept [8, 1, 1] (positions 0, 1, 3): ||.||_0.5 = (sqrt 8 + 2)^2, ||.||_1 = 10,
    # I = 1 - 3^-1 (sqrt 8 + 2)^2 / 10 = 0.22288, ratio = I (p = 0.5, q = 1, eta = 0), n = round_half_up(0.669) = 1
    w = torch.tensor([[8.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, True, False, False]])
    grad = torch.tensor([[9.0, 0.0, 5.0, 0.0, -7.0, 1.0]])
    i = 1 - (math.sqrt(8) + 2) ** 2 / 30
    assert pq_index(w[mask]) == pytest.approx(i)
    new, n = pq_rewire(w, mask, grad, _cfg())
    # prune the smallest kept (1 at position 1; the tie with position 3 goes to the lower index), regrow the
    # largest |grad| among the previously pruned (|-7| at position 4; position 0's 9 is already kept)
    assert n == 1 and new.tolist() == [[True, False, False, True, True, False]]
    # gamma = 3: ratio = min(3 I, 0.9) = 0.669 -> n = round_half_up(2.006) = 2: prune 1 and 3, regrow 4 and 2
    new, n = pq_rewire(w, mask, grad, _cfg(gamma=3.0))
    assert n == 2 and new.tolist() == [[True, False, True, False, True, False]]
    assert int(new.sum()) == int(mask.sum())  # rewiring keeps the count


def test_pq_rewire_counts_neuron_vs_layer_scope_hand():
    w = torch.tensor([[8.0, 1.0, 1.0, 0.0], [3.0, 3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    grad = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 0.5]])
    # neuron: row 0 kept [8, 1, 1] -> I = 0.22288, n = 1: prune (0,1), regrow (0,3); row 1 [3, 3] is flat, I = 0, n = 0
    new, n = pq_rewire(w, mask, grad, _cfg(scope="neuron"))
    assert n == 1 and new.tolist() == [[True, False, True, True], [True, True, False, False]]
    # layer: kept [8, 1, 1, 3, 3]: ||.||_0.5 = (sqrt 8 + 2 + 2 sqrt 3)^2 = 68.766, ||.||_1 = 16,
    # I = 1 - 68.766 / 80 = 0.14043 -> n = round_half_up(0.702) = 1: prune (0,1), regrow the largest |grad|: (1,2)
    i = 1 - (math.sqrt(8) + 2 + 2 * math.sqrt(3)) ** 2 / 80
    assert pq_index(w[mask]) == pytest.approx(i)
    new, n = pq_rewire(w, mask, grad, _cfg(scope="layer"))
    assert n == 1 and new.tolist() == [[True, False, True, False], [True, True, True, False]]
    # beta caps the ratio: beta = 0.1 -> n = round_half_up(0.1 * 5) = 1 still; a fully kept layer cannot rewire
    assert pq_rewire(w, torch.ones_like(mask), grad, _cfg())[1] == 0


def test_ensure_rows_reopens_the_strongest_empty_rows():
    mask = torch.tensor([[False, False], [True, False], [False, False]])
    score = torch.tensor([[0.5, 0.7], [1.0, 1.0], [0.9, 0.1]])
    assert ensure_rows(mask, score, 1).equal(mask)  # one non-empty row already
    # two rows needed: row 2 (best entry 0.9 at column 0) beats row 0 (0.7)
    assert ensure_rows(mask, score, 2).tolist() == [[False, False], [True, False], [True, False]]
    assert ensure_rows(mask, score, 5).tolist() == [[False, True], [True, False], [True, False]]


# --- masks: storage and enforcement ----------------------------------------------------------------

def test_masks_pack_to_bits_and_load_weights_only(tmp_path):
    torch.manual_seed(0)
    masks = {"a": torch.rand(5, 3, 3, 3) > 0.5, "b": torch.rand(10, 7) > 0.8}
    packed = pack_masks(masks)
    assert packed["a"]["bits"].dtype == torch.uint8 and packed["a"]["bits"].numel() == math.ceil(135 / 8)
    torch.save({"weight_masks": packed}, tmp_path / "m.pt")
    loaded = unpack_masks(torch.load(tmp_path / "m.pt", weights_only=True)["weight_masks"])
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)


class _ConvLin(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2, bias=False)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_weight_mask_enforced_in_forward_gradient_and_optimizer():
    torch.manual_seed(0)
    net = _ConvLin()
    keys = set(net.state_dict())
    wm = WeightMasks({"conv": net.conv, "fc": net.fc})
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool).view(2, 1, 2, 2)
    wm.set({"conv": mask})
    assert torch.equal(net.conv.weight != 0, mask)
    assert set(net.state_dict()) == keys  # no extra parameters or buffers
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    assert all(p is not m for p in net.parameters() for m in wm.masks.values())
    x = torch.randn(4, 1, 2, 2)
    with torch.no_grad():
        net.conv.weight[0, 0, 0, 1] = 7.0  # a pruned weight changed from outside: the forward still sees 0
    expected = nn.functional.linear(nn.functional.conv2d(x, net.conv.weight * mask).flatten(1), net.fc.weight, net.fc.bias)
    assert torch.allclose(net(x), expected)
    for _ in range(5):
        opt.zero_grad()
        net(x).sum().backward()
        assert net.conv.weight.grad[~mask].abs().sum() > 0  # the dense gradient (pq's regrowth signal) ...
        wm.mask_grads()
        assert net.conv.weight.grad[~mask].eq(0).all()  # ... is cut before the optimiser sees it
        opt.step()
        assert net.conv.weight[~mask].eq(0).all()  # momentum and weight decay act on w = 0, g = 0
    # a mask change resets the optimiser state of the changed entries: a regrown weight starts from 0, no momentum
    new = mask.clone()
    new[0, 0, 0, 1] = True
    changed = {"conv": mask ^ new, "fc": torch.zeros_like(wm.masks["fc"])}
    buf = opt.state[net.conv.weight]["momentum_buffer"]
    kept_before = buf[mask].clone()
    wm.set({"conv": new})
    wm.reset_optimizer_state(opt, changed)
    assert buf[0, 0, 0, 1] == 0 and torch.equal(buf[mask], kept_before)
    assert net.conv.weight[0, 0, 0, 1] == 0
    wm.remove()


def test_channel_masks_close_empty_filters():
    masks = {"a": torch.tensor([[True, False], [False, False], [False, True]]),
             "b": torch.tensor([[False, False], [False, False], [True, False]])}
    groups = [ChannelGroup("a", 3, ["a"]), ChannelGroup("ab", 3, ["a", "b"])]
    got = channel_masks(masks, groups)
    assert got["a"].tolist() == [True, False, True] and got["ab"].tolist() == [True, False, True]
    masks["b"][1, 0] = True  # a coupled group keeps a channel if any member filter has a weight
    assert channel_masks(masks, groups)["ab"].tolist() == [True, True, True]


# --- effective SOPs --------------------------------------------------------------------------------

def test_nonzero_synops_hand_counts():
    # a 3x3 spike map with spikes at the corner (0,0) and the centre; a 3x3 conv, padding 1, non-zero taps
    # (0,0), (1,1), (2,2), (0,2). The corner spike reaches 4 outputs (taps kh, kw <= 1), 2 of them through
    # non-zero taps; the centre spike reaches all 9 outputs, 4 through non-zero taps: 13 SOPs, 6 effective.
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 0, 0] = x[0, 0, 1, 1] = 1.0
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for kh, kw in [(0, 0), (1, 1), (2, 2), (0, 2)]:
            conv.weight[0, 0, kh, kw] = 0.5
    # linear: spikes [1, 0, 1] into W = [[1, 0, 2], [0, 0, 3]]: 2 spikes x 2 outputs = 4; non-zero: 1 + 2 = 3
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]))
    for module, inp, dense, effective in [(conv, x, 13, 6), (lin, torch.tensor([[1.0, 0.0, 1.0]]), 4, 3)]:
        a, b = SynOpCounter(), NonzeroSynOpCounter()
        with torch.no_grad(), DispatchCounterMode([a, b]):
            module(inp)
        assert (a.get_total(), b.get_total()) == (dense, effective)
    assert weight_counts(lin) == {"weights": 6, "nonzero_weights": 3, "connectivity": 0.5}
    # analog input (the first layer): MACCounter counts 9 taps x 9 positions; 4 non-zero taps x 9 effective
    a, b = MACCounter(), NonzeroMACCounter()
    with torch.no_grad(), DispatchCounterMode([a, b]):
        conv(torch.randn(1, 1, 3, 3))
        lin(torch.randn(1, 3))
    assert (a.get_total(), b.get_total()) == (81 + 6, 36 + 3)


def test_nonzero_synops_equal_spikingjelly_without_zero_weights():
    torch.manual_seed(0)
    net = snncompress.create_model("vgg", in_channels=1, num_classes=10, layers=[8, 16, "M", 16]).eval()
    a, b = SynOpCounter(), NonzeroSynOpCounter()
    with torch.no_grad(), DispatchCounterMode([a, b]):
        net(torch.randn(2, 3, 1, 8, 8) * 3)
    assert a.get_total() == b.get_total() > 0
    with torch.no_grad():  # zero half of the second conv's weights: fewer effective SOPs
        net.features.conv2.conv.weight[:, :4] = 0
    a, b = SynOpCounter(), NonzeroSynOpCounter()
    with torch.no_grad(), DispatchCounterMode([a, b]):
        net(torch.randn(2, 3, 1, 8, 8) * 3)
    assert 0 < b.get_total() < a.get_total()


# --- recipe ----------------------------------------------------------------------------------------

def test_unstructured_recipe_fields_validated():
    r = parse_recipe({"prune": {"method": "pq", "sparsity": 0.9, "options": {"scope": "neuron", "er_init": False}}})
    assert r.prune.unstructured and r.prune.sparsity == 0.9 and r.prune.options["scope"] == "neuron"
    assert parse_recipe({"prune": {"method": "criticality_unstructured", "sparsity": 0.5}}).prune.options == \
        {"weight_regrow": 0.5}
    # pq has no ramp: warm-up + fine-tune must fit, the (unused) ramp does not count
    assert parse_recipe({"train": {"epochs": 4}, "prune": {"method": "pq", "sparsity": 0.5, "warmup_epochs": 1,
                                                            "finetune_epochs": 1}}).prune.ramp_epochs == 8
    for bad, msg in [({"method": "pq"}, "prune.sparsity: required for method pq"),
                     ({"method": "pq", "sparsity": 1.0}, "prune.sparsity: must be in [0, 1)"),
                     ({"method": "pq", "sparsity": 0.5, "keep": 0.5}, "prune.keep: only for structured methods"),
                     ({"method": "pq", "sparsity": 0.5, "budget": "pq"}, "prune.budget: only for structured"),
                     ({"method": "sca", "sparsity": 0.5}, "prune.sparsity: only for unstructured methods; method sca keeps channels"),
                     ({"method": "sca", "options": {"scope": "neuron"}}, "prune.options: method sca has no options"),
                     ({"method": "criticality_unstructured", "sparsity": 0.5, "options": {"er_init": False}},
                      "prune.options.er_init: unknown key; allowed: weight_regrow"),
                     ({"method": "pq", "sparsity": 0.5, "options": {"weight_regrow": 0.2}},
                      "prune.options.weight_regrow: unknown key"),
                     ({"method": "pq", "sparsity": 0.5, "options": {"scope": "filter"}}, "prune.options.scope")]:
        with pytest.raises(RecipeError) as e:
            parse_recipe({"prune": bad})
        assert msg in str(e.value), str(e.value)


# --- training, checkpoint, slim --------------------------------------------------------------------

def _unstructured_recipe(method: str, **prune) -> dict:
    return {**TINY, "prune": {**UNSTRUCTURED_PRUNE, "method": method, "sparsity": 0.8, **prune}}


@pytest.fixture(scope="module")
def trained_unstructured(tmp_path_factory) -> dict[str, tuple]:
    out = {}
    for name, method, extra in [("pq", "pq", {}), ("pq-neuron", "pq", {"scope": "neuron", "er_init": False}),
                                ("crit", "criticality_unstructured", {})]:
        d = tmp_path_factory.mktemp(name)
        res = snncompress.train(parse_recipe(_unstructured_recipe(method, **extra)), d, progress=False)
        out[name] = (res, torch.load(res.ckpt, weights_only=True))
    return out


def _conv_linear(sd: dict) -> dict[str, torch.Tensor]:
    return {k.removesuffix(".weight"): v for k, v in sd.items() if k.endswith(".weight") and v.dim() in (2, 4)}


@pytest.mark.parametrize("name", ["pq", "pq-neuron", "crit"])
def test_unstructured_training_reaches_the_sparsity_with_weights_zeroed(trained_unstructured, name):
    res, ckpt = trained_unstructured[name]
    masks = unpack_masks(ckpt["weight_masks"])
    weights = _conv_linear(ckpt["state_dict"])
    assert set(masks) == set(weights)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    # the target up to rounding and the one-weight-per-filter floor (min_channels 1: at most 1 per layer)
    assert abs(kept - round(0.2 * total)) <= len(masks) + 1
    for n, w in weights.items():
        assert w[~masks[n]].eq(0).all(), n  # pruned weights are stored as zeros
    assert ckpt["metrics"]["connectivity"] == pytest.approx(kept / total)
    # gates: a channel is closed exactly when its filter is empty
    for group, gate_mask in ckpt["masks"].items():
        assert torch.equal(gate_mask, masks[group].flatten(1).any(1)), group
    assert ckpt["history"] and all(h["sparsity_target"] <= 0.8 + 1e-9 for h in ckpt["history"])


def test_pq_rewiring_keeps_the_count_and_rewires(trained_unstructured):
    for name in ("pq", "pq-neuron"):
        hist = trained_unstructured[name][1]["history"]
        assert len(hist) == 2 and all(h["pruned"] == h["regrown"] > 0 for h in hist), hist
        assert len({h["connectivity"] for h in hist}) == 1


def test_er_init_is_not_uniform(trained_unstructured):
    def densities(name):
        m = unpack_masks(trained_unstructured[name][1]["weight_masks"])
        return {n: round(float(v.float().mean()), 3) for n, v in m.items()}
    er, uniform = densities("pq"), densities("pq-neuron")
    # ER-kernel: the small first conv (1 -> 8) and the readout are denser than the big 16 -> 16 conv
    assert er["features.conv1.conv"] > er["features.conv3.conv"] < er["classifier"]
    assert max(uniform.values()) - min(uniform.values()) < 0.05  # neuron scope keeps each row's count


def test_criticality_unstructured_prunes_gradually(trained_unstructured):
    hist = trained_unstructured["crit"][1]["history"]
    # warm-up 1, ramp 2: s = 0.8 (1 - 0.5^3) = 0.7 after epoch 1, 0.8 after epoch 2
    assert [h["sparsity_target"] for h in hist] == pytest.approx([0.7, 0.8])
    assert hist[0]["connectivity"] > hist[1]["connectivity"]


def test_slim_removes_empty_filters_and_verifies(trained_unstructured, tmp_path):
    res, ckpt = trained_unstructured["crit"]
    r = snncompress.slim_checkpoint(res.ckpt, tmp_path / "slim.pt")
    assert r.equivalence.ok
    slim = torch.load(tmp_path / "slim.pt", weights_only=True)
    assert "weight_masks" not in slim  # dense shapes; the slim weights carry the zeros
    closed = sum(int((~m).sum()) for m in ckpt["masks"].values())
    assert sum(t - k for k, t in r.kept.values()) == closed
    nz_dense = sum(int(w.count_nonzero()) for w in _conv_linear(ckpt["state_dict"]).values())
    nz_slim = sum(int(w.count_nonzero()) for w in _conv_linear(slim["state_dict"]).values())
    assert nz_slim <= nz_dense


# --- exact resume ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_pq_killed_and_resumed_matches_uninterrupted(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {
        **TINY, "train": {"epochs": 6, "optimizer": {"name": "sgd", "lr": 0.1}},
        "prune": {"method": "pq", "sparsity": 0.7, "warmup_epochs": 1, "finetune_epochs": 1, "update_every": 2,
                  "min_channels": 1}})
    assert cli("train", recipe, "--out", tmp_path / "ref").returncode == 0
    out = tmp_path / "killed"
    kill_training_after(recipe, out, 3)  # inside epoch 3: mid-window (updates at the end of epochs 1 and 3)
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] < 5  # killed before the end
    assert cli("train", recipe, "--out", out, "--resume").returncode == 0
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (tmp_path / "ref", out))
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    ma, mb = unpack_masks(a["weight_masks"]), unpack_masks(b["weight_masks"])
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    assert [h["regrown"] for h in a["history"]] == [h["regrown"] for h in b["history"]]
