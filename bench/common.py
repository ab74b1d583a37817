"""What every measuring script in bench/ does after parsing its arguments: run, print Markdown, save JSON."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from dynaflow.core.artifacts import atomic_write_json


def run_and_report(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """Measure (offline: no hub), print the Markdown table, write the raw result to ``args.out`` if set."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    print(markdown(result))
    if args.out is not None:
        atomic_write_json(args.out, result)
        print(f"\nwrote {args.out}")
