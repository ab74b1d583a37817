"""Dev metrics of every (width, depth) sub-network of an elastic model, without extracting them."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dynaflow.data.splits import TokenizedSplit
from dynaflow.evaluation.scoring import evaluate, model_inputs


def evaluate_grid(
    model: torch.nn.Module,
    task: str,
    dev: dict[str, TokenizedSplit],
    widths: list[float],
    depths: list[float],
    batch_size: int = 128,
) -> dict[str, dict[str, float]]:
    """Dev metrics of every (width, depth) sub-network of an elastic model, keyed ``w{width}_d{depth}``."""
    model.eval()
    results = {}
    pairs = [(depth, width) for depth in depths for width in widths]
    for depth, width in tqdm(pairs, desc="dev scores", unit="subnet", leave=False, dynamic_ncols=True):

        def logits(batch: dict[str, torch.Tensor], w: float = width, d: float = depth) -> torch.Tensor:
            return model(**model_inputs(model, batch), width_mult=w, depth_mult=d).logits

        results[f"w{width}_d{depth}"] = evaluate(logits, task, dev, batch_size)
    return results
