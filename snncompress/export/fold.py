"""Folding what inference does not need into the convs: BatchNorm (its affine map), and closed channel gates
(zero rows of every conv whose output reaches them)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import fx
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..models.modules import set_module, step_mode
from ..quant import conv_bn_pairs


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every BatchNorm that directly consumes a conv's output into that conv (in place, eval mode); the
    BatchNorm becomes an ``nn.Identity``. Returns the number of folds.

    The pairs are found by tracing one single-step forward. Folding changes float rounding, so a membrane
    potential sitting exactly at the threshold can flip a spike: check the folded model's predictions
    (``export_onnx(fold_bn=True)`` reports the agreement).
    """
    model.eval()
    modules = dict(model.named_modules())
    pairs = conv_bn_pairs(model, example)
    for conv_name, bn_name in pairs:
        set_module(model, conv_name, fuse_conv_bn_eval(modules[conv_name], modules[bn_name]))
        set_module(model, bn_name, nn.Identity())
    return len(pairs)


def fold_gates(net: nn.Module, masks: dict[str, torch.Tensor], leaves: tuple[type[nn.Module], ...]) -> None:
    """Zero the output channels of every conv whose output reaches a neuron through a closed gate (in place).

    ``masks`` maps a neuron's name to its gate's keep-mask; ``leaves`` are the module types the torch.fx trace of
    ``net``'s single-step forward does not enter. A closed gate feeds 0 into its neuron. Without the gate the
    neuron's input is the sum of conv outputs (directly or through a residual add) and of spikes of other
    neurons of its channel group, closed on the same channels: zeroing those convs' rows (weights and bias)
    feeds it 0 again.
    """
    if all(bool(m.all()) for m in masks.values()):
        return
    convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves)

    with step_mode(net, "s"):
        graph = Tracer().trace(net)
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in masks or bool(masks[node.target].all()):
            continue
        closed = ~masks[node.target]
        for src in _sources(node):
            if src.target in convs:
                conv = net.get_submodule(src.target)
                with torch.no_grad():
                    conv.weight[closed] = 0
                    if conv.bias is not None:
                        conv.bias[closed] = 0


def _sources(node: fx.Node) -> list[fx.Node]:
    """The call_module nodes whose outputs are summed into ``node``'s input."""
    out, todo = [], list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n.op == "call_module":
            out.append(n)
        elif n.op in ("call_function", "call_method"):  # a residual add
            todo.extend(n.all_input_nodes)
    return out
