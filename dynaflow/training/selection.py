"""Checkpoint selection, one rule for every training stage of every method.

A stage scores its model at each evaluation (each epoch end, or every ``eval_every`` steps) on the
*selection split* and keeps the best-scoring weights:

* ``heldout`` (the default): the data stage's held-out training rows, never trained on. Dev stays unseen,
  so the dev scores reported afterwards are honest.
* ``dev``: what the official DynaBERT and Theseus code do. Dev then both chooses the weights and reports
  them: its scores are optimistic.
* ``last``: no selection, the weights of the last step.

:class:`BestWeights` keeps the best weights so far; its :meth:`~BestWeights.snapshot` goes into the training
checkpoint (``fit(extra_state=...)``), so a resumed run keeps the same ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dynaflow.data.splits import HELDOUT, TokenizedSplit, load_heldout


def selection_split(
    selection: str, data_dir: Path, dev: dict[str, TokenizedSplit]
) -> dict[str, TokenizedSplit] | None:
    """The split ``selection`` scores checkpoints on (None for ``last``: nothing is scored)."""
    if selection == "heldout":
        return {HELDOUT: load_heldout(data_dir)}
    if selection == "dev":
        return dev
    if selection == "last":
        return None
    raise ValueError(f"selection must be 'heldout', 'dev' or 'last', got {selection!r}")


class BestWeights:
    """The weights of ``model`` with the best selection score offered so far (ties keep the earlier)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.score = -float("inf")
        self.step = 0
        self.state: dict[str, torch.Tensor] | None = None
        self.results: Any = None  # what the caller scored, kept with the weights (e.g. per sub-network)

    def offer(self, step: int, score: float, results: Any = None) -> bool:
        """Keep the model's current weights if ``score`` beats the best so far; True when kept."""
        if not score > self.score:
            return False
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.score, self.step, self.results = score, step, results
        return True

    def restore(self) -> int | None:
        """Load the best weights into the model; the step they were taken at (None: nothing offered)."""
        if self.state is None:
            return None
        self.model.load_state_dict(self.state)
        return self.step

    def snapshot(self) -> dict[str, Any]:
        return {"score": self.score, "step": self.step, "state": self.state, "results": self.results}

    def load(self, snapshot: dict[str, Any] | None) -> None:
        if snapshot:
            self.score, self.step = snapshot["score"], snapshot["step"]
            self.state, self.results = snapshot["state"], snapshot["results"]

    @property
    def checkpoint_state(self) -> tuple[Any, Any]:
        """``fit(extra_state=...)``: saved with every training checkpoint, loaded back on resume."""
        return self.snapshot, self.load
