"""Status lines for people, in one place: `say` writes `[slm] ...` to stderr, so a command's stdout carries
only its results (`slm generate`'s text, `slm eval --output -`'s JSON, `slm config show`'s YAML, the train rows).
"""

from __future__ import annotations

import contextlib
import sys

PREFIX = "[slm]"


def say(message: str, main: bool = True) -> None:
    """One status line on stderr; `main=False` (a rank other than 0) stays silent."""
    if main:
        print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


def library_logs_to_stderr() -> None:
    """Route DeepSpeed's logger to stderr, its import-time accelerator warning included.

    DeepSpeed creates its StreamHandler on stdout when first imported; created while stdout points at stderr,
    the handler keeps stderr for the life of the process. Call before anything imports deepspeed.
    """
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed.utils.logging  # noqa: F401
