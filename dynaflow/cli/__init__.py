"""The ``dynaflow`` command line: the top layer, over ``flows`` and ``stages`` (see ARCHITECTURE.md)."""

from dynaflow.cli.commands import main

__all__ = ["main"]
