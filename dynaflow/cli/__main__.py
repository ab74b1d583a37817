"""``python -m dynaflow.cli``: what torchrun and ``accelerate launch`` run in every process."""

from dynaflow.cli.commands import main

raise SystemExit(main())
