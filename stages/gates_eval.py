"""The gated models' measurement stages, token gates' and PoWER-BERT's, each through the shared harness
(:func:`family` also makes the measurement of token gates on DynaBERT sub-networks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dynaflow.config import MEASUREMENT_SECTION, Params
from dynaflow.evaluation.candidates import Candidate
from dynaflow.methods.gates import METHOD, POWER_BERT
from stages.gates import run_name
from stages.measure import measure_candidates, measurement_headline, this_machine
from stages.registry import Layout, Stage, StageContext, register


def per_lambda(section: str) -> Callable[[Params], list[str]]:
    """The model folders of a stage that trains one model per ``section.lambdas``."""
    return lambda params: [run_name(lam) for lam in getattr(params, section).lambdas]


def family(
    method: str,
    stage: str,
    sections: tuple[str, ...],
    names: Callable[[Params], list[str]],
    flow: str = "gates",
) -> Stage:
    """The measurement stage of one family: the models ``stage`` trained, ``names``: their folders, read from
    the params ``sections`` (the first sets the family's checkpoint selection)."""

    def candidates(params: Params, layout: Layout) -> list[Candidate]:
        from dynaflow.methods.gates.candidates import gated_model

        out = layout.out(stage)
        return [gated_model(out / name, method) for name in names(params)]

    def run(ctx: StageContext) -> dict[str, Any]:
        found = candidates(ctx.params, ctx.layout)
        return measure_candidates(
            ctx, method, ctx.upstream(stage), found, getattr(ctx.params, sections[0]).selection
        )

    return Stage(
        name=f"{stage}_eval",
        out=f"artifacts/{stage}-evaluation",
        sections=(MEASUREMENT_SECTION, *sections),
        upstream=("data", stage),
        run=run,
        external=this_machine,
        flow=flow,
        candidates=candidates,
        headline=measurement_headline,
        description=f"the {stage} models measured on every hardware profile (latency on the dev inputs)",
    )


GATES_EVAL = register(family(METHOD, "gates", ("gates",), per_lambda("gates")))
POWER_BERT_EVAL = register(family(POWER_BERT, "powerbert", ("powerbert",), per_lambda("powerbert")))
