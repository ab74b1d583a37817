"""ConvBERT by surgery: a fine-tuned (rewired) BERT becomes a ``ConvBertForSequenceClassification`` student.

ConvBERT (Jiang et al., 2020) keeps half the attention heads (``head_ratio`` 2) and spends the other half of
the attention block's width on a span-based dynamic convolution (``research/other_seeds.md`` section B).
Pre-training one is GPU-days; here the student is cut from the teacher and then distilled:

* embeddings (``embedding_size`` = hidden size: no projection), FFN and LayerNorms are the teacher's;
* self-attention keeps the teacher's first half of heads, which rewiring made the most important half;
* the attention output projection keeps all its input columns: the kept heads' feed the attention half,
  the dropped heads' feed the convolution half, so the new branch writes where the dropped heads wrote;
* the convolution branch (span-aware key convolution, dynamic-kernel projection, value projection) is new,
  its value projection zero: before training its output is exactly zero, so the student computes what
  the teacher computes with only the kept heads and its whole FFN (``tests/test_convbert.py``); the value
  projection gets gradients at once (through the output projection's columns), the kernel after it moves;
* the grouped-linear FFN (``num_groups`` g > 1) keeps the teacher's block-diagonal, with the FFN neurons
  first assigned to the groups whose hidden slices carry most of their weight (:func:`group_neurons`);
* the classification head is the teacher's pooler and classifier, but Hugging Face's ConvBERT head applies
  ``config.hidden_act`` (GELU for BERT) where BERT's pooler applies tanh: the one part of the function the
  surgery cannot keep with a standard ConvBERT class. Distillation retrains it with everything else.

The result is a plain ``ConvBertForSequenceClassification``: it loads with no remote code.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import ConvBertConfig, ConvBertForSequenceClassification

from dynaflow.config import ConfigError

HEAD_RATIO = 2  # the only setting for which HF's mixed attention fits the hidden size (gotcha 2)
NEW_PARAMETERS = (  # in every layer's attention.self: the convolution branch, the only weights not copied
    "key_conv_attn_layer.depthwise.weight",
    "key_conv_attn_layer.pointwise.weight",
    "key_conv_attn_layer.bias",
    "conv_kernel_layer.weight",
    "conv_kernel_layer.bias",
    "conv_out_layer.weight",
    "conv_out_layer.bias",
)


def student_config(teacher: Any, kernel_size: int, groups: int, pad_token_id: int) -> ConvBertConfig:
    """The ConvBERT config of the student cut from ``teacher`` (a BERT config)."""
    heads, hidden, inter = teacher.num_attention_heads, teacher.hidden_size, teacher.intermediate_size
    if heads % HEAD_RATIO:
        raise ConfigError(f"backbone: ConvBERT keeps half the heads; the teacher has {heads}, an odd number")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(
            f"convbert.kernel_size must be odd and positive (a centred window), got {kernel_size}"
        )
    if groups < 1 or hidden % groups or inter % groups:
        raise ConfigError(
            f"convbert.groups: {groups} must divide the hidden size {hidden} and the FFN size {inter}"
        )
    return ConvBertConfig(
        vocab_size=teacher.vocab_size, hidden_size=hidden, num_hidden_layers=teacher.num_hidden_layers,
        num_attention_heads=heads, intermediate_size=inter, hidden_act=teacher.hidden_act,
        hidden_dropout_prob=teacher.hidden_dropout_prob,
        attention_probs_dropout_prob=teacher.attention_probs_dropout_prob,
        max_position_embeddings=teacher.max_position_embeddings, type_vocab_size=teacher.type_vocab_size,
        initializer_range=teacher.initializer_range, layer_norm_eps=teacher.layer_norm_eps,
        pad_token_id=pad_token_id,  # ConvBERT's default (1) is a real token in BERT vocabularies (gotcha 1)
        embedding_size=hidden, head_ratio=HEAD_RATIO, conv_kernel_size=kernel_size, num_groups=groups,
        num_labels=teacher.num_labels, id2label=teacher.id2label, label2id=teacher.label2id,
        problem_type=getattr(teacher, "problem_type", None),
    )  # fmt: skip


def group_neurons(w_in: torch.Tensor, w_out: torch.Tensor, groups: int) -> torch.Tensor:
    """An order of the FFN neurons such that the i-th block of ``I/g`` neurons goes to group i.

    A grouped FFN connects group i's slice of the hidden size only to group i's neurons, so it keeps the
    block diagonal of each matrix. Neurons are free to permute (an FFN is a sum over them): each neuron is
    placed, most decided first, in the group whose hidden slice holds most of its squared weight (input
    row and output column), while that group has room.
    """
    inter, hidden = w_in.shape
    if groups == 1:
        return torch.arange(inter)
    slices = torch.arange(hidden) // (hidden // groups)
    mass = torch.zeros(inter, groups)
    mass.index_add_(1, slices, w_in.float().pow(2) + w_out.float().t().pow(2))
    top2 = mass.topk(2, dim=1).values
    room, chosen = [inter // groups] * groups, [[] for _ in range(groups)]
    for neuron in torch.argsort(top2[:, 0] - top2[:, 1], descending=True).tolist():
        for g in torch.argsort(mass[neuron], descending=True).tolist():
            if room[g]:
                chosen[g].append(neuron)
                room[g] -= 1
                break
    return torch.tensor([n for block in chosen for n in block])


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A ``nn.Linear`` weight (out, in) as ``GroupedLinearLayer``'s (groups, in/g, out/g) block diagonal."""
    out_dim, in_dim = weight.shape
    o, i = out_dim // groups, in_dim // groups
    return torch.stack([weight[g * o : (g + 1) * o, g * i : (g + 1) * i].t() for g in range(groups)])


@torch.no_grad()
def build_student(
    teacher: torch.nn.Module, kernel_size: int = 9, groups: int = 1, pad_token_id: int = 0, seed: int = 0
) -> ConvBertForSequenceClassification:
    """The ConvBERT student cut from ``teacher``, a BERT sequence classifier whose heads are ordered by
    importance (the rewire stage's output); the new branch seeded by ``seed``."""
    cfg = student_config(teacher.config, kernel_size, groups, pad_token_id)
    torch.manual_seed(seed)
    student = ConvBertForSequenceClassification(cfg).eval()
    src = teacher.state_dict()
    kept = cfg.hidden_size // HEAD_RATIO  # the kept heads' width: the first half of Q, K and V
    dst = student.state_dict()
    for name in dst:
        if name.startswith("convbert.embeddings."):
            dst[name].copy_(src[name.replace("convbert.", "bert.", 1)])
    for layer in range(cfg.num_hidden_layers):
        t, s = f"bert.encoder.layer.{layer}.", f"convbert.encoder.layer.{layer}."
        for proj in ("query", "key", "value"):
            dst[f"{s}attention.self.{proj}.weight"].copy_(src[f"{t}attention.self.{proj}.weight"][:kept])
            dst[f"{s}attention.self.{proj}.bias"].copy_(src[f"{t}attention.self.{proj}.bias"][:kept])
        dst[f"{s}attention.self.conv_out_layer.weight"].zero_()
        dst[f"{s}attention.self.conv_out_layer.bias"].zero_()
        for part in ("attention.output.dense", "attention.output.LayerNorm", "output.LayerNorm"):
            for p in ("weight", "bias"):
                dst[f"{s}{part}.{p}"].copy_(src[f"{t}{part}.{p}"])
        w_in, b_in = src[f"{t}intermediate.dense.weight"], src[f"{t}intermediate.dense.bias"]
        w_out, b_out = src[f"{t}output.dense.weight"], src[f"{t}output.dense.bias"]
        order = group_neurons(w_in, w_out, groups)
        w_in, b_in, w_out = w_in[order], b_in[order], w_out[:, order]
        if groups == 1:
            dst[f"{s}intermediate.dense.weight"].copy_(w_in)
            dst[f"{s}output.dense.weight"].copy_(w_out)
        else:
            dst[f"{s}intermediate.dense.weight"].copy_(_grouped(w_in, groups))
            dst[f"{s}output.dense.weight"].copy_(_grouped(w_out, groups))
        dst[f"{s}intermediate.dense.bias"].copy_(b_in)
        dst[f"{s}output.dense.bias"].copy_(b_out)
    dst["classifier.dense.weight"].copy_(src["bert.pooler.dense.weight"])
    dst["classifier.dense.bias"].copy_(src["bert.pooler.dense.bias"])
    dst["classifier.out_proj.weight"].copy_(src["classifier.weight"])
    dst["classifier.out_proj.bias"].copy_(src["classifier.bias"])
    student.load_state_dict(dst)
    return student


def new_parameter_names(model: ConvBertForSequenceClassification) -> list[str]:
    """The student's parameters the surgery does not copy from the teacher (the convolution branch)."""
    names = (n for n, _ in model.named_parameters() if n.startswith("convbert.encoder."))
    return [n for n in names if n.endswith(NEW_PARAMETERS)]


def convbert_flops(config: ConvBertConfig, seq_len: int) -> int:
    """Analytic encoder FLOPs for one sequence, 2 x MACs, counted as ``subnetwork_flops`` counts BERT's.

    Per token and layer: Q, K, V of the kept heads (3·H·H/2), the convolution's value projection (H·H/2),
    pointwise key convolution (H·H/2) and depthwise one (H·k), the kernel projection (H/2·heads/2·k), the
    weighted sum over the window (H/2·k), the output projection (H·H), the FFN (2·H·I/g), and attention's
    QK^T and PV over the kept heads (2·t·H/2).
    """
    hid, inter, g = config.hidden_size, config.intermediate_size, config.num_groups
    k = config.conv_kernel_size
    half, heads, t = hid // 2, config.num_attention_heads // HEAD_RATIO, seq_len
    per_token = (3 * hid * half + hid * half + hid * half + hid * k + half * heads * k + half * k
                 + hid * hid + 2 * hid * inter // g + 2 * t * half)  # fmt: skip
    return 2 * t * per_token * config.num_hidden_layers
