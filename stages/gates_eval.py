"""The gated models' measurement stages, token gates' and PoWER-BERT's, each through the shared harness."""

from __future__ import annotations

from typing import Any

from dynaflow.config import MEASUREMENT_SECTION, Params
from dynaflow.evaluation.candidates import Candidate
from dynaflow.methods.gates import METHOD, POWER_BERT
from stages.gates import run_name
from stages.measure import measure_candidates, measurement_headline, this_machine
from stages.registry import Layout, Stage, StageContext, register


def family(method: str, stage: str, section: str) -> Stage:
    """The measurement stage of one family: the models ``stage`` trained, one per ``section.lambdas``."""

    def candidates(params: Params, layout: Layout) -> list[Candidate]:
        from dynaflow.methods.gates.candidates import gated_model

        out = layout.out(stage)
        return [gated_model(out / run_name(lam), method) for lam in getattr(params, section).lambdas]

    def run(ctx: StageContext) -> dict[str, Any]:
        found = candidates(ctx.params, ctx.layout)
        return measure_candidates(
            ctx, method, ctx.upstream(stage), found, getattr(ctx.params, section).selection
        )

    return Stage(
        name=f"{stage}_eval",
        out=f"artifacts/{stage}-evaluation",
        sections=(MEASUREMENT_SECTION, section),
        upstream=("data", stage),
        run=run,
        external=this_machine,
        flow="gates",
        candidates=candidates,
        headline=measurement_headline,
        description=f"the {stage} models measured on every hardware profile (latency on the dev inputs)",
    )


GATES_EVAL = register(family(METHOD, "gates", "gates"))
POWER_BERT_EVAL = register(family(POWER_BERT, "powerbert", "powerbert"))
