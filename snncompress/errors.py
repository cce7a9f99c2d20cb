"""User-facing errors: one line, a non-zero exit code, no traceback unless --debug."""


class SnnCompressError(Exception):
    """An error caused by the user's input (recipe, checkpoint, data, ONNX file)."""

    exit_code = 1


class RecipeError(SnnCompressError):
    """The recipe is missing, unparsable or invalid."""

    exit_code = 2


class VerificationError(SnnCompressError):
    """A stage could not prove that its artifact computes the same function as its input."""

    exit_code = 1
