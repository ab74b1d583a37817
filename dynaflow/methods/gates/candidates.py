"""The gated models' candidates: each λ's model with its tokens really dropped (the hard form).

Exports carry ``modeling_gated_bert.py`` and the elastic BERT it builds on, so ``trust_remote_code=True``
opens them where dynaflow is not installed. Their FLOPs depend on the input's length: ``flops(n)`` counts an
input of ``n`` real tokens through the layers' kept lengths.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from dynaflow.evaluation.candidates import Candidate, remote_auto_map
from dynaflow.methods.gates import GATES_ON_DYNABERT, METHOD, POWER_BERT
from dynaflow.methods.gates import modeling_gated_bert as gated
from dynaflow.models.extract import elastic_remote_code

REMOTE_CODE = "modeling_gated_bert.py"
ELASTIC_CODE = "elastic_bert.py"  # imported by the gated model's file, beside it in the export


def remote_code() -> dict[str, str]:
    """Both files, the gated one importing the elastic one relatively; neither registers Auto classes
    (transformers maps the classes through ``config.auto_map``)."""
    source = (
        Path(gated.__file__)
        .read_text()
        .replace("from dynaflow.models.elastic_bert import", "from .elastic_bert import")
    )
    return {REMOTE_CODE: source, ELASTIC_CODE: elastic_remote_code()}


def mark_remote(model: gated.GatedBertForSequenceClassification) -> None:
    """Point the config's ``auto_map`` at the remote code, so a saved model opens without dynaflow."""
    classes = ("GatedBertConfig", "GatedBertForSequenceClassification")
    model.config.auto_map = remote_auto_map(REMOTE_CODE, *classes)


ONE_STAGE = "token gates with a bi-modal regulariser (one stage)"
TWO_STAGES = "PoWER-BERT (soft-extract search, then retraining with hard extraction)"
FAMILIES = {  # method: (label prefix, title prefix, how it was trained)
    METHOD: ("gates", "Token-gated BERT", ONE_STAGE),
    POWER_BERT: ("power", "PoWER-BERT", TWO_STAGES),
    GATES_ON_DYNABERT: ("gates", "Token-gated DynaBERT", ONE_STAGE),
}


def gated_model(model_dir: Path, method: str = METHOD) -> Candidate:
    """The hard-gated model a gated stage (gates, powerbert, gates_dynabert) saved in ``model_dir``."""
    model_dir = Path(model_dir)
    config = gated.GatedBertConfig.from_pretrained(model_dir)
    info = json.loads((model_dir / "metrics.json").read_text())
    layers = config.num_hidden_layers
    cut = getattr(config, "extracted_subnet", None) or {}  # a DynaBERT cell's multipliers, else the teacher
    width, depth = float(cut.get("width_mult", 1.0)), float(cut.get("depth_mult", 1.0))
    arch = {"width": width, "depth": depth, "layers": layers, "heads": config.layer_heads(0),
            "intermediate": config.layer_intermediate(0), "lambda": info["lambda"],
            "kept_fraction": info["kept_fraction"],
            "flops_reduction": info["flops_reduction"]}  # fmt: skip
    short, long, family = FAMILIES[method]
    source = f"DynaBERT's width {width:g} x depth {depth:g} sub-network" if cut else "The fine-tuned teacher"
    where = f" w{width:g}_d{depth:g}" if cut else ""

    def build() -> gated.GatedBertForSequenceClassification:
        built = gated.GatedBertForSequenceClassification.from_pretrained(model_dir).eval()
        built.config.hard_gates = True
        mark_remote(built)
        return built

    @functools.cache
    def keep() -> torch.Tensor:  # read when FLOPs are counted, not when the candidate is listed
        return build().keep_mask()

    return Candidate(
        method=method,
        name=model_dir.name,
        arch=arch,
        build=build,
        label=f"{short}{where} λ{info['lambda']:g}",
        title=f"{long}{where}, λ = {info['lambda']:g}",
        description=(
            f"{source} ({layers} layers) trained with {family} (λ = {info['lambda']:g}) by "
            f"dynaflow: each layer ranks its tokens by the attention they receive and drops the ranks whose "
            f"gate is off. On the dev inputs the layers keep {info['kept_per_layer'][1:]} tokens on average "
            f"(inputs: {info['kept_per_layer'][0]}), {info['flops_reduction']:.2f}x fewer encoder FLOPs than "
            "its source. Remote code: open with `trust_remote_code=True`."
        ),
        flops=lambda seq_len: float(gated.gated_flops(config, gated.kept_lengths(keep(), seq_len))),
        remote_code=remote_code(),
    )
