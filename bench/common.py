"""What every measuring script in bench/ does after parsing its arguments: run, print Markdown, save JSON."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from dynaflow.core.artifacts import atomic_write_json


def project_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments of a script that reads a trained project: ``--project`` (required) and ``--out``."""
    from pathlib import Path

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="a project after `dynaflow run`")
    parser.add_argument("--out", type=Path, help="write the raw result here (JSON)")
    return parser


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
