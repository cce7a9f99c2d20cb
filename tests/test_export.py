"""Export-time rewrites: each must leave spikes bitwise identical (or report what changed)."""

import copy

import pytest
import torch
from spikingjelly.activation_based import functional, neuron, surrogate

import snncompress as sc
from snncompress.export.fold import fold_batchnorm
from snncompress.export.onnx import to_onnx
from snncompress.export.unroll import LeanNeuron, UnrolledSNN, lean_neurons
from snncompress.runtime.sessions import ort_session
from snncompress.prune.gates import attach_gates


@pytest.mark.parametrize("kw", [dict(tau=2.0), dict(tau=3.0), dict(tau=2.0, v_reset=None),
                                dict(tau=1.7, decay_input=False), dict(tau=2.0, v_reset=-0.3)])
def test_lean_lif_spikes_are_bitwise_spikingjellys(kw):
    torch.manual_seed(0)
    node = neuron.LIFNode(step_mode="m", surrogate_function=surrogate.ATan(), **kw)
    x = torch.randn(6, 32, 4, 5, 5) * 2
    ref = node(x)
    functional.reset_net(node)
    lean = LeanNeuron(node)
    assert torch.equal(ref, lean(x)) and ref.sum() > 0
    lean.step_mode = "s"  # one call per step, the membrane potential carried between calls
    assert torch.equal(ref, torch.stack([lean(x_t) for x_t in x]))


def test_lean_if_and_gated_neuron():
    node = neuron.IFNode(step_mode="m")
    x = torch.randn(4, 8, 3, 2, 2)
    assert torch.equal(node(x), LeanNeuron(node)(x))
    functional.reset_net(node)
    attach_gates(node, x[:, :2])
    node.gate.set_mask(torch.tensor([True, False, True]))
    ref = node(x)
    assert torch.equal(ref, LeanNeuron(node)(x)) and ref[:, :, 1].sum() == 0


def test_lean_onnx_has_fewer_nodes_and_the_same_logits():
    torch.manual_seed(0)
    model = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[8, "M", 16])
    attach_gates(model, torch.zeros(4, 2, 1, 8, 8))
    model.eval()
    wrapper = UnrolledSNN(model, 4).eval()
    lean = copy.deepcopy(wrapper)
    assert lean_neurons(lean) == 2
    x = torch.randn(5, 1, 8, 8) * 3
    p_sj, p_lean = to_onnx(wrapper, x[:2]), to_onnx(lean, x[:2])
    assert len(p_lean.graph.node) < 0.8 * len(p_sj.graph.node)
    with torch.no_grad():
        ref = wrapper(x).numpy()
    sess = ort_session(p_lean.SerializeToString())
    assert (sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] == ref).all()


def test_fold_batchnorm_finds_every_conv_bn_pair():
    torch.manual_seed(0)
    model = sc.create_model("resnet20", in_channels=3, num_classes=10, width=0.25)
    example = torch.zeros(2, 2, 3, 16, 16)
    attach_gates(model, example)
    model.eval()
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(model, example) == bns > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name,encoding", [("resnet20", "direct"), ("vgg", "poisson")])
@pytest.mark.slow
def test_step_unrolled_graph_has_no_per_layer_split_and_the_same_logits(name, encoding):
    torch.manual_seed(0)
    kw = {"width": 0.125} if name == "resnet20" else {"layers": [8, "M", 16]}
    model = sc.create_model(name, in_channels=3, num_classes=10, **kw)
    attach_gates(model, torch.zeros(2, 2, 3, 8, 8))
    model.eval()
    x = torch.randn(5, 3, 8, 8) * 3 if encoding == "direct" else (torch.rand(5, 2, 3, 8, 8) < 0.4).float()
    with torch.no_grad():
        ref = UnrolledSNN(model, 2, encoding)(x).numpy()
    ops = {}
    for order in ("step", "layer"):
        net = copy.deepcopy(model)
        lean_neurons(net)
        proto = to_onnx(UnrolledSNN(net, 2, encoding, order).eval(), x[:2])
        ops[order] = [n.op_type for n in proto.graph.node]
        sess = ort_session(proto.SerializeToString())
        assert (sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] == ref).all(), order
    # layer order splits every neuron's input into steps and concatenates the spikes again
    assert ops["layer"].count("Split") >= 2 and ops["layer"].count("Concat") >= 2
    assert ops["step"].count("Concat") <= 1 and ops["step"].count("Split") <= (encoding != "direct")
    with pytest.raises(ValueError, match="allowed: step, layer"):
        UnrolledSNN(model, 2, encoding, "time")


def test_runtime_agreement_tolerates_a_spike_flipped_at_the_threshold_but_not_a_wrong_graph():
    import numpy as np

    from snncompress.evaluation import runtime_agreement

    ref = np.tile(np.array([[2.0, 1.0, 0.0]], dtype=np.float32), (200, 1))
    one_flip = ref.copy()
    one_flip[7, 1] += 0.25  # one sample: a flipped spike moves its logits by that spike's weight
    assert runtime_agreement(one_flip, ref) == {"samples": 200, "max_abs_diff": 0.25, "same_predictions": True,
                                                "agreement": 1.0, "samples_off": 1, "ok": True}
    three = ref.copy()
    three[:3, 1] += 0.25  # more than 1 % of the samples: not float rounding
    assert not runtime_agreement(three, ref)["ok"]
    changed = one_flip.copy()
    changed[7, 1] += 2.0  # a changed prediction is never tolerated
    assert not runtime_agreement(changed, ref)["ok"]
    assert not runtime_agreement(ref + 1e-3, ref)["ok"]  # every sample off: a wrong graph
