"""AdaBERT's candidates: the searched student and the random control's best, each a derived network.

Exports carry ``modeling_adabert.py`` (it imports nothing from dynaflow), so ``trust_remote_code=True``
opens them where dynaflow is not installed. No attention: torch's FLOP counter counts them exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from dynaflow.evaluation.candidates import Candidate, remote_auto_map
from dynaflow.methods.adabert import METHOD
from dynaflow.methods.adabert import modeling_adabert as adabert
from dynaflow.methods.adabert.genotype import describe

REMOTE_CODE = "modeling_adabert.py"


def remote_code() -> dict[str, str]:
    return {REMOTE_CODE: Path(adabert.__file__).read_text()}


def mark_remote(model: adabert.AdaBertForSequenceClassification) -> None:
    """Point the config's ``auto_map`` at the remote code, so a saved model opens without dynaflow."""
    model.config.auto_map = remote_auto_map(REMOTE_CODE, "AdaBertConfig", "AdaBertForSequenceClassification")


def student(model_dir: Path, method: str = METHOD) -> Candidate:
    """The derived student the adabert (or adabert_random) stage saved in ``model_dir``."""
    model_dir = Path(model_dir)
    config = adabert.AdaBertConfig.from_pretrained(model_dir)
    info = json.loads((model_dir / "metrics.json").read_text())
    genotype = config.genotype
    # Cells, not transformer layers: the report's equal-layers table must not pair them with BERT layers.
    arch = {"cells": genotype["depth"], "hidden": config.hidden_size, "genotype": describe(genotype)}
    searched = method == METHOD

    def build() -> adabert.AdaBertForSequenceClassification:
        built = adabert.AdaBertForSequenceClassification.from_pretrained(model_dir).eval()
        mark_remote(built)
        return built

    origin = (
        "found by differentiable architecture search (Gumbel-softmax over ops and depth, probe distillation, "
        "an efficiency loss)"
        if searched
        else f"drawn at random from the same search space (the best of {info.get('of', '?')} on held-out "
        "rows)"
    )
    return Candidate(
        method=method,
        name=model_dir.name,
        arch=arch,
        build=build,
        label=f"{'adabert' if searched else 'random'} K{genotype['depth']}",
        title=f"AdaBERT student ({'searched' if searched else 'random-search control'}), "
        f"{genotype['depth']} cells",
        description=(
            f"A convolutional student (Chen et al., 2020) {origin}, retrained with the teacher's probe "
            f"distillation by dynaflow: {describe(genotype)}; hidden size {config.hidden_size}, the "
            "teacher's "
            f"frozen embeddings ({info['parameters'] / 1e6:.1f} M parameters in all). "
            "Remote code: open with `trust_remote_code=True`."
        ),
        remote_code=remote_code(),
    )
