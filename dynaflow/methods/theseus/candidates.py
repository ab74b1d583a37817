"""BERT-of-Theseus's candidate: the successor, already a plain Hugging Face BERT (``L / r`` layers)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import BertConfig, BertForSequenceClassification

from dynaflow.evaluation.candidates import Candidate
from dynaflow.methods.theseus import METHOD
from dynaflow.models.extract import subnetwork_flops


def successor(model_dir: Path) -> Candidate:
    """The successor saved by the theseus stage; ``depth`` relative to the teacher it was cut from."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    info = json.loads((model_dir / "metrics.json").read_text())
    layers = config["num_hidden_layers"]
    depth = layers / info["predecessor_layers"]
    arch = {"width": 1.0, "depth": depth, "layers": layers, "heads": config["num_attention_heads"],
            "intermediate": config["intermediate_size"]}  # fmt: skip

    def build() -> BertForSequenceClassification:
        return BertForSequenceClassification.from_pretrained(model_dir).eval()

    def flops(seq_len: int) -> float:  # the same analytic count as DynaBERT's sub-networks
        return float(subnetwork_flops(BertConfig.from_pretrained(model_dir), 1.0, 1.0, seq_len))

    return Candidate(
        method=METHOD,
        name=f"L{layers}",
        arch=arch,
        build=build,
        label=f"theseus L{layers}",
        title=f"BERT-of-Theseus successor: {layers} layers",
        description=(
            f"A {layers}-layer BERT compressed from a {info['predecessor_layers']}-layer fine-tuned teacher "
            "by progressive module replacing (Xu et al., 2020), trained with dynaflow. A plain "
            "`BertForSequenceClassification`: no remote code."
        ),
        flops=flops,
    )
