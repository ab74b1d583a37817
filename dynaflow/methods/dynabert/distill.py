"""DynaBERT's distillation losses and training steps (``research/dynabert.md`` sections 3 and 4).

Both phases run, on every batch, one forward and backward pass per sub-network with gradients summed
over sub-networks (no averaging), then the caller clips once and takes one optimizer step:

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

import torch
import torch.nn.functional as F

from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification, hidden_layer_map

Note = Callable[[str], None]


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean over the batch of -Σ softmax(teacher) · log_softmax(student)."""
    return -(F.softmax(teacher_logits, dim=-1) * F.log_softmax(student_logits, dim=-1)).sum(-1).mean()


def logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(student_logits, teacher_logits)
    return soft_cross_entropy(student_logits, teacher_logits)


def hidden_loss(
    student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor], layer_map: Sequence[int]
) -> torch.Tensor:
    """Σ_j MSE(student_hidden[j], teacher_hidden[layer_map[j]])."""
    if len(student_hidden) != len(layer_map):
        raise ValueError(f"{len(student_hidden)} student hidden states but a layer map of {len(layer_map)}")
    return sum(F.mse_loss(s, teacher_hidden[t]) for s, t in zip(student_hidden, layer_map, strict=True))


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


def make_distill_step(
    student: ElasticBertForSequenceClassification,
    teacher: ElasticBertForSequenceClassification,
    grid: SubnetGrid,
    *,
    lambda_logit: float,
    lambda_hidden: float,
    is_regression: bool,
    teacher_width: str = "full",
) -> Callable[[dict[str, torch.Tensor], Note], dict[str, float]]:
    """A ``fit`` step that distils every sub-network of ``grid`` from ``teacher`` and sums the gradients.

    ``teacher_width``: "full" (official code: the teacher always runs at width 1) or "student" (the
    paper's Algorithm 3: the teacher runs at the student's width, full depth).
    """
    if teacher_width not in ("full", "student"):
        raise ValueError(f"teacher_width must be 'full' or 'student', got {teacher_width!r}")
    num_layers = student.config.num_hidden_layers
    teacher.eval()

    def step(batch: dict[str, torch.Tensor], note: Note) -> dict[str, float]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        targets: dict[float, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        with torch.no_grad():
            for width in {1.0} if teacher_width == "full" else set(grid.widths):
                out = teacher(**inputs, width_mult=width, depth_mult=1.0, output_hidden_states=True)
                targets[width] = (out.logits, out.hidden_states)
        losses: dict[str, float] = {}
        total = 0.0
        for depth, width in grid:
            note(f"w={width} d={depth}")
            t_logits, t_hidden = targets[1.0 if teacher_width == "full" else width]
            out = student(**inputs, width_mult=width, depth_mult=depth, output_hidden_states=True)
            layer_map = hidden_layer_map(num_layers, depth)
            loss = lambda_logit * logit_loss(out.logits, t_logits, is_regression)
            loss = loss + lambda_hidden * hidden_loss(out.hidden_states, t_hidden, layer_map)
            loss.backward()
            losses[f"loss.{name(width, depth)}"] = loss.item()
            total += loss.item()
        return {"loss": total, **losses}

    return step


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
