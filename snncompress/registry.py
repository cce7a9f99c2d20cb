"""Name registries for models, pruning methods, budget units and hardware targets, in the style of timm's ``register_model``.

Torch-free on purpose: the recipe schema (:mod:`snncompress.config`) validates ``model.name``,
``prune.method`` and ``prune.budget_unit`` against these names without importing torch. Built-in entries are
declared here as ``"module:attribute"`` strings and imported on first use; the modules they point to register
the real object with the same decorator a user calls (``@sc.register_model`` / ``@sc.register_method`` /
``@sc.register_budget_unit``), and a test checks that both agree.

User code named in a recipe (``"package.module:attribute"``: a model factory, a method or a budget unit) is
imported only when trusted: inside :func:`trusted` (the train and run stages trust what the recipe they run
names), or with an explicit ``trust=True`` (``--trust-code``). A checkpoint is a file people pass around;
naming code in it is not enough to run that code.
"""

from __future__ import annotations

import contextvars
import importlib
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .errors import SnnCompressError, first_line

CODE_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
FAMILIES = ("structured", "unstructured")  # methods prune channels (gates) or single weights (weight masks)


class UntrustedCodeError(SnnCompressError):
    """User code (a model factory or a method) is untrusted, malformed or cannot be imported."""


def is_code_string(text: str) -> bool:
    """True for ``package.module:attribute``."""
    return isinstance(text, str) and bool(CODE_PATTERN.fullmatch(text))


# the user code trusted in the current context (a context variable: it ends with the block that trusts it)
_TRUSTED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("snncompress_trusted", default=frozenset())


@contextmanager
def trusted(*codes: str | None) -> Iterator[None]:
    """Allow the ``package.module:attribute`` strings ``codes`` (None and names are ignored) to be imported
    and run inside the block, e.g. what the recipe being run names."""
    token = _TRUSTED.set(_TRUSTED.get() | {c for c in codes if c is not None and is_code_string(c)})
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def is_trusted(code: str) -> bool:
    return code in _TRUSTED.get()


def import_code(code: str, what: str, trust: bool = False) -> Any:
    """The object ``package.module:attribute`` names; refused, without importing, unless ``trust`` or
    trusted in this context (:func:`trusted`)."""
    if not is_code_string(code):
        raise UntrustedCodeError(f"{what}: must be 'package.module:attribute', got {code!r}")
    if not (trust or is_trusted(code)):
        raise UntrustedCodeError(f"{what} {code!r} is not trusted: using it would import and run its code; refused "
                                 "(pass --trust-code, or trust_factory=True in Python, if you trust it)")
    module_name, attr_path = code.split(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # the user's module may raise anything on import
        raise UntrustedCodeError(f"{what} {code!r}: cannot import {module_name!r} ({first_line(e)})") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise UntrustedCodeError(f"{what} {code!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    return obj


class Registry:
    """``name -> object`` with metadata; built-in entries are ``module:attribute`` strings until first use."""

    def __init__(self, kind: str, builtins: dict[str, tuple[str, dict]]):
        self.kind = kind
        self._lazy = dict(builtins)
        self._objects: dict[str, Any] = {}
        self._meta: dict[str, dict] = {name: dict(meta) for name, (_, meta) in builtins.items()}

    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        """Decorator: register ``obj`` under ``name`` (a later registration replaces an earlier one)."""
        def deco(obj: Any) -> Any:
            self._objects[name] = obj
            self._meta[name] = meta
            return obj
        return deco

    def names(self) -> list[str]:
        return sorted(set(self._lazy) | set(self._objects))

    def meta(self, name: str) -> dict:
        """What the registration said about ``name`` (e.g. a method's family), without importing it."""
        return self._meta[name]

    def get(self, name: str) -> Any:
        if name not in self._objects and name in self._lazy:
            importlib.import_module(self._lazy[name][0].split(":")[0])  # registers it
        if name not in self._objects:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._objects[name]

    def loaded(self, name: str) -> Any:
        """The object registered under ``name`` if its module is imported already (None otherwise: nothing is
        imported here)."""
        return self._objects.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._lazy or name in self._objects

    def resolve(self, name: str, what: str, trust: bool = False) -> Any:
        """A registered name's object, or the user code ``package.module:attribute`` names (imported only
        when trusted, see :func:`import_code`); ``what`` names the recipe field in messages."""
        return self.get(name) if name in self else import_code(name, what, trust)


_VGG, _RESNET = "snncompress.models.vgg", "snncompress.models.resnet"
MODELS = Registry("model", {
    "vgg": (f"{_VGG}:vgg", {}), "vgg16": (f"{_VGG}:vgg16", {}),
    **{f"{p}resnet{d}": (f"{_RESNET}:{p}resnet{d}", {}) for p in ("", "sew_") for d in (18, 19, 20)},
})

# a method's metadata, readable without importing it: its family, its options model (torch-free), "ramp": False
# for a method at its target from the first epoch, and "regrow_share": its default regrowth part of the kept
# channels (prune.regrow unset); register_method derives the same from the class
_S, _U, _OPT = {"family": "structured"}, {"family": "unstructured"}, "snncompress.prune.options"
METHODS = Registry("pruning method", {
    "sca": ("snncompress.prune.sca:ActivityScorer", _S),
    "random": ("snncompress.prune.baselines:RandomScorer", _S),
    "l1": ("snncompress.prune.baselines:L1Scorer", _S),
    "bn": ("snncompress.prune.baselines:BNScorer", _S),
    "tp_taylor": ("snncompress.prune.tp_criteria:TPTaylorScorer", _S),
    "tp_lamp": ("snncompress.prune.tp_criteria:TPLampScorer", _S),
    "criticality": ("snncompress.prune.criticality:CriticalityScorer",
                    {**_S, "options": f"{_OPT}:CriticalityOptions", "regrow_share": 0.05}),
    "criticality_unstructured": ("snncompress.prune.unstructured:CriticalityWeightPruner",
                                 {**_U, "options": f"{_OPT}:CriticalityWeightOptions"}),
    "pq": ("snncompress.prune.unstructured:PQWeightPruner", {**_U, "options": f"{_OPT}:PQOptions", "ramp": False}),
})


BUDGET_UNITS = Registry("budget unit", {
    "channels": ("snncompress.prune.costs.channels:Channels", {}),
    "macs": ("snncompress.prune.costs.macs:MacCost", {}),
    "sops": ("snncompress.prune.costs.sops:SopCost", {}),
    "memory": ("snncompress.prune.costs.memory:MemoryCost", {}),
    "latency": ("snncompress.runtime.latency:LatencyCost", {}),
})


TARGETS = Registry("hardware target", {"speck": ("snncompress.targets.speck:Speck", {})})


def register_model(name: str) -> Callable:
    """Register a model builder ``fn(in_channels, num_classes, **kwargs) -> nn.Module`` under ``name``."""
    return MODELS.register(name)


def register_method(name: str, family: str = "structured") -> Callable:
    """Register a pruning method under ``name``.

    ``family="structured"``: a :class:`~snncompress.prune.scorer.Scorer` subclass (it scores channels;
    selection, schedule and gates are shared). ``family="unstructured"``: a class implementing the
    :class:`~snncompress.prune.pruner.Pruner` protocol itself (weight masks). The class's ``Options`` (a pydantic
    model of the method's own options, ``prune.options``), ``ramps = False`` (at its target from the first
    epoch) and ``regrow_share`` (its default regrowth part of the kept channels) are recorded with it.
    """
    if family not in FAMILIES:
        raise ValueError(f"register_method: family must be one of {', '.join(FAMILIES)}, got {family!r}")

    def deco(cls: Any) -> Any:
        meta: dict[str, Any] = {"family": family}
        options = getattr(cls, "Options", None)
        if getattr(options, "model_fields", None):  # a pydantic model with at least one option
            meta["options"] = f"{options.__module__}:{options.__qualname__}"
        if getattr(cls, "ramps", True) is False:
            meta["ramp"] = False
        if getattr(cls, "regrow_share", None) is not None:
            meta["regrow_share"] = cls.regrow_share
        return METHODS.register(name, **meta)(cls)
    return deco


def register_budget_unit(name: str) -> Callable:
    """Register a budget unit under ``name``: a :class:`~snncompress.prune.costs.unit.CostUnit` subclass
    (``prune.budget_unit: name``; docs/methods.md, "Adding a budget unit")."""
    return BUDGET_UNITS.register(name)


def register_target(name: str) -> Callable:
    """Register a hardware target under ``name``: a :class:`~snncompress.targets.base.Target` subclass
    (``snncompress check --target name``)."""
    return TARGETS.register(name)


def list_models() -> list[str]:
    return MODELS.names()


def list_methods() -> list[str]:
    return METHODS.names()
