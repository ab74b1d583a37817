"""One training loop for every stage: AdamW, linear warm-up and decay, clipping, progress, resume.

The loop owns the optimizer, schedule, checkpoints and progress bar; what a step *computes* is the
caller's ``step_fn`` (a teacher's cross-entropy, or DynaBERT's sum over widths and depths), which runs the
forward and backward passes and returns the numbers to log. Checkpoints hold model, optimizer, schedule,
RNG state and position; the batch order is a pure function of ``(seed, epoch)``, so a run that resumes from
a checkpoint ends with the same weights as one that never stopped.

Data-parallel (``torchrun``, see :mod:`dynaflow.core.distributed`): every rank walks the same batch order,
takes its contiguous part of each global batch (cut from the batch padded as a whole, so padding-sensitive
losses are unchanged), runs ``step_fn`` on it, and the gradients are summed across ranks weighted by each
rank's share before clipping and the optimizer step: N processes take the steps one process takes on the
same global batch. Logged losses are the example-weighted means over ranks. Only rank 0 shows progress,
logs to the tracker and writes checkpoints; on resume rank 0 reads the checkpoint and sends it to the
others. The hooks run on every rank (they must be deterministic, as evaluation is, so that ranks agree).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dynaflow.core import distributed as ddp
from dynaflow.core.faults import fault_point
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import TokenizedSplit, batch_order, collate
from dynaflow.training import precision as mixed

log = logging.getLogger(__name__)

# A step runs forward and backward pass(es) for one batch and returns the numbers to log; it may call
# ``note`` with a short status (e.g. the sub-network being trained) for the progress bar.
StepFn = Callable[[dict[str, torch.Tensor], Callable[[str], None]], dict[str, float]]


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_steps: int = 0  # 0: checkpoint only at the end of each epoch
    log_every: int = 10
    precision: str = "fp32"  # auto | fp32 | bf16 (autocast of the step; see dynaflow.training.precision)
    max_steps: int | None = None  # stop after this many steps (the schedule ends there); None: every epoch

    @classmethod
    def from_section(cls, section: Any, seed: int, **changes: Any) -> TrainConfig:
        """From a params.yaml training section (``teacher``, ``width_kd``, ...): the fields it shares."""
        shared = {f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)}
        return cls(**shared | {"seed": seed} | changes)


@dataclass
class TrainResult:
    global_step: int
    resumed_from: int | None
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    examples_per_second: float = 0.0
    precision: str = "fp32"  # what the steps ran in (``auto`` resolved on this machine)


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, param_lr: Mapping[str, float] | None = None
) -> torch.optim.AdamW:
    """AdamW; ``param_lr``: parameters (by name) with a learning rate of their own and no weight decay
    (e.g. a method's gates, which must move much faster than the weights)."""
    param_lr = param_lr or {}
    # As in BERT: no weight decay on biases and LayerNorm weights.
    decay, no_decay, own = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in param_lr:
            own.append({"params": [p], "weight_decay": 0.0, "lr": param_lr[name]})
        else:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups + own, lr=lr, eps=1e-8)


def linear_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated file from a killed process: start over rather than crash
        log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s: it belongs to other params, inputs or code", path)
        return None
    return state


def fit(
    model: torch.nn.Module,
    train: TokenizedSplit,
    step_fn: StepFn,
    cfg: TrainConfig,
    *,
    checkpoint: Path,
    fingerprint: str,
    tracker: NullTracker | None = None,
    on_epoch_end: Callable[[int], dict[str, float]] | None = None,
    on_step: Callable[[int], dict[str, float] | None] | None = None,
    extra_state: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
    before_step: Callable[[int, np.ndarray], None] | None = None,
    desc: str = "train",
    pad_id: int = 0,
    param_lr: Mapping[str, float] | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.epochs`` epochs over ``train`` (or ``cfg.max_steps`` steps, the last epoch
    cut short; its end still calls ``on_epoch_end``); resume from ``checkpoint`` if it matches.

    ``cfg.batch_size`` is the global batch: with N processes each takes about 1/N of it.
    ``before_step(step, indices)`` is told, before each step, the number of steps already taken and the
    training-set indices of this process's examples in the batch (what a step that draws sub-networks by
    step number, or reads per-example cached targets, needs). The step runs under ``cfg.precision``.
    ``param_lr``: see :func:`make_optimizer` (the schedule scales those rates too).
    """
    ddp.init()  # joins the process group when launched by torchrun; no-op in a single process
    main, dev = ddp.is_main(), ddp.device()
    tracker = (tracker or NullTracker()) if main else NullTracker()
    model.to(dev)
    precision = mixed.resolve(cfg.precision, dev)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        if cfg.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (None: every epoch), got {cfg.max_steps}")
        total = min(total, cfg.max_steps)
    epochs = -(-total // steps_per_epoch)  # the last one may be cut short by max_steps
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, param_lr)
    scheduler = linear_schedule(optimizer, int(cfg.warmup_ratio * total), total)
    torch.manual_seed(cfg.seed + ddp.rank())  # rank 0 as one process; other ranks draw their own dropout

    epoch, done_in_epoch, history, resumed_from = 0, 0, [], None
    state = ddp.broadcast_object(_load_checkpoint(checkpoint, fingerprint) if main else None)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rngs = state.get("rng_ranks")
        if rngs is not None and len(rngs) == ddp.world_size():
            ddp.set_rng_state(rngs[ddp.rank()])
        elif main:
            torch.set_rng_state(state["rng"])
        epoch, done_in_epoch, history = state["epoch"], state["done_in_epoch"], state["history"]
        if extra_state is not None:
            extra_state[1](state["extra"])
        resumed_from = epoch * steps_per_epoch + done_in_epoch
        log.info("resuming %s from step %d of %d (%s)", desc, resumed_from, total, checkpoint)

    ddp.broadcast_parameters(model)  # every rank starts from rank 0's weights

    def save(ep: int, done: int) -> None:
        rngs = ddp.all_gather_object(ddp.rng_state())  # collective: every rank calls save
        if not main:
            return
        _save_checkpoint(
            checkpoint,
            {
                "fingerprint": fingerprint,
                "epoch": ep,
                "done_in_epoch": done,
                "history": history,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "rng_ranks": rngs,
                "extra": extra_state[0]() if extra_state is not None else None,
            },
        )

    started, seen = time.perf_counter(), 0
    bar = tqdm(
        total=total, initial=resumed_from or 0, desc=desc, unit="step", dynamic_ncols=True, disable=not main
    )
    log.info("%s: %d steps, batches of %d, %s", desc, total, cfg.batch_size, precision)
    model.train()
    while epoch < epochs:
        batches = batch_order(len(train), cfg.batch_size, True, cfg.seed, epoch)
        batches = batches[: total - epoch * steps_per_epoch]  # max_steps may end the last epoch early
        for b in range(done_in_epoch, len(batches)):
            start, stop = ddp.shard_bounds(len(batches[b]))
            losses: dict[str, float] = {}
            if stop > start:  # a rank may get nothing from a last batch smaller than the number of ranks
                batch = collate(train, batches[b], pad_id)
                batch = {k: v[start:stop].to(dev) for k, v in batch.items()}
                if before_step is not None:
                    before_step(epoch * steps_per_epoch + b, batches[b][start:stop])
                with mixed.autocast(precision, dev):
                    losses = step_fn(batch, lambda text: bar.set_description(f"{desc} {text}", refresh=False))
            ddp.all_reduce_gradients(model, stop - start, len(batches[b]))
            losses = ddp.mean_across_ranks(losses, stop - start)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step = epoch * steps_per_epoch + b + 1
            seen += len(batches[b])
            rate = seen / (time.perf_counter() - started)
            loss = losses.get("loss", next(iter(losses.values())))
            history.append((step, float(loss)))
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", ex_s=f"{rate:.1f}", refresh=False)
            bar.update(1)
            fault_point(f"step.{desc}.{step}")
            if step % cfg.log_every == 0 or step == total:
                tracker.log_metrics(
                    {**losses, "lr": scheduler.get_last_lr()[0], "examples_per_s": rate}, step=step
                )
            if on_step is not None and (metrics := on_step(step)):  # e.g. periodic evaluation
                tracker.log_metrics(metrics, step=step)
                model.train()
            if cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0 and b + 1 < len(batches):
                save(epoch, b + 1)  # after on_step, so what it recorded is in the checkpoint too
        epoch, done_in_epoch = epoch + 1, 0
        if on_epoch_end is not None:
            metrics = on_epoch_end(epoch)
            tracker.log_metrics(metrics, step=min(epoch * steps_per_epoch, total))
            model.train()
        save(epoch, 0)
    bar.close()
    elapsed = time.perf_counter() - started
    return TrainResult(total, resumed_from, history, elapsed, seen / elapsed if elapsed else 0.0, precision)
