"""A trained spiking network as NIR (the Neuromorphic Intermediate Representation, the exchange format of
neuromorphic chips and simulators), and NIR files read back and simulated.

spikingjelly's exporter (``nir_exchange.to_nir``) maps the layers and neurons; this module prepares the
network it is given (its stages in sequence, BatchNorm folded into the convs, gates folded away, the adaptive
readout pool as a plain average, no readout over T) and adds what the exporter lacks: a refusal, in one line,
of what NIR cannot express; average pooling written as ``SumPool2d`` with its 1/k² folded into the next
weights (the pooling every NIR consumer reads, see docs/design.md); the metadata; and the simulation of a
file with spikingjelly's importer for the verification.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron
from spikingjelly.activation_based.neuron import BaseNode

from ..artifacts import exported_from
from ..data import to_steps
from ..errors import SnnCompressError, first_line
from ..evaluation import batch_logits
from ..models.modules import set_module, step_mode
from ..prune.gates import gate_modules, neuron_of, strip_gates
from .fold import fold_batchnorm, fold_gates

NIR_FORMAT = "snncompress.nir/1"
# NIR's neurons are continuous-time; a file states its time step dt. spikingjelly's exporter and importer,
# snnTorch's importer and most NIR tools use 0.1 ms: one network time step is dt = 1e-4 s.
DT = 1e-4
NEURONS = (neuron.IFNode, neuron.LIFNode)  # the exact types NIR can carry (ParametricLIF: learnable tau)
# the modules that become NIR nodes (everything else is traced through)
LAYERS = (nn.Conv2d, nn.Linear, BaseNode, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.Flatten, nn.Identity)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """snnTorch's importer prints warnings to stdout (spikingjelly's loguru logger is off unless a user enables it)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def check_expressible(model: nn.Module) -> None:
    """Refuse, naming the module and what NIR allows, any construct a NIR graph cannot express exactly."""
    if not callable(getattr(model, "stages", None)):
        raise SnnCompressError(f"NIR export needs a model that lists its stages ({type(model).__name__} has no "
                               "stages(): the registered models do, and a factory's model can, see docs/design.md)")
    for name, m in model.named_modules():
        where = f"{name} ({type(m).__name__})"
        if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            raise SnnCompressError(f"{where}: NIR has no max pooling; allowed: average pooling (model.pool: avg)")
        if isinstance(m, BaseNode):
            if type(m) not in NEURONS:
                raise SnnCompressError(f"{where}: NIR export allows IFNode and LIFNode with a fixed scalar tau")
            if m.v_reset is None:
                raise SnnCompressError(f"{where}: soft reset (subtract the threshold) has no NIR form; "
                                       "allowed: hard reset (neuron.reset: hard)")
            if isinstance(m, neuron.LIFNode) and (isinstance(m.tau, torch.Tensor) and m.tau.numel() != 1):
                raise SnnCompressError(f"{where}: per-channel tau; allowed: one scalar tau per layer")
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise SnnCompressError(f"{where}: groups={m.groups}, padding_mode={m.padding_mode}; NIR export allows "
                                   "ungrouped convs with zero padding")
        if isinstance(m, nn.AvgPool2d) and (m.ceil_mode or m.divisor_override is not None
                                            or (any(np.atleast_1d(m.padding)) and not m.count_include_pad)):
            raise SnnCompressError(f"{where}: allowed: plain average pooling (no ceil_mode, divisor_override or "
                                   "padding left out of the count)")


class _Through(nn.Module):
    """Stands where a folded BatchNorm was: traced through, so it leaves no node in the NIR graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Body(nn.Sequential):
    """The network without its readout over T: one time step in ``[B, C, H, W]``, the readout layer's output
    (single-step logits) out. The model's logits are the mean of these over the T steps."""


def nir_body(model: nn.Module, example: torch.Tensor) -> Body:
    """A single-step copy of ``model``'s stages laid out for NIR: BatchNorm folded into the convs, gates folded
    into the weights (a closed gate's channel gets zero weights and bias), adaptive pooling as a fixed average
    pool.

    ``example`` is one time step ``[B, C, H, W]``. Refuses (one line) what NIR cannot express.
    """
    check_expressible(model)
    body = Body(OrderedDict(copy.deepcopy(model).eval().stages()))
    masks = {neuron_of(n): g.mask.clone() for n, g in gate_modules(body).items()}
    functional.reset_net(body)
    fold_batchnorm(body, example.unsqueeze(0))
    if any(isinstance(m, nn.BatchNorm2d) for m in body.modules()):
        raise SnnCompressError("a BatchNorm that does not follow a conv cannot be folded; NIR has no BatchNorm")
    for name, m in list(body.named_modules()):
        if isinstance(m, nn.Identity):
            set_module(body, name, _Through())
    fold_gates(body, masks, LAYERS)
    strip_gates(body)
    _fixed_adaptive_pools(body, example)
    functional.set_step_mode(body, "s")
    functional.reset_net(body)
    return body


def _fixed_adaptive_pools(net: nn.Module, example: torch.Tensor) -> None:
    """Replace each adaptive average pool by the fixed average pool it computes on this input size, or refuse."""
    pools = {n: m for n, m in net.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)}
    sizes: dict[str, tuple[int, int]] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: sizes.__setitem__(n, tuple(a[0].shape[-2:])))
               for n, m in pools.items()]
    try:
        with torch.no_grad(), step_mode(net, "s"):
            net(example)
    finally:
        for h in handles:
            h.remove()
    for name, m in pools.items():
        out = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
        size = sizes[name]
        out = tuple(s if o is None else o for o, s in zip(out, size))
        if any(s % o for s, o in zip(size, out)):
            raise SnnCompressError(f"{name} ({type(m).__name__}): pooling {size[0]}x{size[1]} to {out[0]}x{out[1]} "
                                   "is not a plain average; NIR allows it where the input size is a multiple of "
                                   "the output size (model.readout_pool)")
        k = (size[0] // out[0], size[1] // out[1])
        set_module(net, name, layer.AvgPool2d(k, k))


def to_nir_graph(body: nn.Module, example: torch.Tensor, metadata: dict[str, str]):
    """The NIR graph of a :func:`nir_body` (spikingjelly's exporter, then SumPool2d pooling and metadata)."""
    from spikingjelly.activation_based.nir_exchange.to_nir import export_to_nir

    with _quiet():
        graph = export_to_nir(body, example, dt=DT)
    sum_pools(graph)
    graph.metadata = dict(metadata)
    return graph


def sum_pools(graph) -> None:
    """Rewrite every AvgPool2d node as SumPool2d and fold its 1/(kh*kw) into the next weighted node (in place).

    Lava-DL and Sinabs read SumPool2d but not AvgPool2d; every importer reads SumPool2d (nirtorch maps it
    by default). A sum pool then a conv or affine with weights W/(kh*kw) computes the average pool then W;
    for a 2x2 pool the scale is 1/4, a power of two, so the float results are the same bit for bit.
    spikingjelly's exporter also writes AvgPool2d's kernel as a scalar, which snnTorch 1.0 cannot read:
    the SumPool2d nodes hold (height, width) arrays.
    """
    import nir

    succ: dict[str, list[str]] = {}
    pred: dict[str, list[str]] = {}
    for a, b in graph.edges:
        succ.setdefault(a, []).append(b)
        pred.setdefault(b, []).append(a)
    pair = lambda v: np.array(v if np.ndim(v) else (v, v), dtype=np.int64).reshape(2)  # noqa: E731
    for name, node in list(graph.nodes.items()):
        if not isinstance(node, nir.AvgPool2d):
            continue
        k, s, p = pair(node.kernel_size), pair(node.stride), pair(node.padding)
        new = nir.SumPool2d(kernel_size=k, stride=s, padding=p)
        new.input_type, new.output_type = node.input_type, node.output_type
        graph.nodes[name] = new
        target = name
        while True:  # through shape-only nodes to the one weighted node that reads this pool alone
            nxt = succ.get(target, [])
            if len(nxt) != 1 or len(pred.get(nxt[0], [])) != 1:
                raise SnnCompressError(f"{name}: average pooling must feed one conv or linear layer alone "
                                       "(its 1/k² is folded into their weights)")
            target = nxt[0]
            t = graph.nodes[target]
            if isinstance(t, (nir.SumPool2d, nir.AvgPool2d, nir.Flatten)):
                continue
            if isinstance(t, (nir.Conv2d, nir.Affine, nir.Linear)):
                t.weight = (t.weight * np.asarray(1.0 / (k[0] * k[1]), dtype=t.weight.dtype)).astype(t.weight.dtype)
                break
            raise SnnCompressError(f"{name}: average pooling must feed a conv or linear layer, not "
                                   f"{type(t).__name__} (its 1/k² is folded into their weights)")


def integer_weights(graph, bits: int, granularity: str) -> dict[str, str]:
    """Make every conv and affine node that feeds a neuron hold integers, its scale moved into that neuron (in
    place); returns the metadata that says so (bits, and each node's scale).

    A layer whose deployed weights are ``q * scale`` (quantisation-aware training with one scale per tensor;
    BatchNorm and any sum pool's 1/k² folded in) gets weights ``q`` and bias ``bias / scale``, and its neuron's
    threshold, leak and reset potentials are divided by ``scale``: the membrane is then the old one over
    ``scale``, so the neuron spikes at the same steps and resets alike, exactly for IF and LIF with any reset
    potential (their dynamics are linear in the membrane). The readout, which no neuron follows, keeps
    ``q * scale``; its scale is in the metadata. Per-channel scales would need a threshold per channel, which
    Speck's cores (one threshold per layer) and spikingjelly's importer (uniform thresholds) do not take:
    refused, as is a neuron fed by several layers (a residual sum: one threshold for different scales).
    """
    import nir

    from ..quant import quantize

    if granularity != "tensor":
        raise SnnCompressError("integer NIR needs one scale per layer (quant.weights.granularity: tensor): its "
                               "neurons share one threshold, as Speck's cores and spikingjelly's importer require; "
                               f"this checkpoint was trained with granularity {granularity}")
    succ: dict[str, list[str]] = {}
    pred: dict[str, list[str]] = {}
    for a, b in graph.edges:
        succ.setdefault(a, []).append(b)
        pred.setdefault(b, []).append(a)
    scales: dict[str, float] = {}
    for name, node in graph.nodes.items():
        if not isinstance(node, (nir.Conv2d, nir.Affine)):
            continue
        w = np.asarray(node.weight, dtype=np.float64)
        q, scale = (float(t) if t.dim() == 0 else t.numpy() for t in quantize(torch.from_numpy(w), bits, "tensor"))
        if np.abs(q * scale - w).max() > 1e-5 * max(1.0, np.abs(w).max()):
            raise SnnCompressError(f"{name}: its weights are not {bits}-bit integers times a scale (was the "
                                   "checkpoint trained with quant?)")
        scales[name] = scale
        after = [graph.nodes[n] for n in succ.get(name, [])]
        if not (len(after) == 1 and isinstance(after[0], (nir.LIF, nir.IF))):
            if not all(isinstance(n, nir.Output) for n in after):
                raise SnnCompressError(f"integer NIR: {name} must feed one neuron alone (or the output); it feeds "
                                       f"{', '.join(type(n).__name__ for n in after)}")
            continue  # the readout: q * scale stays
        if len(pred[succ[name][0]]) != 1:
            raise SnnCompressError(f"integer NIR: the neuron after {name} sums several layers (a residual "
                                   "connection): one threshold cannot take their different scales; export with "
                                   "float weights (a checkpoint trained without quant)")
        node.weight = q.astype(np.float32)
        node.bias = (np.asarray(node.bias, dtype=np.float64) / scale).astype(np.float32)
        for field in ("v_threshold", "v_leak", "v_reset"):
            value = getattr(after[0], field, None)
            if value is not None:
                setattr(after[0], field, (np.asarray(value, dtype=np.float64) / scale).astype(np.float32))
    return {"weight_bits": str(bits), "weight_granularity": granularity,
            "weights": "integers (float32 arrays of integer values); each layer's scale divides its bias and its "
                       "neuron's threshold, leak and reset potentials; the readout keeps integer x scale",
            "weight_scales": json.dumps(scales)}


def nir_metadata(meta: dict, extra: dict[str, str]) -> dict[str, str]:
    """The graph metadata: what a consumer needs beyond the nodes (T, encoding, normalisation, readout, dt)."""
    direct = meta["encoding"] == "direct"
    return {"format": NIR_FORMAT, "T": str(meta["T"]), "encoding": meta["encoding"], "dt": repr(DT),
            "input": ("the normalised image, the same at each of the T steps" if direct else
                      "one step of the spike or frame sequence") + " [C, H, W]",
            "input_shape": json.dumps(list(meta["input_shape"])),
            "normalisation": json.dumps({"mean": meta["mean"], "std": meta["std"], "formula": "(x - mean) / std"}),
            "readout": "logits = mean of the Output node over the T steps; the state starts at rest for each sample",
            "classes": json.dumps(meta["classes"]), **extra}


def _strings(metadata: dict) -> dict[str, str]:
    return {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in metadata.items()}


def read_nir(path: str | os.PathLike):
    """``nir.read`` of a file, any failure (not HDF5, not NIR, truncated) as one line."""
    import nir

    path = Path(path)
    if not path.is_file():
        raise SnnCompressError(f"{path}: no such NIR file")
    try:
        problem = _hdf5_problem(path)
    except Exception as e:  # not HDF5 at all, truncated, ...
        raise SnnCompressError(f"{path}: not a readable NIR file ({first_line(e)})") from e
    if problem:
        raise SnnCompressError(f"{path}: refused: {problem} (nothing of it was loaded)")
    try:
        with _quiet():
            return nir.read(path)
    except Exception as e:  # h5py, nir and numpy raise many types on a damaged file
        raise SnnCompressError(f"{path}: not a readable NIR file ({first_line(e)})") from e


MAX_NIR_BYTES = 256 << 20  # every dataset and attribute of a NIR file, as read into memory (VGG-16: about 60 MB)
MAX_NIR_OBJECTS = 100_000


def _hdf5_problem(path: Path) -> str | None:
    """What makes an HDF5 file unsafe for ``nir.read`` (None if nothing), found from its declarations alone:
    links to other files or paths (never followed), datasets stored in other files, more data than any network
    holds (declared sizes: a small file can declare gigabytes of compressed or fill-value data)."""
    import h5py

    total, seen = 0, 0
    with h5py.File(path, "r") as f:
        groups = [f]
        while groups:
            group = groups.pop()
            for obj in [group, *(group[name] for name in group if not _link_problem(group, name))]:
                seen += 1
                if seen > MAX_NIR_OBJECTS:
                    return f"more than {MAX_NIR_OBJECTS:,} HDF5 objects"
                total += sum(obj.attrs.get_id(k).get_storage_size() for k in obj.attrs)
                if isinstance(obj, h5py.Dataset):
                    if obj.external:
                        return f"dataset {obj.name!r:.80} is stored in other files (HDF5 external storage)"
                    total += obj.size * obj.dtype.itemsize
                elif obj is not group:
                    groups.append(obj)
            bad = next((p for p in (_link_problem(group, name) for name in group) if p), None)
            if bad:
                return bad
            if total > MAX_NIR_BYTES:
                return f"its datasets and attributes declare more than {MAX_NIR_BYTES:,} bytes"
    return None


def _link_problem(group, name: str) -> str | None:
    import h5py

    link = group.get(name, getlink=True)
    if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
        return f"{group.name.rstrip('/')}/{name!s:.60} is an HDF5 {type(link).__name__} (never followed)"
    return None


def read_nir_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata snncompress wrote into a NIR file; refuses files it did not write."""
    meta = _strings(read_nir(path).metadata or {})
    if meta.get("format") != NIR_FORMAT:
        raise SnnCompressError(f"{path}: not a NIR file written by snncompress (no '{NIR_FORMAT}' metadata)")
    return meta


def describe_nodes(graph) -> list[tuple[str, str, str, str]]:
    """(name, type, input shape, output shape) of every node, in the order of the graph's edges."""
    order, seen = [], set()
    for name in [n for n, node in graph.nodes.items() if type(node).__name__ == "Input"] + \
            [b for e in graph.edges for b in e] + list(graph.nodes):
        if name not in seen:
            seen.add(name)
            order.append(name)

    def shape(types: dict) -> str:
        vals = [v for v in (types or {}).values() if v is not None]
        return "x".join(str(int(d)) for d in np.atleast_1d(vals[0])) if vals else "?"

    return [(n, type(graph.nodes[n]).__name__, shape(graph.nodes[n].input_type), shape(graph.nodes[n].output_type))
            for n in order]


def node_counts(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes.values():
        counts[type(node).__name__] = counts.get(type(node).__name__, 0) + 1
    return dict(sorted(counts.items()))


def neuron_count(graph) -> int:
    """Spiking neurons in a graph (the elements of every LIF / IF node)."""
    return sum(int(np.size(n.v_threshold)) for n in graph.nodes.values() if type(n).__name__ in ("LIF", "IF"))


def nir_exported_from(nir_path: Path, ckpt_path: Path) -> bool:
    """Whether ``nir_path`` is an snncompress NIR export of exactly ``ckpt_path`` (``artifacts.exported_from``)."""
    return exported_from(nir_path, ckpt_path, read_nir_metadata)


class Simulator:
    """A NIR graph simulated step by step; ``logits(x_steps)`` is the mean output over the steps.

    By default the graph is imported by spikingjelly (``from_nir.import_from_nir``, single-step modules with
    explicit state passed from step to step). ``module`` runs another importer's module instead; ``reset(module)``
    then puts its hidden state back to rest before each batch (snnTorch: ``snntorch.utils.reset``).
    """

    def __init__(self, graph, module: nn.Module | None = None, reset=None):
        if module is None:
            from spikingjelly.activation_based.nir_exchange.from_nir import import_from_nir

            with _quiet():
                module = import_from_nir(graph, dt=DT, step_mode="s")
        self.module, self.reset = module.eval(), reset

    @torch.no_grad()
    def logits(self, x_steps: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` -> ``[B, classes]``, every sample from rest."""
        if self.reset is not None:
            self.reset(self.module)
        state, outs = None, []
        with _quiet():
            for x_t in x_steps:
                out = self.module(x_t, state) if state is not None else self.module(x_t)
                out, state = out if isinstance(out, tuple) else (out, None)
                outs.append(out.reshape(x_t.shape[0], -1))
        return torch.stack(outs).mean(0)


def simulate(sim: Simulator, x: torch.Tensor, T: int, encoding: str) -> np.ndarray:
    """Logits of a simulated NIR file over dataset samples ``x``."""
    return batch_logits(lambda inp: sim.logits(to_steps(inp, T, encoding)), x, T, encoding)


@torch.no_grad()
def body_logits(body: nn.Module, x: torch.Tensor, T: int, encoding: str) -> np.ndarray:
    """Logits of a :func:`nir_body` in PyTorch: the mean of its outputs over the T steps, from rest per batch."""
    def run(inp: torch.Tensor) -> torch.Tensor:
        functional.reset_net(body)
        return torch.stack([body(x_t) for x_t in to_steps(inp, T, encoding)]).mean(0)

    try:
        return batch_logits(run, x, T, encoding)
    finally:
        functional.reset_net(body)


@torch.no_grad()
def first_disagreeing_layer(body: nn.Module, sim: Simulator, x_steps: torch.Tensor, tol: float) -> str:
    """The first layer of ``body`` (PyTorch) whose output differs from the simulated NIR node of the same name
    (pooling layers, which the file holds as sums, are skipped)."""
    ref: dict[str, list[torch.Tensor]] = {}
    got: dict[str, list[torch.Tensor]] = {}
    order: list[str] = []

    def keep(store: dict, name: str, out) -> None:
        out = out[0] if isinstance(out, tuple) else out
        if name not in store:
            store[name] = []
            if store is ref:
                order.append(name)
        store[name].append(out.detach().clone())

    leaves = [(n, m) for n, m in body.named_modules() if isinstance(m, LAYERS) and not isinstance(m, nn.AvgPool2d)]
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: keep(ref, n.replace(".", "_"), o)) for n, m in leaves]
    wanted = {n.replace(".", "_") for n, _ in leaves}
    handles += [m.register_forward_hook(lambda mod, a, o, n=n: keep(got, n, o))
                for n, m in sim.module.named_children() if n in wanted]
    try:
        functional.reset_net(body)
        for x_t in x_steps:
            body(x_t)
        functional.reset_net(body)
        sim.logits(x_steps)
    finally:
        for h in handles:
            h.remove()
    dotted = {n.replace(".", "_"): n for n, _ in leaves}
    for name in order:
        a, b = ref[name], got.get(name)
        if b is None or len(a) != len(b) or any(u.shape != v.shape or (u - v).abs().max() > tol for u, v in zip(a, b)):
            return f"{dotted[name]} (NIR node {name})"
    return "the readout (mean over the steps)"
