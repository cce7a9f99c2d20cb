"""Models rebuilt from checkpoints: the gated dense model of a training checkpoint, the slim model of slim.pt.

A slim checkpoint describes itself: its state_dict holds every tensor in its slim shape, so the slim
model is the dense architecture (rebuilt from the recipe) with each tensor resized to the stored shape.
No Torch-Pruning trace is replayed, so a slim.pt does not depend on how any version of Torch-Pruning
groups channels.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .artifacts import SLIM_FORMAT, load_checkpoint, read_torch_file, sha256
from .config import FLOAT_BITS, QuantWeightsCfg, Recipe, parse_recipe
from .errors import MaskError, ModelError, RecipeError, SnnCompressError, first_line
from .models import FactoryError, build_factory_model, create_model
from .models.factory import DATA_KWARGS, accepted_data_kwargs, model_options, resolve_factory
from .registry import MODELS
from .prune.gates import attach_gates, set_masks, strip_gates
from .prune.shapes import dense_state, resize_to
from .quant import attach_fake_quant, detach_fake_quant


def model_spec(recipe: Recipe, in_channels: int, num_classes: int) -> dict:
    """``{name, kwargs}`` or ``{factory, kwargs}``: everything needed to rebuild the architecture, as plain data.

    A factory is imported (to see whether it takes ``in_channels`` / ``num_classes``): the caller trusts it
    (``snncompress.registry.trusted``), as train and run trust what the recipe they run names.
    """
    m = recipe.model
    if m.factory is not None:
        fn = resolve_factory(m.factory)
        return {"factory": m.factory, "kwargs": {**m.kwargs, **accepted_data_kwargs(fn, in_channels, num_classes)}}
    return {"name": m.name, "kwargs": {"in_channels": in_channels, "num_classes": num_classes,
                                       **model_options(m.name, m.options)}}


def check_model_options(recipe: Recipe) -> None:
    """Refuse a registered model's bad options in one line before any data is read (its builder checks them)."""
    if recipe.model.name is not None:
        model_options(recipe.model.name, recipe.model.options)


def build_model(spec: dict, example: torch.Tensor, num_classes: int | None = None,
                trust_factory: bool = False) -> nn.Module:
    """The gated multi-step model of a ``{name, kwargs}`` or ``{factory, kwargs}`` spec (gates open).

    A factory is imported only if trusted (``trust_factory=True`` or :func:`snncompress.registry.trusted`);
    its model must map ``example`` to ``[B, num_classes]`` in both step modes.
    """
    if "factory" in spec:
        model = build_factory_model(spec["factory"], dict(spec["kwargs"]), example, num_classes, trust_factory)
        try:
            return attach_gates(model, example)
        except ModelError as e:  # a layer channel pruning cannot handle exactly
            raise FactoryError(f"model factory {spec['factory']!r}: {e}") from e
        except Exception as e:  # the trace runs the user's forward, one time step in single-step mode
            raise FactoryError(f"model factory {spec['factory']!r}: its forward fails when traced in single-step "
                               f"mode on [B, C, H, W] ({first_line(e)}); build it from spikingjelly layers whose "
                               "step mode can be switched") from e
    model = create_model(spec["name"], **spec["kwargs"])
    try:  # the first forward: a built-in model that cannot take this input says so in one line
        return attach_gates(model, example)
    except RuntimeError as e:
        raise SnnCompressError(f"model {spec['name']!r} cannot take inputs of shape {list(example.shape[2:])} "
                               f"({first_line(e, typed=False)})") from e


def describe_spec(spec: dict) -> str:
    """A one-line description of a model spec, without building (or importing) anything."""
    kwargs = {k: v for k, v in spec.get("kwargs", {}).items() if k not in ("in_channels", "num_classes", "neuron")}
    if "factory" in spec:
        return f"factory {spec['factory']} {kwargs} (user code, not imported)"
    return f"{spec.get('name')} {kwargs}"


def example_input(ckpt: dict, batch: int = 2) -> torch.Tensor:
    """A multi-step input of the checkpoint's shape, ``[T, B, C, H, W]``."""
    data = ckpt["data"]
    return torch.zeros(data["T"], batch, *data["input_shape"])


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint", trust_factory: bool = False) -> nn.Module:
    """Rebuild the model a checkpoint dict describes (gated dense model, or slim model) in eval mode.

    A training checkpoint written after train removed the closed channels (``kept_index``: the slim fine-tune)
    gives the gated dense model all the same, its removed entries 0 (closed channels compute nothing anyway).

    A checkpoint naming a user factory is refused, without importing it, unless ``trust_factory``
    (or the factory is trusted in this process already, e.g. named by the recipe being run).
    """
    spec = _checked_spec(ckpt, source)
    try:
        example = example_input(ckpt)
        model = build_model(spec, example, len(ckpt["data"]["classes"]), trust_factory)
    except FactoryError as e:
        raise FactoryError(f"{source}: {e}") from e
    try:
        if ckpt["format"] == SLIM_FORMAT:
            model = resize_to(strip_gates(model), ckpt["state_dict"])
            model.load_state_dict(ckpt["state_dict"])
        else:
            from .prune.groups import channel_groups  # Torch-Pruning: only a dense checkpoint needs a trace

            state = ckpt["state_dict"]
            if "kept_index" in ckpt:  # the gates are not in a slim state dict: the masks set them below
                own = model.state_dict()
                state = {**{k: v for k, v in own.items() if k.endswith(".gate.gate")},
                         **dense_state(own, state, ckpt["kept_index"])}
            model.load_state_dict(state)
            set_masks(model, channel_groups(model, example), ckpt["masks"])
    except (MaskError, RuntimeError) as e:  # load_state_dict reports missing, unexpected or resized tensors
        raise SnnCompressError(f"{source}: weights do not match the model it describes ({first_line(e)})") from e
    quant = checkpoint_quant(ckpt, source)
    if quant is not None:  # trained quantised: the network computes with the quantised weights
        attach_fake_quant(model, example, quant)
        detach_fake_quant(model.eval(), bake=True)
    return model.eval()


def checkpoint_quant(ckpt: dict, source: str = "checkpoint") -> QuantWeightsCfg | None:
    """How the checkpoint's weights were quantised while they trained (its ``quant`` entry), or None: float."""
    if ckpt.get("quant") is None:
        return None
    try:
        if not isinstance(ckpt["quant"], dict) or set(ckpt["quant"]) != {"bits", "granularity"}:
            raise ValueError("both keys, nothing else")
        return QuantWeightsCfg.model_validate(ckpt["quant"])
    except ValueError as e:  # pydantic's ValidationError is one
        raise SnnCompressError(f"{source}: quant entry must be {{bits: 2-8, granularity: channel | tensor}}, got "
                               f"{ckpt['quant']!r:.80}") from e


def checkpoint_bits(ckpt: dict) -> int:
    """Bits per deployed weight of a checkpoint's network (32: not quantised)."""
    quant = checkpoint_quant(ckpt)
    return quant.bits if quant is not None else FLOAT_BITS


MAX_DATA_KWARG = 1 << 20


def _checked_spec(ckpt: dict, source: str) -> dict:
    """The checkpoint's model spec, refused in one line unless it is one a model can be built from (a registered
    model's kwargs checked by its builder)."""
    spec = ckpt["model"]
    name, factory = (spec.get("name"), spec.get("factory")) if isinstance(spec, dict) else (None, None)
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs"), dict) or \
            not (isinstance(name, str) or isinstance(factory, str)):
        raise SnnCompressError(f"{source}: model entry must be {{name or factory, kwargs}}, got {spec!r:.80}")
    if factory is None:
        if name not in MODELS:
            raise SnnCompressError(f"{source}: unknown model {name!r}; registered: {', '.join(MODELS.names())}")
        try:
            model_options(name, {k: v for k, v in spec["kwargs"].items() if k not in DATA_KWARGS})
        except RecipeError as e:
            raise SnnCompressError(f"{source}: {e}") from e
    # a registered model needs both (a factory may take neither); bounded, as they size the first and last layers
    given = {k: spec["kwargs"].get(k, None if factory is None else 1) for k in DATA_KWARGS}
    if not all(type(v) is int and 1 <= v <= MAX_DATA_KWARG for v in given.values()):
        raise SnnCompressError(f"{source}: model kwargs in_channels and num_classes must be ints in "
                               f"[1, {MAX_DATA_KWARG:,}], got {given}")
    return spec


def load_model(path: str | os.PathLike, trust_factory: bool = False) -> nn.Module:
    """The multi-step spiking model of a dense (``ckpt.pt``) or slim (``slim.pt``) checkpoint, in eval mode.

    ``trust_factory=True`` allows a checkpoint that names a user factory to import and run it.
    """
    return model_from_checkpoint(load_checkpoint(path), str(path), trust_factory)


def recipe_of(ckpt: dict) -> Recipe:
    return parse_recipe(ckpt["recipe"], "checkpoint recipe")


WEIGHT_KEYS = ("state_dict", "model", "net")  # where training scripts (spikingjelly's examples: "net") keep it
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a weights file: an snncompress checkpoint, a plain ``state_dict``, or a dict
    holding one under ``state_dict`` / ``model`` / ``net``; read with ``torch.load(weights_only=True)``."""
    return _read_weights(path)[0]


def _read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], object]:
    """:func:`read_weights`, and the file's ``kept_index`` (a checkpoint of train's slim fine-tune) or None."""
    obj = read_torch_file(path, "PyTorch weights file")
    index = obj.get("kept_index") if isinstance(obj, dict) else None
    is_state = lambda d: isinstance(d, dict) and d and all(torch.is_tensor(v) for v in d.values())  # noqa: E731
    if isinstance(obj, dict) and not is_state(obj):
        obj = next((obj[k] for k in WEIGHT_KEYS if is_state(obj.get(k))), obj)
    if not is_state(obj):
        keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise SnnCompressError(f"{path}: no state dict in it (expected a dict of tensors, or one under "
                               f"{', '.join(WEIGHT_KEYS)}; found {keys or 'an empty dict'})")
    problem = _state_problem(obj)
    if problem:
        raise SnnCompressError(f"{path}: {problem}")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj, index


def _state_problem(state: dict) -> str | None:
    """What makes a state dict unusable as weights (None if nothing): keys that are not tensor names, tensors
    that are not plain dense real numbers, values that are not finite."""
    for k, t in state.items():
        if not isinstance(k, str):
            return f"the state dict's keys must be tensor names (strings), found {k!r:.40} ({type(k).__name__})"
        kind = ("sparse" if t.layout != torch.strided else "meta (no data)" if t.is_meta
                else "quantized" if t.is_quantized else "complex" if t.is_complex()
                else "bool" if t.dtype == torch.bool else None)
        if kind:
            return f"tensor {k!r:.80} is {kind}; weights must be dense real-valued tensors"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"tensor {k!r:.80} holds NaN or infinite values"
    return None


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", …" if len(names) > n else "")


def load_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Load trained weights into a gated model built from the recipe; return the file's sha256.

    The channel gates are not weights: a file's gates (an snncompress checkpoint's masks) are ignored
    and pruning starts with every channel open (a checkpoint of train's slim fine-tune gives its removed
    channels as zeros). A file that does not fit the model is refused with one
    line naming how many keys are missing, unexpected or of another shape, and the first few of each
    (a :class:`RecipeError`: exit code 2).
    """
    try:
        weights, index = _read_weights(path)
        if index is not None:  # slim weights (train's slim fine-tune): the removed entries back as zeros
            weights = dense_state(model.state_dict(), weights, index)
    except SnnCompressError as e:  # the recipe names the file: a usage error, like any bad recipe field
        raise RecipeError(f"model.weights: {e}") from e
    weights = {k: v for k, v in weights.items() if not k.endswith(".gate.gate")}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith(".gate.gate")}
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    retyped = [k for k in own if k in weights and weights[k].is_floating_point() != own[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} key{'s' * (len(missing) > 1)} missing ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if reshaped:
        shapes = [f"{k}: {list(weights[k].shape)} in the file, {list(own[k].shape)} in the model" for k in reshaped]
        problems.append(f"{len(reshaped)} of another shape ({_first(shapes, 2)})")
    if retyped:
        kinds = [f"{k}: {weights[k].dtype} in the file, {own[k].dtype} in the model" for k in retyped]
        problems.append(f"{len(retyped)} of another kind of number ({_first(kinds, 2)})")
    if problems:
        raise RecipeError(f"model.weights: {path} does not fit the recipe's model: {', '.join(problems)}")
    model.load_state_dict(weights, strict=False)  # strict on everything but the gates, checked above
    return sha256(path)
