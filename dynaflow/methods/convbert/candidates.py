"""ConvBERT's candidates: each student, a plain ``ConvBertForSequenceClassification`` (no remote code)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import ConvBertConfig, ConvBertForSequenceClassification

from dynaflow.evaluation.candidates import Candidate
from dynaflow.methods.convbert import METHOD
from dynaflow.methods.convbert.model import convbert_flops


def student(model_dir: Path) -> Candidate:
    """The student saved by the convbert stage in ``model_dir`` (``g<groups>``)."""
    model_dir = Path(model_dir)
    config = ConvBertConfig.from_pretrained(model_dir)
    info = json.loads((model_dir / "metrics.json").read_text())
    groups, kernel = config.num_groups, config.conv_kernel_size
    # Width 1.0, depth 1.0: the teacher's layers and hidden size; half its heads became convolutions.
    arch = {"width": 1.0, "depth": 1.0, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads // config.head_ratio,
            "intermediate": config.intermediate_size, "groups": groups, "kernel": kernel}  # fmt: skip

    def build() -> ConvBertForSequenceClassification:
        return ConvBertForSequenceClassification.from_pretrained(model_dir).eval()

    return Candidate(
        method=METHOD,
        name=model_dir.name,
        arch=arch,
        build=build,
        label=f"convbert g{groups}",
        title=f"ConvBERT student: {config.num_hidden_layers} layers, FFN in {groups} group(s)",
        description=(
            f"A ConvBERT (Jiang et al., 2020) cut from the fine-tuned teacher: half of its attention heads "
            f"became span-based dynamic convolutions (kernel {kernel}), the FFN is "
            f"{'dense' if groups == 1 else f'grouped-linear in {groups} groups'}; distilled from the teacher "
            f"({info['parameters'] / 1e6:.1f} M parameters). A plain `ConvBertForSequenceClassification`: "
            "no remote code. Its convolutions ignore the attention mask: serve length-sorted batches."
        ),
        flops=lambda seq_len: float(convbert_flops(config, seq_len)),
    )
