import pytest
import torch
from spikingjelly.activation_based import functional, neuron

import snncompress as sc
from snncompress.errors import MaskError
from snncompress.prune.gates import attach_gates, set_masks
from snncompress.evaluation import compare_models

from .conftest import TINY


def _model(seed=0):
    torch.manual_seed(seed)
    m = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[8, 16, "M", 16, "M", 12])
    attach_gates(m, torch.zeros(2, 1, 8, 8))
    # non-trivial BN statistics so that kept channels spike
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(0.0, 1.0)
    return m.eval()


def test_channel_groups_api():
    groups = sc.channel_groups(_model(), torch.zeros(2, 1, 8, 8))
    assert [(g.name, g.size) for g in groups] == [("features.conv1.conv", 8), ("features.conv2.conv", 16),
                                                  ("features.conv3.conv", 16), ("features.conv4.conv", 12)]
    assert groups[1].convs == ["features.conv2.conv"] and groups[1].gates == ["features.conv2.spike.gate"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slim_equals_masked_including_single_channel_layers(seed):
    model = _model(seed)
    x = torch.randn(64, 1, 8, 8) * 2
    groups = sc.channel_groups(model, x[:2])
    gen = torch.Generator().manual_seed(seed)
    keep = {g.name: torch.rand(g.size, generator=gen) < 0.4 for g in groups}
    keep["features.conv2.conv"] = torch.zeros(16, dtype=torch.bool)
    keep["features.conv2.conv"][5] = True  # a layer left with a single channel
    for m in keep.values():
        m[0] |= not m.any()
    set_masks(model, groups, keep)
    slim = sc.slim(model, keep, x[:2])
    convs = [m for m in slim.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [int(keep[g.name].sum()) for g in groups]
    assert not any(isinstance(m, sc.ChannelGate) for m in slim.modules())
    eq = compare_models(model, slim, x, T=4, encoding="direct")
    assert eq.ok, eq
    with torch.no_grad():
        spikes = model(x.unsqueeze(0).repeat(4, 1, 1, 1, 1))
    functional.reset_net(model)
    assert spikes.abs().sum() > 0  # the test is not vacuous


def test_slim_rejects_empty_mask_and_wrong_shape():
    model = _model()
    with pytest.raises(MaskError, match="keeps no channel"):
        sc.slim(model, {"features.conv1.conv": torch.zeros(8, dtype=torch.bool)}, torch.zeros(2, 1, 8, 8))
    with pytest.raises(MaskError, match="8 channels"):
        sc.slim(model, {"features.conv1.conv": torch.ones(3, dtype=torch.bool)}, torch.zeros(2, 1, 8, 8))


def test_verification_names_the_first_differing_layer():
    model = _model()
    x = torch.randn(32, 1, 8, 8) * 2
    slim = sc.slim(model, {}, x[:2])
    with torch.no_grad():
        slim.features.conv3.conv.weight.mul_(-3.0)  # corrupt one layer
    eq = compare_models(model, slim, x, T=4, encoding="direct")
    assert not eq.ok and eq.first_bad_layer == "features.conv3.spike"


def test_slim_checkpoint_refuses_and_writes_nothing_when_not_equivalent(tmp_path, monkeypatch):
    import snncompress.stages.slim as slim_mod

    masked = sc.train(sc.parse_recipe({**TINY, "train": {**TINY["train"], "slim_finetune": False}}),
                      tmp_path / "masked", progress=False)
    real = slim_mod.apply_index

    def corrupting(model, index):
        out = real(model, index)
        with torch.no_grad():
            out.features.conv2.conv.weight.mul_(-5.0)
        return out

    monkeypatch.setattr(slim_mod, "apply_index", corrupting)
    target = tmp_path / "out" / "slim.pt"
    with pytest.raises(sc.VerificationError, match="features.conv2.spike"):
        sc.slim_checkpoint(masked.ckpt, target)
    assert not target.parent.exists() or not list(target.parent.iterdir())


def test_a_slim_trained_checkpoint_whose_cut_does_not_match_its_weights_is_refused(run_dir, tmp_path):
    ckpt = torch.load(run_dir / "train" / "ckpt.pt", weights_only=True)
    assert "kept_index" in ckpt  # the tiny run fine-tunes its last epoch slim
    index = ckpt["kept_index"]
    cut = index["features.conv2.conv.weight"][0]  # conv2 fires in the tiny run (see the test above)
    index["features.conv2.conv.weight"][0] = [i for i in range(len(cut) + 1) if i != cut[0]][:len(cut)]  # valid, wrong
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(sc.VerificationError, match="differs from the masked model"):
        sc.slim_checkpoint(tmp_path / "ckpt.pt", tmp_path / "slim.pt")
    assert not (tmp_path / "slim.pt").exists()


def test_slim_equals_masked_with_a_spatial_readout():
    # readout_pool 2: each kept channel of the last conv feeds 4 inputs of the linear readout
    torch.manual_seed(0)
    model = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[8, "M", 12], readout_pool=2)
    x = torch.randn(32, 1, 8, 8) * 2
    attach_gates(model, x[:2])
    model.eval()
    groups = sc.channel_groups(model, x[:2])
    keep = {g.name: torch.arange(g.size) % 3 == 1 for g in groups}
    set_masks(model, groups, keep)
    slim = sc.slim(model, keep, x[:2])
    assert slim.classifier.in_features == int(keep["features.conv2.conv"].sum()) * 4
    assert compare_models(model, slim, x, T=4, encoding="direct").ok


class _HandSummed(torch.nn.Module):
    """h = (x0*w0 + x1*w1) + x2*w2 with the channels taken in ``order``, then an IF neuron whose
    threshold 1 + 2^-23 the exact sum hits: float32 rounding of the sum depends on the order."""

    def __init__(self, order, w=(1.0, 2.0 ** -24, 2.0 ** -24)):
        super().__init__()
        self.order, self.w = order, w
        self.sn = neuron.IFNode(v_threshold=1.0 + 2.0 ** -23, step_mode="m")
        self.fc = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc.bias.zero_()

    def forward(self, x_seq):  # [T, B, 3, 1, 1] -> [B, 2]
        a, b, c = (x_seq[:, :, i, 0, 0] * self.w[i] for i in self.order)
        return self.fc(self.sn(((a + b) + c).unsqueeze(-1))).mean(0)


def test_float32_rounding_flip_is_rechecked_in_float64_and_a_real_difference_is_not_excused():
    x = torch.ones(4, 3, 1, 1)
    flipped = compare_models(_HandSummed((0, 1, 2)), _HandSummed((1, 2, 0)), x, T=2, encoding="direct")
    assert not flipped.exact and flipped.max_abs_diff > 0.1  # float32: a spike flipped
    assert flipped.float64.exact and flipped.float64.max_abs_diff == 0 and flipped.ok
    # a weight changed by 2^-30: rounds to the same float32 spikes as the flip above, not in float64
    wrong = _HandSummed((1, 2, 0), w=(1.0, 2.0 ** -24, 2.0 ** -24 - 2.0 ** -30))
    eq = compare_models(_HandSummed((0, 1, 2)), wrong, x, T=2, encoding="direct")
    assert not eq.exact and not eq.float64.exact and not eq.ok
