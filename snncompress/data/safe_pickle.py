"""A restricted unpickler for the CIFAR python layout: plain containers, strings, bytes, numpy arrays.

Pickle can call any importable callable while loading. Only the globals numpy needs to rebuild an
array (and the ``_codecs.encode`` that protocol-2 pickles use for bytes) are admitted; anything else
is refused before it is looked up, so it never runs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from ..errors import SnnCompressError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_pickle(path: Path) -> Any:
    """Unpickle ``path`` admitting only plain data and numpy arrays (``encoding='bytes'``, as CIFAR needs)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise SnnCompressError(f"{path}: refused: the pickle references {e} (only plain containers, strings, "
                               "bytes and numpy arrays are allowed; nothing was executed)") from e
    except Exception as e:  # truncated or not a pickle at all
        raise SnnCompressError(f"{path}: not a readable CIFAR python batch ({type(e).__name__})") from e
