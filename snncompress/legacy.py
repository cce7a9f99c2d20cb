"""The one translation of older recipes (and of the recipes stored in older checkpoints) to this version's
spellings (docs: the README's "Older spellings"). Torch-free, like the schema that applies it."""

from __future__ import annotations

# Recipes written by snncompress <= 0.1.0 (and the recipes stored in its checkpoints) state these model keys with
# these values for every model; each equals the default of every builder that takes it, so it is dropped.
LEGACY_MODEL = {"layers": None, "width": 1.0, "readout_pool": 1, "pool": "max",
                "neuron": {"type": "lif", "tau": 2.0, "v_threshold": 1.0, "reset": "hard", "surrogate": "atan",
                           "alpha": 2.0, "detach_reset": True}}


def translate_model(data: dict) -> dict:
    """A model section without the keys 0.1.0 stated at their defaults (``LEGACY_MODEL``)."""
    return {k: v for k, v in data.items() if not (k in LEGACY_MODEL and v == LEGACY_MODEL[k])}


# The flat method fields of snncompress <= 0.1.0 and where they live now. A value equal to the old default is
# dropped (old dumps state every field); another value moves, or is refused with its new spelling.
LEGACY_PRUNE = {  # old key: (old default, the methods whose options hold it now, the option's name)
    "l1_gamma": (1e-4, ("criticality",), "l1_gamma"),
    "weight_regrow": (0.5, ("criticality_unstructured",), "weight_regrow"),
    "scope": ("layer", ("pq",), "scope"),
    "er_init": (True, ("pq",), "er_init"),
    **{f"pq_{k}": (d, ("pq",), k) for k, d in (("p", 0.5), ("q", 1.0), ("eta", 0.0), ("gamma", 1.0), ("beta", 0.9))},
}


def translate_prune(data: dict) -> dict:
    """A prune section with the flat method fields of 0.1.0 moved, dropped or refused (``LEGACY_PRUNE``)."""
    data = dict(data)
    method = data.get("method", "sca")
    if not all(isinstance(data.get(k) or {}, dict) for k in ("options", "pq")):
        return data  # not mappings: the schema refuses them, naming the field
    options, pq = dict(data.get("options") or {}), dict(data.get("pq") or {})
    for old, (default, owners, new) in LEGACY_PRUNE.items():
        if old not in data:
            continue
        value = data.pop(old)
        if value == default:
            continue
        if method in owners:
            options.setdefault(new, value)
        elif old.startswith("pq_") and data.get("budget") == "pq":
            pq.setdefault(new, value)
        else:
            where = f"prune.options.{new} (method {' / '.join(owners)})" + \
                (f" or prune.pq.{new} (budget: pq)" if old.startswith("pq_") else "")
            raise ValueError(f"{old}: now spelled {where}; not an option of method {method}")
    if options:
        data["options"] = options
    if pq:
        data["pq"] = pq
    return data
