"""The training stages' user-facing error: one paragraph naming what is wrong and what was expected."""


class TrainError(Exception):
    """A refused run (mismatched checkpoint, bad batch arithmetic, ...); the CLI prints it without a traceback."""
