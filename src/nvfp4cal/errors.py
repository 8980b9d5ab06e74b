"""User-facing errors: the entry point prints these as one line (no traceback) and exits 2."""


class UserError(ValueError):
    """A mistake in the input (path, override, data, weights) with a message that says what to do."""
