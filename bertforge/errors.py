"""User-facing errors: the CLI prints their message as one line and exits 2."""


class BertforgeError(Exception):
    """A problem with the user's input (files, config values, run directories)."""


class Interrupted(Exception):
    """Training stopped by SIGTERM/SIGINT after saving a checkpoint; exit 128 + signum."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} at step {step}")
        self.signum, self.step = signum, step


class NonFiniteStep(BertforgeError):
    """A step's loss or gradient norm was not finite, with on_nan 'stop': the update was
    not applied."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what
