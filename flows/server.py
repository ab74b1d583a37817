"""Prefect's temporary server, made to live and die with the run that started it.

Prefect starts a temporary API server (``uvicorn``) as a child process when no ``PREFECT_API_URL`` is set.
Left as Prefect starts it, the child shares the run's process group and outlives it:

- Ctrl-C (SIGINT to the terminal's process group) stops the server first; the run, still training,
  then retries its API calls against a dead server for minutes instead of stopping;
- after a ``kill -9`` of the run the server is orphaned (parent 1), still listening and holding
  ``prefect.db``.

:func:`guard_temporary_server` starts it in its own session (terminal signals reach the run only; the run
stops the server on exit, as Prefect does) and behind a watchdog that stops it as soon as its parent
process is gone, however the parent died.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

# Run in the server process before uvicorn: a daemon thread that stops the server (SIGTERM: uvicorn's
# graceful shutdown) once the parent pid it was started by is no longer its parent.
_WATCHDOG = (
    "import os, signal, sys, threading, time, runpy\n"
    "parent = int(sys.argv.pop(1))\n"
    "def watch():\n"
    "    while os.getppid() == parent:\n"
    "        time.sleep(0.5)\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "threading.Thread(target=watch, daemon=True).start()\n"
    "runpy.run_module('uvicorn', run_name='__main__', alter_sys=True)\n"
)


class _GuardedSubprocess:
    """Stands in for the ``subprocess`` module inside Prefect's server module only."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:  # noqa: N802 (subprocess's name)
        if list(args[:3]) == [sys.executable, "-m", "uvicorn"]:
            args = [sys.executable, "-c", _WATCHDOG, str(os.getpid()), *args[3:]]
        return subprocess.Popen(args, start_new_session=True, **kwargs)


def guard_temporary_server() -> None:
    """Make every temporary server this process starts from now on a guarded one (idempotent)."""
    from prefect.server.api import server

    server.subprocess = _GuardedSubprocess()  # type: ignore[assignment]
