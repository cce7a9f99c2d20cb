"""User-facing errors: one line, a non-zero exit code, no traceback unless --debug.

Exit codes of the CLI (one owner: this module):

==== =====================================================================================
0    success
1    bad input (checkpoint, data, ONNX file, user code) or a failed equivalence verification
2    bad recipe or bad command-line usage
3    internal error: a bug in snncompress (the message names the exception; --debug shows it)
130  interrupted (Ctrl-C)
==== =====================================================================================
"""

EXIT_OK, EXIT_USER, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class SnnCompressError(Exception):
    """An error caused by the user's input (recipe, checkpoint, data, ONNX file)."""

    exit_code = EXIT_USER


class RecipeError(SnnCompressError):
    """The recipe is missing, unparsable or invalid."""

    exit_code = EXIT_USAGE


class UsageError(SnnCompressError):
    """A bad command-line option or argument value (e.g. an unknown runtime name)."""

    exit_code = EXIT_USAGE


class VerificationError(SnnCompressError):
    """A stage could not prove that its artifact computes the same function as its input."""

    exit_code = EXIT_USER


class ModelError(SnnCompressError):
    """A model with a layer or neuron that pruning (or a method) cannot handle exactly."""


class MaskError(SnnCompressError):
    """Channel or weight masks that do not fit the model (an unknown group, a wrong size, a group left empty)."""


def first_line(e: BaseException, typed: bool = True) -> str:
    """``Type: first line of the message`` (``typed=False``: the line alone; the type if there is no message):
    how a foreign exception is quoted in one line."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0]}" if typed else text.splitlines()[0]
