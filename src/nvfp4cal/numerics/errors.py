"""User-facing errors: the entry point prints these as one line (no traceback) and exits 2."""


class UserError(ValueError):
    """A mistake in the input (path, override, data, weights) with a message that says what to do."""


class ExportError(UserError):
    """A checkpoint that cannot be written as asked (an existing directory, a layout that cannot hold
    the model, a NaN scale byte); nothing is left behind."""


class RunStopped(Exception):
    """SIGTERM or SIGINT arrived: the run stops where it is, cleaning up as for any error."""

    def __init__(self, signum: int, where: str | None):
        import signal

        self.signum, self.where = signum, where
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f" during {where}" if where else ""))
