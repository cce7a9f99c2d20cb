"""The building blocks of the recipe schema and of the models' and methods' own options (torch-free):
bounded number types, the strict section base, and one-line, field-path error messages."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from .errors import RecipeError
from .legacy import LEGACY_PRUNE


def _finite(v: float) -> None:
    # a float field accepts "inf" and "nan" from YAML (.inf, .nan): no network trains with either
    if math.isnan(v) or math.isinf(v):
        raise ValueError("must be a finite number")


def _fraction(v: float) -> float:
    if not 0 < v <= 1:
        raise ValueError("must be in (0, 1]")
    return v


def _fraction_open(v: float) -> float:
    if not 0 <= v < 1:
        raise ValueError("must be in [0, 1)")
    return v


def _positive(v: float) -> float:
    _finite(v)
    if not v > 0:
        raise ValueError("must be > 0")
    return v


def _above_one(v: float) -> float:
    _finite(v)
    if not v > 1:
        raise ValueError("must be > 1")
    return v


def _open_unit(v: float) -> float:
    if not 0 < v < 1:
        raise ValueError("must be in (0, 1)")
    return v


def _non_negative(v: float) -> float:
    _finite(v)
    if not v >= 0:
        raise ValueError("must be >= 0")
    return v


def at_most(limit: int | float) -> AfterValidator:
    """An upper bound, for numbers that size an allocation (time steps, widths, batches, processes): a typo or
    a hostile recipe is refused with the bound instead of exhausting memory."""
    def check(v):
        if v > limit:
            raise ValueError(f"must be at most {limit:,}")
        return v
    return AfterValidator(check)


Fraction = Annotated[float, AfterValidator(_fraction)]
FractionOpen = Annotated[float, AfterValidator(_fraction_open)]
Positive = Annotated[float, AfterValidator(_positive)]
PositiveInt = Annotated[int, AfterValidator(_positive)]
NonNegative = Annotated[float, AfterValidator(_non_negative)]
NonNegativeInt = Annotated[int, AfterValidator(_non_negative)]
OpenUnit = Annotated[float, AfterValidator(_open_unit)]
AboveOne = Annotated[float, AfterValidator(_above_one)]
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
Seed = Annotated[NonNegativeInt, at_most(MAX_SEED)]


class Section(BaseModel):
    """A recipe section: unknown keys refused, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _section(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The model class at the parent of ``loc`` (None where the path leaves the schema)."""
    model: Any = root
    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _allowed_keys(loc: tuple, root: type[BaseModel]) -> list[str]:
    """Field names allowed at the parent of ``loc`` (for 'unknown key' messages)."""
    model = _section(loc, root)
    return list(model.model_fields) if model is not None else []


def _names_a_key(head: str, loc: tuple, root: type[BaseModel]) -> bool:
    """Whether ``head`` (a model-level validator's ``head: message``) is a key of the section at ``loc``: a field
    (``options.x``: an option of the field ``options``), an older spelling, or any key of a section that takes
    open-ended keys (a model's options)."""
    model = _section((*loc, head), root)
    if model is None:
        return False
    return (head.split(".")[0] in model.model_fields or head in LEGACY_PRUNE
            or (model.model_config.get("extra") == "allow" and head.isidentifier()))


def format_error(err: dict, root: type[BaseModel]) -> str:
    """One error as ``field.path: what is wrong, got <value>`` (the path from ``root``)."""
    loc = tuple(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc, root)
        return f"{'.'.join(map(str, loc))}: unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    head, sep, rest = msg.partition(": ")
    model_level = err["type"] == "value_error" and sep and _names_a_key(head, loc, root)
    if model_level:  # a model-level validator names the field it is about; its input is the whole section
        loc, msg = (*loc, head), rest
    path = ".".join(map(str, loc)) or "recipe"
    msg = msg.replace("Input should be", "must be")
    if model_level or err["type"] == "missing" or ", got " in msg:
        return f"{path}: {msg}"
    return f"{path}: {msg[0].lower() + msg[1:]}, got {err['input']!r}"


def option_errors(schema: Any, data: Any) -> tuple[BaseModel | None, list[str]]:
    """``data`` validated by a method's own options model ``schema``: (the options, []) or (None, the errors as
    suffixes of the field's path: ``.option: what is wrong`` or ``: what is wrong``)."""
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        return None, [f": the method's Options is not a pydantic model (got {type(schema).__name__})"]
    if not isinstance(data, dict):
        return None, [f": must be a mapping of the method's options, got {type(data).__name__}"]
    try:
        return schema.model_validate(data), []
    except ValidationError as e:
        lines = [format_error(err, schema) for err in e.errors(include_url=False)]
        return None, [line.removeprefix("recipe") if line.startswith("recipe: ") else "." + line for line in lines]


def validate_options(schema: Any, data: Any, where: str) -> BaseModel:
    """``data`` validated by a method's own options model ``schema``, or a :class:`RecipeError` naming ``where``
    (the recipe field, e.g. ``prune.options``) and each bad option."""
    options, errors = option_errors(schema, data)
    if errors:
        raise RecipeError("; ".join(where + line for line in errors))
    return options
