"""AdaBERT's measurement stages: the searched student's, and the random control's choice, each through the
shared harness (two methods, as token gates and PoWER-BERT: the front shows whether the search paid)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynaflow.config import MEASUREMENT_SECTION, Params
from dynaflow.evaluation.candidates import Candidate
from dynaflow.methods.adabert import METHOD, RANDOM
from stages.adabert import SEARCHED, chosen_random
from stages.measure import measure_candidates, measurement_headline, this_machine
from stages.registry import Layout, Stage, StageContext, register


def family(method: str, stage: str, student_dir: Any) -> Stage:
    """The measurement stage of the student ``student_dir(stage's output)`` names."""

    def candidates(params: Params, layout: Layout) -> list[Candidate]:
        from dynaflow.methods.adabert.candidates import student

        out = layout.out(stage)
        return [student(out / student_dir(out), method)]

    def run(ctx: StageContext) -> dict[str, Any]:
        found = candidates(ctx.params, ctx.layout)
        return measure_candidates(ctx, method, ctx.upstream(stage), found, ctx.params.adabert_train.selection)

    return Stage(
        name=f"{stage}_eval",
        out=f"artifacts/{stage.replace('_', '-')}-evaluation",
        sections=(MEASUREMENT_SECTION, "adabert_train"),  # adabert_train: how the students were chosen
        upstream=("data", stage),
        run=run,
        external=this_machine,
        flow="adabert",
        candidates=candidates,
        headline=measurement_headline,
        description=f"the {stage} student measured on every hardware profile",
    )


def _searched(out: Path) -> str:
    return SEARCHED


ADABERT_EVAL = register(family(METHOD, "adabert", _searched))
RANDOM_EVAL = register(family(RANDOM, "adabert_random", chosen_random))
