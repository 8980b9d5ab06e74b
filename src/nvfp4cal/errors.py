"""User-facing errors: the entry point prints these as one line (no traceback) and exits 2."""


class UserError(ValueError):
    """A mistake in the input (path, override, data, weights) with a message that says what to do."""


class ExportError(UserError):
    """A checkpoint that cannot be written as asked (an existing directory, a layout that cannot hold
    the model, a NaN scale byte); nothing is left behind."""
