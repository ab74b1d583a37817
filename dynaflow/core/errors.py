"""The one class of error a person is meant to read.

A :class:`DynaflowError` is an *expected* failure (bad params, bad data, a missing or damaged input, a
broken store, a held lock, a permission): the CLI prints its message alone on stderr and exits 2, with no
traceback (``--debug`` or ``DYNAFLOW_DEBUG=1`` shows it). Its message names the file, line, key or path
and says what to do. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DynaflowError(Exception):
    """An expected failure whose message is the whole story (exit code 2, no traceback)."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop (SIGINT: Ctrl-C, or SIGTERM); exit code 128 + the signal's number."""

    def __init__(self, signum: int = 2):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
