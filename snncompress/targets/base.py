"""What a hardware target checks: the weighted layers of a NIR graph as a chip's cores see them.

A target (``snncompress check --target NAME``) is one registered class (:func:`snncompress.register_target`) with
a :meth:`Target.check` that takes the :class:`CoreLayer` list :func:`core_layers` reads from a NIR graph and
returns a :class:`TargetReport`: the violations (one line each, naming the layer, its value and the limit), and
the per-core use when the model fits. NIR is the common input because it is what a chip toolchain reads: a
checkpoint is checked through the NIR graph its export would write (BatchNorm and gates folded, average pools as
sum pools).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import SnnCompressError

NEURON_NODES = ("IF", "LIF", "CubaLIF", "LI", "I", "CubaLI")
POOL_NODES = ("SumPool2d", "AvgPool2d")


@dataclass
class CoreLayer:
    """A conv (or an affine layer, seen as the conv over its whole input map that chips map it to) with what
    follows it up to the next weighted layer: its neuron and its pooling."""

    name: str
    c: int  # input channels
    f: int  # output channels (features)
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)  # the neurons' map, before pooling
    neuron: str | None = None  # the NIR type of the neuron after it (None: the layer's output is read directly)
    pools: list[tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=list)  # (kernel, stride) after it
    pool_before_neuron: bool = False
    destinations: set[str] = field(default_factory=set)  # the weighted layers this one feeds
    affine: bool = False


@dataclass
class TargetReport:
    """The result of a check: ``violations`` (empty: the model fits), ``table`` (header, rows) of the per-core use
    and ``notes`` (facts that are not violations)."""

    target: str
    violations: list[str]
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.violations


class Target:
    """Base of a hardware target: ``name`` and ``source`` (where its limits come from) for reports."""

    name = "target"
    source = ""

    def check(self, layers: list[CoreLayer], metadata: dict[str, str]) -> TargetReport:
        """The report for the model whose weighted layers are ``layers`` (``metadata``: the NIR file's)."""
        raise NotImplementedError


def _pair(v) -> tuple[int, int]:
    a = np.asarray(v).reshape(-1)
    return (int(a[0]), int(a[0])) if a.size == 1 else (int(a[0]), int(a[1]))


def _order(graph) -> list[str]:
    """The graph's nodes in a topological order (Kahn's), refusing cycles: chips' cores run feed-forward maps."""
    succ: dict[str, list[str]] = {n: [] for n in graph.nodes}
    indeg = dict.fromkeys(graph.nodes, 0)
    for a, b in graph.edges:
        if a not in succ or b not in succ:
            raise SnnCompressError(f"NIR graph: edge {a} -> {b} names a node the graph does not have")
        succ[a].append(b)
        indeg[b] += 1
    ready = [n for n, d in indeg.items() if d == 0]
    order = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in succ[n]:
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    if len(order) != len(graph.nodes):
        raise SnnCompressError("NIR graph: it has a cycle (a recurrent connection); the hardware check reads "
                               "feed-forward graphs")
    return order


def core_layers(graph) -> list[CoreLayer]:
    """The weighted layers of a NIR graph, in a topological order, each with the neuron and pooling that follow
    it. Shapes are propagated from the Input node, not read from the nodes' declared types."""
    preds: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for a, b in graph.edges:
        preds[b].append(a)
    shape: dict[str, tuple[int, ...]] = {}  # each node's output shape
    grid: dict[str, tuple[int, ...]] = {}  # the last (C, H, W) shape before a flatten
    source: dict[str, str | None] = {}  # the weighted layer whose output reaches each node (None: the input)
    cores: dict[str, CoreLayer] = {}
    for name in _order(graph):
        node, kind = graph.nodes[name], type(graph.nodes[name]).__name__
        ins = preds[name]
        if kind == "Input":
            shape[name] = tuple(int(s) for s in np.asarray(node.input_type["input"]).reshape(-1))
            grid[name], source[name] = shape[name], None
            continue
        if not ins:
            raise SnnCompressError(f"NIR graph: node {name} ({kind}) has no input")
        s, g, src = shape[ins[0]], grid[ins[0]], source[ins[0]]
        if kind == "Conv2d":
            w = np.asarray(node.weight)
            if w.ndim != 4 or len(s) != 3:
                raise SnnCompressError(f"NIR graph: {name} (Conv2d) has weights {w.shape} on an input of shape {s}")
            k, st, pad, dil = _pair(w.shape[2:]), _pair(node.stride), _pair(node.padding), _pair(node.dilation)
            out = tuple((s[i + 1] + 2 * pad[i] - dil[i] * (k[i] - 1) - 1) // st[i] + 1 for i in range(2))
            cores[name] = CoreLayer(name, c=s[0], f=int(w.shape[0]), kernel=k, stride=st, padding=pad, dilation=dil,
                                    groups=int(node.groups), in_hw=(s[1], s[2]), out_hw=out)
            shape[name] = grid[name] = (int(w.shape[0]), *out)
            src = name
        elif kind in ("Affine", "Linear"):
            w = np.asarray(node.weight)
            c, h, wd = g if len(g) == 3 else (g[0], 1, 1)
            cores[name] = CoreLayer(name, c=c, f=int(w.shape[0]), kernel=(h, wd), in_hw=(h, wd), affine=True)
            shape[name] = grid[name] = (int(w.shape[0]), 1, 1)
            src = name
        elif kind in NEURON_NODES:
            shape[name], grid[name] = s, g
            if src is not None and cores[src].neuron is None:
                cores[src].neuron = kind
        elif kind in POOL_NODES:
            k = _pair(node.kernel_size)
            st = _pair(getattr(node, "stride", None) if getattr(node, "stride", None) is not None else k)
            out = (s[0], s[1] // st[0], s[2] // st[1])
            shape[name] = grid[name] = out
            if src is not None and (k, st) != ((1, 1), (1, 1)):  # a 1x1 pool is no pooling
                core = cores[src]
                core.pools.append((k, st))
                core.pool_before_neuron |= core.neuron is None
        elif kind == "Flatten":
            shape[name], grid[name] = (int(math.prod(s)),), g
        elif kind == "Output":
            continue
        else:
            raise SnnCompressError(f"NIR graph: node {name} is a {kind}, which the hardware check does not read; "
                                   "it reads Input, Conv2d, Affine/Linear, neurons (IF, LIF, ...), SumPool2d/AvgPool2d, "
                                   "Flatten and Output")
        source[name] = src
        for p in ins:  # every weighted layer feeding this one (residual sums: several)
            if kind in ("Conv2d", "Affine", "Linear") and source[p] is not None:
                cores[source[p]].destinations.add(name)
    return list(cores.values())
