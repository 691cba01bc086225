"""The data pipeline's user-facing error: one paragraph naming the file and what was expected."""


class DataError(Exception):
    """Bad input or a broken prepared dataset; the CLI prints the message without a traceback."""
