"""Augment stage: the training split plus N word-substituted variants per example, for distillation.

This is an offline stand-in for the TinyBERT augmentation that DynaBERT trains on (``--data_aug``). The
paper's candidates come from a masked language model (BERT-base, for single-piece words) and GloVe (for
multi-piece words); neither is available offline. Here the candidates of a word are its top-M nearest
neighbours by cosine similarity in the input word-embedding matrix of the *fine-tuned teacher*, and the
substitution happens in token space: one single-piece word is replaced by one single-piece word, so every
variant keeps its original's length and ``token_type_ids``, and multi-piece words are never touched.
The knobs are the paper's: N variants per example, M candidates per word, replacement probability p.
See :mod:`dynaflow.data.augment` for the full list of differences.

Outputs (in ``out_dir``): ``train.parquet`` (the data stage's schema: originals first, then variants, whose
label is their original's; distillation learns from teacher logits, not these labels), ``augment.json``
(settings and counts) and ``examples.txt`` (a few decoded variants, to judge their quality by eye). With
``enabled: false`` the data stage's ``train.parquet`` is copied unchanged, so the stages downstream always
read their training data from here.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dynaflow.config import AugmentConfig
from dynaflow.core.artifacts import atomic_write_bytes, atomic_write_json
from dynaflow.core.tracking import NullTracker
from dynaflow.data.augment import (
    AugmentStats,
    Vocabulary,
    augment_split,
    build_neighbours,
    decode,
    load_vocabulary,
    load_word_embeddings,
)
from dynaflow.data.splits import TOKENIZER_DIR, TokenizedSplit, load_split, write_split
from stages.registry import Stage, StageContext, register

log = logging.getLogger(__name__)

TRAIN_FILE = "train.parquet"
SUMMARY_FILE = "augment.json"
EXAMPLES_FILE = "examples.txt"


def _examples_text(
    original: TokenizedSplit, augmented: TokenizedSplit, source: np.ndarray, vocab: Vocabulary, n: int = 8
) -> str:
    """The first ``n`` originals that got variants, each followed by up to three of them."""
    lines: list[str] = []
    variant_rows = np.flatnonzero(np.arange(len(source)) >= len(original))
    shown = 0
    for i in dict.fromkeys(source[variant_rows].tolist()):  # originals in order, each once
        if shown == n:
            break
        rows = variant_rows[source[variant_rows] == i][:3]
        lines.append(f"[{i}] {decode(original.input_ids[i], vocab)}")
        lines += [f"  -> {decode(augmented.input_ids[r], vocab)}" for r in rows]
        shown += 1
    return "\n".join(lines) + "\n"


def augment_train(
    cfg: AugmentConfig, seed: int, teacher_dir: Path, data_dir: Path, out_dir: Path, tracker: NullTracker
) -> dict[str, Any]:
    """Write ``out_dir/train.parquet`` (augmented, or the data stage's copy when disabled); return metrics.

    The candidates come from the word embeddings of the teacher saved in ``teacher_dir``; the vocabulary
    from the tokenizer the data stage saved in ``data_dir``.
    """
    started = time.perf_counter()
    source_file = Path(data_dir) / TRAIN_FILE
    if not source_file.is_file():
        raise FileNotFoundError(f"{source_file}: no tokenised training split (run the data stage first)")
    out_dir = Path(out_dir)

    if not cfg.enabled:
        # A byte copy, not a rewrite: downstream sees exactly the data stage's split.
        shutil.copyfile(source_file, out_dir / TRAIN_FILE)
        n = pq.read_metadata(source_file).num_rows
        stats = AugmentStats(examples_in=n, examples_out=n)
        atomic_write_json(
            out_dir / SUMMARY_FILE,
            {"config": cfg.model_dump(mode="json"), "seed": seed, **stats.as_metrics()},
        )
        metrics: dict[str, Any] = stats.as_metrics() | {"seconds": time.perf_counter() - started}
        tracker.log_metrics(metrics)
        log.info("augmentation disabled: copied %d training examples", n)
        return metrics

    train = load_split(data_dir, "train")
    embeddings = load_word_embeddings(Path(teacher_dir))
    vocab = load_vocabulary(Path(data_dir) / TOKENIZER_DIR, size=embeddings.shape[0])
    largest = max((int(x.max()) for x in train.input_ids if len(x)), default=-1)
    if largest >= embeddings.shape[0]:
        raise ValueError(
            f"token id {largest} in {source_file} but the teacher in {teacher_dir} has only "
            f"{embeddings.shape[0]} word embeddings: data and teacher come from different backbones"
        )
    t0 = time.perf_counter()
    table = build_neighbours(embeddings, vocab, train.input_ids, cfg.top_m)
    neighbour_seconds = time.perf_counter() - t0
    augmented, source, stats = augment_split(
        train,
        vocab,
        table,
        n_variants=cfg.n_variants,
        replace_prob=cfg.replace_prob,
        seed=seed,
        max_examples=cfg.max_examples,
        progress=True,
    )
    if cfg.max_examples is not None and cfg.max_examples < len(train):
        log.warning(
            "augment.max_examples=%d is below the %d original examples: originals cut, no variants",
            cfg.max_examples,
            len(train),
        )
    write_split(out_dir / TRAIN_FILE, augmented.input_ids, augmented.token_type_ids, augmented.labels)
    # Only deterministic content in the artifact (timings go to metrics/augment.json and MLflow), so an
    # unchanged re-run yields the same manifest and the stages downstream stay cached.
    atomic_write_json(
        out_dir / SUMMARY_FILE, {"config": cfg.model_dump(mode="json"), "seed": seed, **stats.as_metrics()}
    )
    atomic_write_bytes(out_dir / EXAMPLES_FILE, _examples_text(train, augmented, source, vocab).encode())
    metrics = stats.as_metrics() | {
        "neighbour_seconds": neighbour_seconds,
        "seconds": time.perf_counter() - started,
    }
    tracker.log_metrics(metrics)
    log.info(
        "augmented %d -> %d training examples (%.1f variants each, %.1f%% of words replaced)",
        stats.examples_in,
        stats.examples_out,
        metrics["variants_per_example"],
        100 * metrics["replaced_word_share"],
    )
    return metrics


def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params
    return augment_train(
        p.augment, p.seed, ctx.upstream("teacher"), ctx.upstream("data"), ctx.out, ctx.tracker
    )


STAGE = register(
    Stage(
        name="augment",
        out="data/augmented",
        sections=("augment", "seed"),
        upstream=("data", "teacher"),
        run=run,
        headline=lambda m: {"examples": m["examples_out"], "seconds": m["seconds"]},
        description="the distillation training set: the originals, plus augmented variants when enabled",
    )
)
