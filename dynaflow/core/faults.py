"""Named fault points, for the fault-injection tests: a run killed here must resume to the same result.

``DYNAFLOW_FAULT=POINT[:SIGNAL]`` makes the process send itself SIGNAL (default KILL; INT and TERM too)
when it reaches POINT, e.g. ``step.teacher.3`` (after the teacher's third optimizer step) or
``commit.prepared`` (a stage's output is complete in its temporary folder, not yet renamed into place).
Unset, a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "DYNAFLOW_FAULT"


def fault_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, sig = wanted.partition(":")
    if point == name:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))
