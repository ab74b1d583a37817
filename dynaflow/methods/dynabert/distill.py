"""DynaBERT's distillation losses and training steps (``research/dynabert.md`` sections 3 and 4).

Both phases run, on every batch, one forward and backward pass per sub-network with gradients summed
over sub-networks (no averaging), then the caller clips once and takes one optimizer step. Every
sub-network of the grid on every batch is the official recipe; ``SubnetSampler``'s sandwich rule trains
the largest, the smallest and a few drawn at random instead, which costs a fraction per step:

* width phase (DynaBERT_W): for each width, widest first, at full depth; the teacher is the fine-tuned
  model at full size. Loss = λ1·SCE(logits) + λ2·Σ_l MSE(hidden_l), λ = (1, 0.1).
* width-and-depth phase (DynaBERT): for each depth, then each width; the teacher is DynaBERT_W at full
  depth, at full width (official code) or at the student's width (paper, Algorithm 3). The student's
  j-th hidden state is matched to teacher hidden state ``hidden_layer_map(L, m_d)[j]``. λ = (1, 1).

SCE has no temperature and the hidden-state MSE covers every position, padding included, as the official
code does. For regression tasks (STS-B) the official code sets the logit loss to 0; here it is an MSE
against the teacher's output instead, so the prediction head is still distilled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dynaflow.data.splits import TokenizedSplit, batch_order, collate
from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification, hidden_layer_map
from dynaflow.training import precision as mixed
from dynaflow.training.kd import hidden_loss, logit_loss

Note = Callable[[str], None]


@dataclass(frozen=True)
class SubnetGrid:
    widths: tuple[float, ...]  # visited widest first
    depths: tuple[float, ...]  # visited deepest first

    def __iter__(self):  # (depth, width) pairs in the official loop order
        for depth in sorted(self.depths, reverse=True):
            for width in sorted(self.widths, reverse=True):
                yield depth, width


def name(width: float, depth: float) -> str:
    return f"w{width}_d{depth}"


class SubnetSampler:
    """Which sub-networks a batch trains: every one (official), or the sandwich rule.

    Sandwich (slimmable networks, once-for-all, the Length-Adaptive Transformer): the largest and the
    smallest sub-network on every batch, plus ``k`` others drawn without replacement. The draw is a pure
    function of ``(seed, step)``, like the batch order, so a resumed run continues the same sequence and
    every data-parallel rank draws the same sub-networks. The chosen ones run in the official loop order.
    """

    def __init__(self, grid: SubnetGrid, rule: str = "all", k: int = 2, seed: int = 0) -> None:
        if rule not in ("all", "sandwich"):
            raise ValueError(f"subnets must be 'all' or 'sandwich', got {rule!r}")
        self.pairs = list(grid)  # (depth, width), largest first, smallest last
        self.rule, self.k, self.seed = rule, k, seed

    def draw(self, step: int) -> list[tuple[float, float]]:
        if self.rule == "all" or len(self.pairs) <= 2 + self.k:
            return self.pairs
        middle = self.pairs[1:-1]
        picked = np.random.default_rng([self.seed, 0x5A4D, step]).choice(len(middle), self.k, replace=False)
        chosen = {self.pairs[0], self.pairs[-1]} | {middle[i] for i in picked}
        return [p for p in self.pairs if p in chosen]


Targets = tuple[torch.Tensor, tuple[torch.Tensor, ...]]  # teacher logits, hidden states


class TeacherCache:
    """The fixed teacher's logits and hidden states, computed once per training example.

    The hidden-state loss covers padding positions too (as the official code does), so a cached example
    must cover every length it will be padded to. The batch order is a pure function of ``(seed, epoch)``,
    so that length is known before training: ``pad_lengths[i]`` is the longest batch example ``i`` is ever
    in. Each example's outputs are computed at that length (an attention-masked position does not change
    the others, so a prefix equals what a shorter padded batch computes, up to rounding) and cut to the
    batch's length when read. Memory: examples x layers x length x hidden, kept as computed.
    """

    def __init__(
        self,
        teacher: ElasticBertForSequenceClassification,
        train: TokenizedSplit,
        pad_lengths: np.ndarray,
        widths: Sequence[float],
        batch_size: int,
        pad_id: int,
        device: torch.device,
        precision: str = "fp32",
    ) -> None:
        self.logits: dict[float, list[torch.Tensor]] = {}
        self.hidden: dict[float, list[torch.Tensor]] = {}
        order = np.argsort(pad_lengths, kind="stable")  # batches of similar length pad little
        teacher.eval()
        for width in widths:
            logits: list[torch.Tensor | None] = [None] * len(train)
            hidden: list[torch.Tensor | None] = [None] * len(train)
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc=f"teacher cache w={width}", unit="batch", dynamic_ncols=True):
                rows = order[start : start + batch_size]
                batch = collate(train, rows, pad_id, length=int(pad_lengths[rows].max()))
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                with torch.no_grad(), mixed.autocast(precision, device):
                    out = teacher(**inputs, width_mult=width, depth_mult=1.0, output_hidden_states=True)
                stacked = torch.stack(out.hidden_states, dim=1)  # batch, layers + 1, length, hidden
                for j, i in enumerate(rows):
                    logits[i] = out.logits[j].clone()
                    hidden[i] = stacked[j, :, : pad_lengths[i]].clone()
            self.logits[width], self.hidden[width] = logits, hidden  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        tensors = [t for per_width in (*self.logits.values(), *self.hidden.values()) for t in per_width]
        return sum(t.numel() * t.element_size() for t in tensors)

    def targets(self, indices: np.ndarray, length: int, width: float, device: torch.device) -> Targets:
        """The batch of ``indices``, padded to ``length``, as the live teacher would give it."""
        logits = torch.stack([self.logits[width][i] for i in indices]).to(device)
        hidden = torch.stack([self.hidden[width][i][:, :length] for i in indices], dim=1).to(device)
        return logits, tuple(hidden)


def pad_lengths(train: TokenizedSplit, batch_size: int, seed: int, epochs: int) -> np.ndarray:
    """Per training example, the longest padded batch it is in over ``epochs`` (see TeacherCache)."""
    lengths = np.array([len(x) for x in train.input_ids])
    longest = np.zeros(len(train), dtype=np.int64)
    for epoch in range(epochs):
        for rows in batch_order(len(train), batch_size, True, seed, epoch):
            longest[rows] = np.maximum(longest[rows], lengths[rows].max())
    return longest


class DistillStep:
    """A ``fit`` step that distils the sampled sub-networks of a grid from ``teacher``, gradients summed.

    ``teacher_width``: "full" (official code: the teacher always runs at width 1) or "student" (the
    paper's Algorithm 3: the teacher runs at the student's width, full depth). With a ``cache`` the
    teacher's outputs are read from it instead of computed; ``begin`` (fit's ``before_step``) tells the
    step which examples and which step number come next.
    """

    def __init__(
        self,
        student: ElasticBertForSequenceClassification,
        teacher: ElasticBertForSequenceClassification,
        sampler: SubnetSampler,
        *,
        lambda_logit: float,
        lambda_hidden: float,
        is_regression: bool,
        teacher_width: str = "full",
        cache: TeacherCache | None = None,
    ) -> None:
        if teacher_width not in ("full", "student"):
            raise ValueError(f"teacher_width must be 'full' or 'student', got {teacher_width!r}")
        self.student, self.teacher, self.sampler, self.cache = student, teacher, sampler, cache
        self.lambda_logit, self.lambda_hidden = lambda_logit, lambda_hidden
        self.is_regression, self.teacher_width = is_regression, teacher_width
        self.step_index, self.indices = 0, np.zeros(0, dtype=np.int64)
        teacher.eval()

    def begin(self, step: int, indices: np.ndarray) -> None:
        self.step_index, self.indices = step, indices

    def teacher_targets(self, inputs: dict[str, torch.Tensor], widths: set[float]) -> dict[float, Targets]:
        if self.cache is not None:
            length, device = inputs["input_ids"].shape[1], inputs["input_ids"].device
            return {w: self.cache.targets(self.indices, length, w, device) for w in widths}
        targets = {}
        with torch.no_grad():
            for w in widths:
                out = self.teacher(**inputs, width_mult=w, depth_mult=1.0, output_hidden_states=True)
                targets[w] = (out.logits, out.hidden_states)
        return targets

    def __call__(self, batch: dict[str, torch.Tensor], note: Note) -> dict[str, float]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        pairs = self.sampler.draw(self.step_index)
        full = self.teacher_width == "full"
        targets = self.teacher_targets(inputs, {1.0} if full else {w for _, w in pairs})
        num_layers = self.student.config.num_hidden_layers
        losses: dict[str, float] = {}
        for depth, width in pairs:
            note(f"w={width} d={depth}")
            t_logits, t_hidden = targets[1.0 if full else width]
            out = self.student(**inputs, width_mult=width, depth_mult=depth, output_hidden_states=True)
            loss = self.lambda_logit * logit_loss(out.logits, t_logits, self.is_regression)
            loss = loss + self.lambda_hidden * hidden_loss(
                out.hidden_states, t_hidden, hidden_layer_map(num_layers, depth)
            )
            loss.backward()
            losses[f"loss.{name(width, depth)}"] = loss.item()
        return {"loss": sum(losses.values()), **losses}


def make_distill_step(
    student: ElasticBertForSequenceClassification,
    teacher: ElasticBertForSequenceClassification,
    grid: SubnetGrid,
    **options: Any,
) -> DistillStep:
    """The official step: every sub-network of ``grid`` on every batch (options: see DistillStep)."""
    return DistillStep(student, teacher, SubnetSampler(grid), **options)


def make_label_step(
    student: ElasticBertForSequenceClassification, grid: SubnetGrid, is_regression: bool
) -> Callable[[dict[str, torch.Tensor], Note], dict[str, float]]:
    """Final fine-tuning: the task loss on gold labels for every sub-network, gradients summed."""

    def step(batch: dict[str, torch.Tensor], note: Note) -> dict[str, float]:
        losses: dict[str, float] = {}
        for depth, width in grid:
            note(f"w={width} d={depth}")
            out = student(**batch, width_mult=width, depth_mult=depth)
            out.loss.backward()
            losses[f"loss.{name(width, depth)}"] = out.loss.item()
        return {"loss": sum(losses.values()), **losses}

    return step
