"""Data stage: read a GLUE task, tokenise it with the backbone's tokenizer, write Parquet splits.

Outputs (in ``out_dir``): ``train.parquet``, one Parquet file per dev split, ``task.json`` (task metadata
that drives every later stage: labels, regression or not, metrics) and ``tokenizer/`` (the exact tokenizer
used, so later stages and exported models never re-resolve it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from dynaflow.config import ConfigError, DataConfig, Params
from dynaflow.core.artifacts import atomic_write_json
from dynaflow.core.tracking import NullTracker
from dynaflow.data.glue import SplitData, TaskSpec, find_glue_dir, get_task, load_split
from dynaflow.data.splits import HELDOUT, TASK_FILE, TOKENIZER_DIR, write_split
from dynaflow.evaluation.metrics import compute_metrics, main_score
from dynaflow.models.backbone import load_tokenizer, local_files
from stages.registry import Stage, StageContext, register

log = logging.getLogger(__name__)


def input_files(cfg: DataConfig) -> list[Path]:
    """The GLUE files this stage reads (hashed into its cache key); empty when reading from the hub."""
    root = find_glue_dir(cfg.glue_dir)
    if root is None:
        return []
    task = get_task(cfg.task)
    return sorted(p for p in (root / task.dir_name).glob("*.tsv") if p.stem in ("train", *task.dev_splits))


def _rows(split: SplitData, keep: np.ndarray, with_skipped: bool = True) -> SplitData:
    """The rows ``keep`` of ``split`` in that order; ``with_skipped``: it carries the malformed-row count."""
    return SplitData(
        [split.text_a[i] for i in keep],
        None if split.text_b is None else [split.text_b[i] for i in keep],
        [split.labels[i] for i in keep],
        split.n_skipped if with_skipped else 0,
        split.skipped if with_skipped else [],
        split.source,
    )


def train_and_heldout(
    split: SplitData, limit: int | None, heldout: int, seed: int
) -> tuple[SplitData, SplitData]:
    """(the training subset, the held-out rows): disjoint, both seeded.

    One seeded permutation of the training split: the first ``limit`` rows train (the same subset as
    without a held-out slice), the next ``heldout`` rows are held out. When fewer than ``limit + heldout``
    rows exist, the held-out rows come off the training subset instead.
    """
    n = len(split.text_a)
    if heldout >= n:
        raise ConfigError(
            f"data.heldout_examples={heldout} leaves nothing to train on ({n} training examples); "
            "use fewer, or 0 (no held-out slice: selection must then be dev or last)"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_train = min(n if limit is None else limit, n - heldout)
    held = _rows(split, np.sort(order[n_train : n_train + heldout]), with_skipped=False)  # counted once
    return _rows(split, np.sort(order[:n_train])), held


def _first(split: SplitData, limit: int | None) -> SplitData:
    return split if limit is None else _rows(split, np.arange(min(limit, len(split.text_a))))


def chance_scores(task: TaskSpec, train_labels: np.ndarray, dev_labels: np.ndarray) -> dict[str, float]:
    """The dev metrics of always answering the training set's majority class (regression: its mean).

    What any model must clearly beat to have learnt something; ``score`` is the main metric.
    """
    if task.is_regression:
        constant = np.full(len(dev_labels), float(np.mean(train_labels)))
    else:
        constant = np.full(len(dev_labels), int(np.bincount(train_labels.astype(np.int64)).argmax()))
    metrics = compute_metrics(task, constant, dev_labels)
    return metrics | {"score": main_score(task, metrics)}


def prepare(cfg: DataConfig, backbone: str, seed: int, out_dir: Path, tracker: NullTracker) -> dict[str, Any]:
    task = get_task(cfg.task)
    tokenizer = load_tokenizer(backbone)
    labels_of: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    skipped: dict[str, int] = {}
    splits: dict[str, SplitData] = {}
    for name in ("train", *task.dev_splits):
        split = load_split(task, name, cfg.glue_dir, skip_malformed=cfg.skip_malformed)
        if name == "train":
            splits["train"], splits[HELDOUT] = train_and_heldout(
                split, cfg.max_train_examples, cfg.heldout_examples, seed
            )
        else:
            splits[name] = _first(split, cfg.max_dev_examples)
    for name, split in splits.items():
        if not split.labels:  # no held-out slice (data.heldout_examples: 0)
            continue
        if split.n_skipped:
            log.warning(
                "%s: skipped %d malformed row(s), e.g. %s", split.source, split.n_skipped, split.skipped[:3]
            )
        enc = tokenizer(
            split.text_a,
            split.text_b,
            truncation=True,
            max_length=cfg.max_seq_length,
            return_token_type_ids=True,
        )
        labels = np.asarray(split.labels, dtype=np.float32 if task.is_regression else np.int64)
        write_split(out_dir / f"{name}.parquet", enc["input_ids"], enc["token_type_ids"], labels)
        counts[name], skipped[name] = len(labels), split.n_skipped
        labels_of[name] = labels
    tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    meta = {
        "task": task.name,
        "num_labels": 1 if task.is_regression else len(task.labels),
        "is_regression": task.is_regression,
        "labels": list(task.labels),
        "metric_names": list(task.metric_names),
        "main_metric": task.main_metric,
        "dev_splits": list(task.dev_splits),
        "max_seq_length": cfg.max_seq_length,
        "backbone": backbone,
        "counts": counts,
        "skipped": skipped,
        "chance": chance_scores(task, labels_of["train"], labels_of[task.dev_splits[0]]),
    }
    atomic_write_json(out_dir / TASK_FILE, meta)
    metrics = {f"examples.{k}": v for k, v in counts.items()} | {
        f"skipped.{k}": v for k, v in skipped.items()
    }
    metrics["chance_score"] = meta["chance"]["score"]
    tracker.log_metrics(metrics)
    return metrics


def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params
    return prepare(p.data, p.backbone, p.seed, ctx.out, ctx.tracker)


def external_inputs(params: Params) -> list[Path]:
    """The GLUE files and a local backbone: read from outside the pipeline, hashed into the key."""
    return input_files(params.data) + local_files(params.backbone)


STAGE = register(
    Stage(
        name="data",
        out="data/prepared",
        sections=("data", "backbone", "seed"),
        upstream=(),
        run=run,
        external=external_inputs,
        headline=lambda m: {"examples": m["examples.train"], "chance": m["chance_score"]},
        description="GLUE task -> tokenised Parquet splits, task.json (metrics, chance score), tokenizer",
    )
)
