"""Knowledge-distillation losses shared by every method that distils from the fine-tuned teacher.

DynaBERT's (``research/dynabert.md`` section 3), used as they are by the other students (ConvBERT): soft
cross-entropy on logits with no temperature (MSE for regression, so the prediction head is still
distilled), and MSE on hidden states, every position included (padding too, as the official code does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
