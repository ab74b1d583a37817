"""ConvBERT's measurement stage: every student on every hardware profile, through the shared harness."""

from __future__ import annotations

from typing import Any

from dynaflow.config import MEASUREMENT_SECTION, Params
from dynaflow.evaluation.candidates import Candidate
from dynaflow.methods.convbert import METHOD
from stages.convbert import student_name
from stages.measure import measure_candidates, measurement_headline, this_machine
from stages.registry import Layout, Stage, StageContext, register


def candidates(params: Params, layout: Layout) -> list[Candidate]:
    # Imported here, as in every stage module: `dynaflow status` imports them all to read the declarations.
    from dynaflow.methods.convbert import candidates as convbert

    out = layout.out("convbert")
    return [convbert.student(out / student_name(g)) for g in params.convbert.groups]


def run(ctx: StageContext) -> dict[str, Any]:
    found = candidates(ctx.params, ctx.layout)
    return measure_candidates(ctx, METHOD, ctx.upstream("convbert"), found, ctx.params.convbert.selection)


STAGE = register(
    Stage(
        name="convbert_eval",
        out="artifacts/convbert-evaluation",
        sections=(MEASUREMENT_SECTION, "convbert"),  # convbert: which students, how they were chosen
        upstream=("data", "convbert"),
        run=run,
        external=this_machine,
        flow="convbert",
        candidates=candidates,
        headline=measurement_headline,
        description="the ConvBERT students measured on every hardware profile",
    )
)
