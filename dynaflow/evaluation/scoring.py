"""Dev-set evaluation of any callable that maps a batch to logits (a full model or a sub-network)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dynaflow.data.splits import TokenizedSplit, collate, load_split
from dynaflow.evaluation.metrics import compute_metrics, main_score
from dynaflow.training.selection import BestWeights

log = logging.getLogger(__name__)

LogitsFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@torch.no_grad()
def predict(logits_fn: LogitsFn, split: TokenizedSplit, batch_size: int = 128) -> np.ndarray:
    """Logits of every example, in the split's order.

    Batches are cut from the examples sorted by length, so each pads little: in the split's own order a
    batch of 128 pads nearly every example to the longest sentence, about twice the work on SST-2 dev.
    Padding is masked, so the logits are the same either way up to rounding.
    """
    if len(split) == 0:
        return np.zeros((0, 1), dtype=np.float32)
    order = np.argsort([len(x) for x in split.input_ids], kind="stable")
    parts = [
        logits_fn(collate(split, order[i : i + batch_size])).float().cpu().numpy()
        for i in range(0, len(order), batch_size)
    ]
    logits = np.empty((len(split), parts[0].shape[1]), dtype=np.float32)
    logits[order] = np.concatenate(parts)
    return logits


def evaluate(
    logits_fn: LogitsFn,
    task: str,
    dev: dict[str, TokenizedSplit],
    batch_size: int = 128,
    logits_out: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Task metrics on every dev split; the first split's keys are bare, others are prefixed by split name.

    ``score`` is the task's main metric on the first dev split (what checkpoint selection sums).
    ``logits_out``: filled with each split's logits (to compare two models' predictions).
    """
    metrics: dict[str, float] = {}
    for i, (name, split) in enumerate(dev.items()):
        logits = predict(logits_fn, split, batch_size)
        if logits_out is not None:
            logits_out[name] = logits
        predictions = logits[:, 0] if logits.shape[1] == 1 else logits
        result = compute_metrics(task, predictions, split.labels)
        if i == 0:
            metrics.update(result)
            metrics["score"] = main_score(task, result)
        else:
            metrics.update({f"{name}.{k}": v for k, v in result.items()})
    return metrics


def epoch_end_selection(
    model: torch.nn.Module,
    task: str,
    dev: dict[str, TokenizedSplit],
    chooser: dict[str, TokenizedSplit] | None,
    best: BestWeights,
    steps_per_epoch: int,
    batch_size: int,
    name: str,
) -> Callable[[int], dict[str, float]]:
    """``fit``'s ``on_epoch_end`` for a stage that chooses among epoch ends (teacher, Theseus): dev scores
    logged, the weights offered to ``best`` at their score on ``chooser`` (dev itself is not scored twice;
    None: nothing is chosen, the last weights stay)."""

    def on_epoch_end(epoch: int) -> dict[str, float]:
        metrics = evaluate(hf_logits(model), task, dev, batch_size)
        log.info("%s epoch %d dev: %s", name, epoch, metrics)
        logged = {f"dev.{k}": v for k, v in metrics.items()}
        if chooser is not None:
            chosen_by = metrics if chooser is dev else evaluate(hf_logits(model), task, chooser, batch_size)
            best.offer(epoch * steps_per_epoch, chosen_by["score"])
            logged["selection.score"] = chosen_by["score"]
        return logged

    return on_epoch_end


def load_dev(data_dir: Path, dev_splits: list[str]) -> dict[str, TokenizedSplit]:
    return {name: load_split(data_dir, name) for name in dev_splits}


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without labels, on the model's device (a GPU when training ran on one)."""
    dev = next(model.parameters()).device
    return {k: v.to(dev) for k, v in batch.items() if k != "labels"}


def hf_logits(model: torch.nn.Module) -> LogitsFn:
    """Wrap a Hugging Face sequence classifier as a batch -> logits function (eval mode)."""

    def fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model.eval()
        return model(**model_inputs(model, batch)).logits

    return fn
