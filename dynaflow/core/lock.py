"""One run per project at a time: a file lock that every command that writes holds while it works.

The lock is ``.dynaflow/lock`` (``filelock``: an OS-level lock that the kernel releases when its process
dies, so the lock of a killed run is free again at once; nothing stale to clean up). Beside it,
``.dynaflow/lock.holder`` says who holds it, for the message a second run prints. Processes a holder
starts itself (torchrun ranks of a training stage) inherit the lock through ``DYNAFLOW_LOCK_HOLDER``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from dynaflow.core.errors import DynaflowError

HOLDER_ENV = "DYNAFLOW_LOCK_HOLDER"  # "<project root>": this process runs under a parent's lock


class ProjectLocked(DynaflowError):
    """Another run holds the project lock and the caller would not wait."""


def lock_path(root: Path) -> Path:
    return Path(root).resolve() / ".dynaflow" / "lock"


def holder(root: Path) -> str:
    """Who holds the lock, in words ("pid 123 on host, `dynaflow run`, since 10:02:11")."""
    try:
        info = json.loads(lock_path(root).with_suffix(".holder").read_text())
    except (OSError, ValueError):
        return "another process (no holder record)"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')}, `{info.get('command')}`, since {since}"


@contextlib.contextmanager
def project_lock(
    root: Path, wait: bool = True, say: Callable[[str], None] = lambda text: print(text, file=sys.stderr)
) -> Iterator[None]:
    """Hold the project's lock for the block. Taken: wait (saying who holds it) or, with ``wait=False``,
    raise :class:`ProjectLocked`. Re-entrant for the processes a holder starts (see ``HOLDER_ENV``)."""
    root = Path(root).resolve()
    if os.environ.get(HOLDER_ENV) == str(root):
        yield
        return
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = holder(root)
        if not wait:
            raise ProjectLocked(
                f"{root}: another dynaflow run is working in this project ({who}); "
                "wait for it, or run without --no-wait to queue behind it"
            ) from None
        say(f"waiting for the project lock {path}: held by {who} (Ctrl-C to give up)")
        lock.acquire()
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}  # fmt: skip
        path.with_suffix(".holder").write_text(json.dumps(record))
        previous = os.environ.get(HOLDER_ENV)
        os.environ[HOLDER_ENV] = str(root)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(HOLDER_ENV, None)
            else:
                os.environ[HOLDER_ENV] = previous
    finally:
        lock.release()
