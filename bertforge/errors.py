"""User-facing errors: the CLI prints their message as one line and exits 2."""


class BertforgeError(Exception):
    """A problem with the user's input (files, config values, run directories)."""


class Interrupted(Exception):
    """Training stopped by SIGTERM/SIGINT after saving a checkpoint; exit 128 + signum."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} at step {step}")
        self.signum, self.step = signum, step


class Terminated(BaseException):
    """A signal (SIGTERM, or a second SIGTERM/SIGINT during training) stopped the command:
    raised where the program was, so that its cleanup runs; exit 128 + signum. A
    BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum


def signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class NonFiniteStep(BertforgeError):
    """A step's loss or gradient norm was not finite, with on_nan 'stop': the update was
    not applied."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what
