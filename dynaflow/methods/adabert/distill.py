"""AdaBERT's task-oriented distillation: probe classifiers on every teacher layer, computed once.

The official code trains a linear **probe** per teacher layer (input: the teacher's pooler on that layer's
[CLS], ``tanh(mean)`` for the embeddings) on the labels with the teacher frozen, then matches student depth
``m`` of ``K`` to teacher layer ``ceil(m · L / K)``. The teacher never changes, so its logits and every
probe's logits are computed once per training example (:func:`teacher_features`, :func:`train_probes`), saved
by the ``adabert_probes`` stage and read by the search and every retraining: none of them runs the teacher.
The last student depth is matched to the teacher's own logits (its classifier is the last layer's probe).

Loss: ``(1 − γ) · task + γ · Σ_m w_m · KD(student depth m, teacher layer)``; KD is soft cross-entropy
(MSE for regression); ``w_m`` uniform, or **attentive** (the PyTorch code's hierarchical transfer):
``softmax_m(−task loss of the matched teacher target on the gold label)``, per example, so layers whose
probes are right count more.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dynaflow.training.kd import logit_loss


def matched_layers(depth: int, teacher_layers: int) -> list[int]:
    """Teacher layer of each student depth 1..``depth``: ``ceil(m · L / K)``."""
    return [math.ceil(m * teacher_layers / depth) for m in range(1, depth + 1)]


@torch.no_grad()
def teacher_features(
    teacher: torch.nn.Module, batch: dict[str, torch.Tensor], pooling: str = "pooler"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probe inputs ``[B, L + 1, H]``, the teacher's logits ``[B, C]``) for one batch. ``pooling``: the
    teacher's pooler on each layer's [CLS] (the official code; ``tanh(mean)`` for the embeddings), or
    ``mean``: ``tanh(mean over real tokens)`` on every layer (the pooler was trained on the last one only)."""
    out = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    hidden, mask = out.hidden_states, batch["attention_mask"].unsqueeze(-1).to(out.hidden_states[0].dtype)

    def mean(h: torch.Tensor) -> torch.Tensor:
        return torch.tanh((h * mask).sum(1) / mask.sum(1).clamp_min(1.0))

    pool = teacher.bert.pooler if pooling == "pooler" else mean
    layers = [mean(hidden[0])] + [pool(h) for h in hidden[1:]]
    return torch.stack(layers, 1).float(), out.logits.float()


def task_loss(
    logits: torch.Tensor, labels: torch.Tensor, regression: bool, reduction: str = "mean"
) -> torch.Tensor:
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction=reduction)
    return F.cross_entropy(logits, labels.long(), reduction=reduction)


def train_probes(
    features: np.ndarray, labels: np.ndarray, num_labels: int, steps: int, learning_rate: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear probe per layer, full-batch Adam on the cached features: (weights ``[L+1, H, C]``, bias)."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.tensor(features, dtype=torch.float32), torch.tensor(np.asarray(labels))
    layers, hidden = x.shape[1], x.shape[2]
    weight = (torch.randn(layers, hidden, num_labels, generator=generator) * 0.02).requires_grad_()
    bias = torch.zeros(layers, num_labels, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=learning_rate)
    regression = num_labels == 1
    for _ in range(steps):
        optimizer.zero_grad()
        logits = torch.einsum("nlh,lhc->nlc", x, weight) + bias
        loss = sum(task_loss(logits[:, layer], y, regression) for layer in range(layers))
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach()


def probe_logits(features: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    return (torch.einsum("nlh,lhc->nlc", torch.from_numpy(features).float(), weight) + bias).numpy()


def student_loss(
    layer_logits: list[torch.Tensor],
    labels: torch.Tensor,
    targets: torch.Tensor,
    gamma: float,
    attentive: bool,
    regression: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of a student whose depths 1..K gave ``layer_logits``; ``targets``: ``[B, L + 1, C]`` cached
    teacher logits per layer (probes; the last layer's are the teacher's own)."""
    depth, teacher_layers = len(layer_logits), targets.shape[1] - 1
    matched = targets[:, matched_layers(depth, teacher_layers)]  # [B, K, C]
    task = task_loss(layer_logits[-1], labels, regression)
    kd_each = torch.stack(
        [
            ((s.squeeze(-1) - t.squeeze(-1)) ** 2)
            if regression
            else -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1)
            for s, t in zip(layer_logits, matched.unbind(1), strict=True)
        ],
        1,
    )  # [B, K]
    if attentive:
        right = torch.stack([-task_loss(t, labels, regression, "none") for t in matched.unbind(1)], 1)
        weights = torch.softmax(right, 1)
    else:
        weights = torch.full_like(kd_each, 1.0 / depth)
    kd = (weights * kd_each).sum(1).mean()
    loss = (1 - gamma) * task + gamma * kd
    final_kd = logit_loss(layer_logits[-1], matched[:, -1], regression)
    return loss, {"task_loss": task.item(), "probe_kd": kd.item(), "final_kd": final_kd.item()}
