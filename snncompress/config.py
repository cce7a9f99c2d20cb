"""The recipe schema: YAML files validated by pydantic, with one-line, field-path error messages.

Torch-free on purpose (a test checks it): ``snncompress train bad.yaml`` answers before torch is
imported. Model and method names are checked against the torch-free registries of
:mod:`snncompress.registry`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .errors import RecipeError
from .legacy import translate_model, translate_prune
from .registry import BUDGET_UNITS, METHODS, MODELS, is_code_string
from .schema import (Fraction, FractionOpen, NonNegative, NonNegativeInt, OpenUnit, Positive, PositiveInt, Section, Seed,
                     at_most, format_error, option_errors)

# Upper bounds on the numbers that size an allocation, far above any real recipe (README: Recipes)
MAX_T = 4096
MAX_BATCH = 65_536
MAX_WORKERS = 256


def _run_name(v: str) -> str:
    # runs/<name> is the default output directory: the name must stay one plain directory name inside runs/
    if not v or v in (".", "..") or "/" in v or "\\" in v or not v.isprintable() or len(v.encode()) > 200:
        raise ValueError("must be a plain directory name (at most 200 bytes; no '/', '\\', '..' or control "
                         "characters): runs/<name> is the default output directory")
    return v


RunName = Annotated[str, AfterValidator(_run_name)]


def _round_to(v: Any) -> int | str:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        return v
    raise ValueError("must be a positive int (channels per block) or 'auto' (the runtime's block on this CPU)")


class ModelCfg(BaseModel):
    """A registered model (``name``, and its options as further keys: the keyword arguments of its builder,
    e.g. ``layers``, ``width``, ``neuron``, checked by the builder when the model is built) or a user factory
    (``factory`` and its ``kwargs``); exactly one of them."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str | None = None  # registered model (`snncompress info` lists them); vgg if no factory is given
    factory: str | None = None  # "package.module:function" returning a spikingjelly nn.Module
    kwargs: dict[str, Any] = Field(default_factory=dict)  # factory only: its keyword arguments
    # trained weights to start from: an snncompress checkpoint, a torch.save(state_dict) file, or a dict
    # holding the state dict under state_dict / model / net (read with torch.load(weights_only=True))
    weights: str | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The registered model's options (every key but name, factory, kwargs and weights)."""
        return dict(self.model_extra or {})

    @model_validator(mode="before")
    @classmethod
    def _default_vgg(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = translate_model(data)
        if data.get("name") is None and data.get("factory") is None:
            data["name"] = "vgg"
        return data

    @model_validator(mode="after")
    def _one_model(self) -> "ModelCfg":
        if self.factory is not None:
            if self.name is not None:
                raise ValueError("factory: give either name (a registered model) or factory, not both")
            if not is_code_string(self.factory):
                raise ValueError(f"factory: must be 'package.module:function', got {self.factory!r}")
            if self.options:
                raise ValueError(f"{next(iter(self.options))}: only for registered models; pass a factory's "
                                 "arguments in kwargs")
            if set(self.kwargs) & {"in_channels", "num_classes"}:
                raise ValueError("kwargs: in_channels and num_classes come from the data; remove them")
            return self
        if self.name not in MODELS:
            raise ValueError(f"name: unknown model {self.name!r}; registered: {', '.join(MODELS.names())}")
        if self.kwargs:
            raise ValueError("kwargs: only for a factory; a registered model takes its options as keys of model "
                             "(e.g. model.width)")
        return self


class DataCfg(Section):
    """Offline datasets. ``digits``/``mnist5k`` ship with the install; the others read ``root``."""

    name: Literal["digits", "mnist5k", "cifar10", "cifar100", "frames"] = "digits"
    root: str | None = None  # cifar10/cifar100: the extracted archive (binary or python layout); frames: a folder
    T: Annotated[PositiveInt, at_most(MAX_T)] = 4  # time steps; for frames it must match the files
    # direct: the normalised image at every step; poisson: rate-coded spikes of the [0, 1] image;
    # frames: the data already has a time axis (event frames)
    encoding: Literal["direct", "poisson", "frames"] = "direct"
    test_fraction: OpenUnit = 0.2  # when the data has no test split
    batch_size: Annotated[PositiveInt, at_most(MAX_BATCH)] = 64
    augment: bool | None = None  # random crop (padding 4) + horizontal flip; default on for CIFAR
    workers: Annotated[NonNegativeInt, at_most(MAX_WORKERS)] = 0  # DataLoader worker processes

    @model_validator(mode="after")
    def _consistent(self) -> "DataCfg":
        if self.name in ("cifar10", "cifar100", "frames") and not self.root:
            raise ValueError(f"root: {self.name} is read from a local directory; set data.root")
        if (self.name == "frames") != (self.encoding == "frames"):
            raise ValueError("encoding: 'frames' goes with (and only with) the frames dataset, "
                             f"got {self.encoding!r} for {self.name!r}")
        return self

    @property
    def augments(self) -> bool:
        return self.augment if self.augment is not None else self.name.startswith("cifar")


class OptimizerCfg(Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: Positive = 0.1
    momentum: FractionOpen = 0.9
    weight_decay: NonNegative = 5e-4
    # false: BatchNorm gamma and beta get no weight decay (so an L1 penalty on gamma, train.l1_gamma, can make it sparse)
    bn_decay: bool = True


class DistillCfg(Section):
    """Knowledge distillation from the starting weights (``model.weights``, frozen, eval mode): the loss is
    ``(1 - alpha) * CE + alpha * temperature^2 * KL(teacher || student)`` over logits softened by ``temperature``."""

    alpha: Fraction = 0.5
    temperature: Positive = 4.0


class TrainCfg(Section):
    epochs: PositiveInt = 30
    optimizer: OptimizerCfg = OptimizerCfg()
    schedule: Literal["cosine", "constant"] = "cosine"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available; bf16 autocast on cuda
    checkpoint_every: PositiveInt = 1  # epochs between ckpt.pt writes (the last epoch is always written)
    # L1 penalty on every BatchNorm gamma (network slimming): the dense pre-training of criticality's pipeline
    l1_gamma: NonNegative = 0.0
    # once the channel masks are final, remove the closed channels and fine-tune the slim network (its own cost)
    slim_finetune: bool = True
    distill: DistillCfg | None = None  # needs model.weights: the teacher is the network training starts from


STRUCTURED_ONLY = ("keep", "regrow", "budget", "budget_unit", "round_to", "sop_hold", "pq", "min_fraction", "allocation",
                   "recalibrate_bn")  # channel budgets;
# unstructured methods set sparsity


def method_family(method: str) -> str | None:
    """``structured`` or ``unstructured`` for a registered method; None for user code not imported yet."""
    return METHODS.meta(method)["family"] if method in METHODS else None


def method_ramps(method: str) -> bool:
    """Whether the method ramps to its target (False: at its target from the first epoch, like ``pq``);
    True for user code not imported yet."""
    return METHODS.meta(method).get("ramp", True) if method in METHODS else True


def _builtin_options(method: str) -> type[BaseModel] | None:
    """A registered method's options model, or None (no options): the class's own where it is imported already
    (e.g. registered by the user's code), else the torch-free model its declaration names."""
    cls = METHODS.loaded(method)
    if cls is not None:
        options = getattr(cls, "Options", None)
        return options if getattr(options, "model_fields", None) else None
    code = METHODS.meta(method).get("options")
    if code is None:
        return None
    module, attr = code.split(":")
    return getattr(importlib.import_module(module), attr)


class PQIndex(Section):
    """PQ index norms and adaptive-ratio constants (Diao et al. 2023) of ``budget: pq``; the ``pq`` method takes
    the same ones among its options."""

    p: Positive = 0.5  # 0 < p < q (Diao et al.: 0.5, 1)
    q: Positive = 1.0
    eta: NonNegative = 0.0  # ratio slowdown (Diao: 0; Shen et al.: 0.001)
    gamma: Positive = 1.0  # ratio scale
    beta: Fraction = 0.9  # ratio cap (budget pq: a group's pruned fraction; method pq: the rewired fraction)

    @model_validator(mode="after")
    def _p_below_q(self) -> "PQIndex":
        if self.p >= self.q:
            raise ValueError(f"q: must be > p ({self.p}), got {self.q}")
        return self


class PruneCfg(Section):
    """Dynamic pruning during training (see docs/methods.md); epochs count from 0.

    Structured methods keep a fraction ``keep`` of the conv *channels*; unstructured methods remove a
    fraction ``sparsity`` of the conv + linear *weights*. Each family's fields are refused for the other.
    ``method`` is a registered name (``snncompress info`` lists them) or a user's own
    ``package.module:Class`` (imported only when trusted, like a model factory); ``options`` are the
    method's own, checked by its ``Options`` model.
    """

    method: str = "sca"
    options: dict[str, Any] = Field(default_factory=dict)  # the method's own options (docs/methods.md)
    keep: Fraction = 0.3  # structured: target fraction kept, of the unit `budget_unit` names
    # what `keep` is a fraction of: a registered budget unit (conv channels, the dense model's MACs, its SOPs as
    # measured on training batches, its latency on deploy.runtime) or your own 'package.module:Class';
    # docs/methods.md, "Budget units"
    budget_unit: str = "channels"
    # budget_unit sops: weight of the loss term (SOPs / target - 1)^2 that holds the SOPs on the target
    # once the masks reach it (training after the selection moves the firing); 0: off
    sop_hold: NonNegative = 10.0
    # structured: fraction of all channels chosen by the regrowth signal, inside `keep`; null: the method's default
    # (`regrow_fraction`); 0: none
    regrow: FractionOpen | None = None
    sparsity: FractionOpen | None = None  # unstructured (required): target fraction of conv+linear weights removed
    warmup_epochs: NonNegativeInt = 2  # epochs before the first update (dense; pq: sparse from epoch 0)
    ramp_epochs: NonNegativeInt = 8  # cubic ramp of the budget to its target; 0 = one-shot (pq: sparse from the start)
    finetune_epochs: NonNegativeInt = 5  # last epochs with frozen masks
    update_every: PositiveInt = 1  # epochs between mask updates
    min_channels: PositiveInt = 2  # never fewer channels in a group (unstructured: non-empty filters per layer)
    min_fraction: FractionOpen = 0.0  # structured: nor fewer than this fraction of a group's channels (rounded up)
    # structured: one ranking of all channels (global) or every group keeping the same fraction of its own (layer)
    allocation: Literal["global", "layer"] = "global"
    # structured: after every mask update, BatchNorm statistics are re-estimated over this many training batches
    # (forward only, no gradient), so the next evaluation and the next window see the new network's; 0: off
    recalibrate_bn: Annotated[NonNegativeInt, at_most(MAX_BATCH)] = 8
    # round each group's kept channels up to a multiple (8 or 16 suit SIMD units); auto: the channel block of
    # deploy.runtime on this CPU (docs/methods.md, "Channel blocks")
    round_to: Annotated[int | str, PlainValidator(_round_to)] = 1
    budget: Literal["global", "pq"] = "global"  # one global ranking, or per-group budgets from the PQ index
    pq: PQIndex = PQIndex()  # budget pq: the PQ index constants

    @property
    def family(self) -> str | None:
        """``structured`` / ``unstructured``; for user code not imported yet, what the fields say."""
        return method_family(self.method) or ("unstructured" if self.sparsity is not None else "structured")

    @property
    def unstructured(self) -> bool:
        return self.family == "unstructured"

    @property
    def regrow_fraction(self) -> float:
        """``regrow``, or the method's default: its declared share of the kept channels times ``keep`` (criticality:
        5 %, its paper's), else 0.1 of all channels, at most a third of ``keep``."""
        if self.regrow is not None:
            return self.regrow
        share = METHODS.meta(self.method).get("regrow_share") if self.method in METHODS else None
        return share * self.keep if share is not None else min(0.1, self.keep / 3)

    @model_validator(mode="before")
    @classmethod
    def _legacy_and_options(cls, data: Any) -> Any:
        """Older spellings translated; a registered method's options checked by its own model and completed
        with its defaults (a user's method: when it is imported, see ``build_pruner``)."""
        if not isinstance(data, dict):
            return data
        data = translate_prune(data)
        method = data.get("method", "sca")
        if isinstance(method, str) and method in METHODS:
            schema = _builtin_options(method)
            given = data.get("options") or {}
            if schema is None and given:
                raise ValueError(f"options: method {method} has no options, got {given!r}")
            if schema is not None:
                options, errors = option_errors(schema, given)
                if errors:
                    raise ValueError(f"options{errors[0]}")
                data = {**data, "options": options.model_dump(mode="json")}
        return data

    @field_validator("method", "budget_unit")
    @classmethod
    def _known(cls, v: str, info: ValidationInfo) -> str:
        registry = METHODS if info.field_name == "method" else BUDGET_UNITS
        if v not in registry and not is_code_string(v):
            raise ValueError(f"unknown {registry.kind} {v!r}; registered: {', '.join(registry.names())} "
                             "(or your own as 'package.module:Class')")
        return v

    @model_validator(mode="after")
    def _regrow_inside_keep(self) -> "PruneCfg":
        if self.regrow is not None and self.regrow >= self.keep:
            raise ValueError(f"regrow: must be < keep ({self.keep}), got {self.regrow}")
        if self.budget == "pq" and self.allocation != "global":
            raise ValueError("allocation: budget pq shares the budget between groups itself; use allocation: global")
        if self.budget != "pq" and self.pq != PQIndex():
            raise ValueError("pq: only for budget: pq (method pq takes its constants in prune.options)")
        return self

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> "PruneCfg":
        # compared with the defaults, not model_fields_set: a dumped recipe (in a checkpoint) states them all
        defaults = PruneCfg.model_fields
        family = method_family(self.method)
        if family == "unstructured":
            if self.sparsity is None:
                raise ValueError(f"sparsity: required for method {self.method} (fraction of conv and linear "
                                 "weights removed, in [0, 1))")
            for key in STRUCTURED_ONLY:
                if getattr(self, key) != defaults[key].default:
                    raise ValueError(f"{key}: only for structured methods; method {self.method} prunes weights: "
                                     "set sparsity")
        elif family == "structured" and self.sparsity is not None:
            raise ValueError(f"sparsity: only for unstructured methods; method {self.method} keeps channels: set keep")
        return self



RUNTIMES = ("onnxruntime", "openvino")  # CPU runtimes an exported model is timed on (openvino: an optional extra)


class DeployCfg(Section):
    """Where the compressed model runs: what latency budgets are measured on and what `run` benches."""

    runtime: Literal[RUNTIMES] = "onnxruntime"  # openvino needs: pip install 'snncompress[openvino]'
    batch_size: Annotated[PositiveInt, at_most(MAX_BATCH)] = 32  # the batch a latency budget is measured at
    threads: Annotated[PositiveInt, at_most(MAX_WORKERS)] | None = None  # intra-op threads; null: every core this process may use


class ExportCfg(Section):
    """What ``run`` exports besides the ONNX files it benches."""

    nir: bool = False  # also model.nir: the slim network in NIR for neuromorphic hardware (docs: README, NIR)


class QuantWeightsCfg(Section):
    """How the deployed network's weights are quantised: symmetric integers of ``bits`` bits (-(2^(bits-1) - 1)
    to 2^(bits-1) - 1), one scale per output channel or one per tensor."""

    bits: Annotated[int, Field(ge=2, le=8)] = 8
    granularity: Literal["channel", "tensor"] = "channel"


class QuantCfg(Section):
    """Quantisation-aware training (docs/methods.md, "Quantisation"): the deployed weights (BatchNorm folded into
    the conv) are quantised in every forward pass, the gradient passing straight through, from ``start``:
    ``finetune``, once the masks are final (the slim fine-tune), or ``begin``, from the first epoch."""

    weights: QuantWeightsCfg = QuantWeightsCfg()
    start: Literal["finetune", "begin"] = "finetune"


FLOAT_BITS = 32  # the bit width of a weight that is not quantised (float32)


class Recipe(Section):
    name: RunName = "run"
    seed: Seed = 0
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    train: TrainCfg = TrainCfg()
    prune: PruneCfg | None = PruneCfg()
    baseline: bool = False  # `run` also trains the same recipe without pruning
    export: ExportCfg = ExportCfg()
    deploy: DeployCfg = DeployCfg()
    quant: QuantCfg | None = None  # quantisation-aware training (None: float32 weights)

    @property
    def weight_bits(self) -> int:
        """Bits per deployed weight: the quantisation's, else float32's."""
        return self.quant.weights.bits if self.quant is not None else FLOAT_BITS

    @model_validator(mode="after")
    def _schedule_fits(self) -> "Recipe":
        if self.train.distill is not None and self.model.weights is None:
            raise ValueError("train.distill: needs model.weights (the teacher is the network training starts from)")
        q = self.quant
        if q is not None and self.prune is not None and self.prune.unstructured:
            raise ValueError("quant: quantises the deployed network of a structured method or a dense recipe; "
                             f"{self.prune.method} is unstructured")
        if q is not None and self.export.nir and q.weights.granularity != "tensor":
            raise ValueError("export.nir: integer NIR needs one scale per layer (its neurons share one threshold): "
                             "set quant.weights.granularity: tensor")
        if q is not None and q.start == "finetune" and (self.prune is None or not self.train.slim_finetune
                                                        or self.prune.finetune_epochs == 0):
            raise ValueError("quant.start: finetune starts when the masks are final, in the slim fine-tune: it needs "
                             "a structured prune section with finetune_epochs >= 1 and train.slim_finetune: true; "
                             "use start: begin")
        p = self.prune
        if p is None:
            return self
        if not method_ramps(p.method):  # at its target from the start: no ramp
            if p.warmup_epochs + p.finetune_epochs > self.train.epochs:
                raise ValueError("prune: warmup_epochs + finetune_epochs must be <= train.epochs, got "
                                 f"{p.warmup_epochs} + {p.finetune_epochs} > {self.train.epochs}")
        elif p.warmup_epochs + max(1, p.ramp_epochs) + p.finetune_epochs > self.train.epochs:
            # one-shot (ramp 0) still needs the epoch that ends with its update
            raise ValueError(
                "prune: warmup_epochs + ramp_epochs (at least 1 epoch: the first update's) + finetune_epochs "
                f"must be <= train.epochs, got {p.warmup_epochs} + {p.ramp_epochs} + {p.finetune_epochs} > "
                f"{self.train.epochs}"
            )
        return self

    def user_code(self) -> list[str]:
        """The ``package.module:attribute`` strings of user code the recipe names (a model factory, a method,
        a budget unit): running the recipe trusts them (``snncompress.registry.trusted``)."""
        named = [self.model.factory, *((self.prune.method, self.prune.budget_unit) if self.prune else ())]
        return [c for c in named if c is not None and is_code_string(c)]

    def dense(self) -> "Recipe":
        """The same recipe without pruning (the baseline; quantised from the first epoch where the recipe
        quantises)."""
        quant = self.quant and self.quant.model_copy(update={"start": "begin"})  # no masks to wait for
        return self.model_copy(update={"prune": None, "baseline": False, "name": f"{self.name}-baseline",
                                       "quant": quant})


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict; raise :class:`RecipeError` with field-path messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = [format_error(err, Recipe) for err in e.errors(include_url=False)]
        raise RecipeError(f"{source}: " + "; ".join(lines)) from e


# A recipe is a few dozen lines; these bounds only stop input that would run away (a huge file, or a
# YAML "billion laughs" whose aliases expand a few lines into billions of nodes).
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    """Nodes of the document with every alias expanded (memoised, so it is cheap even for a bomb)."""
    key = id(node)
    if key not in memo:
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        memo[key] = 1
        memo[key] = min(limit + 1, 1 + sum(_expanded_nodes(c, memo, limit) for c in children))
    return memo[key]


def _duplicate_key(node: yaml.Node, seen: set[int]) -> str | None:
    """``line N: duplicate key 'k' (first on line M)`` for the first mapping that repeats a key (YAML loaders keep
    the last value silently), else None."""
    if id(node) in seen:
        return None
    seen.add(id(node))
    children = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                line = key.start_mark.line + 1
                if key.value in first:
                    return f"line {line}: duplicate key {key.value!r:.60} (first on line {first[key.value]})"
                first[key.value] = line
            children += [key, value]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    return next((d for d in (_duplicate_key(c, seen) for c in children) if d), None)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file (at most 1 MiB and 100,000 nodes with aliases expanded, no key twice in
    a section)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {size:,} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES:,})")
    try:
        text = path.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_nodes(node, {}, MAX_RECIPE_NODES) > MAX_RECIPE_NODES:
            raise RecipeError(f"{path}: YAML aliases expand to more than {MAX_RECIPE_NODES:,} nodes; refused "
                              "(a recipe needs a few dozen)")
        duplicate = _duplicate_key(node, set()) if node is not None else None
        if duplicate:
            raise RecipeError(f"{path}: {duplicate}; a key may appear once per section")
        data = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML{where}") from e
    except RecursionError as e:
        raise RecipeError(f"{path}: YAML nested too deeply for a recipe") from e
    return parse_recipe(data, str(path))
