"""Theseus's measurement stage: the successor on every hardware profile, through the shared harness.

Its row carries ``method: theseus`` and ``depth = successor layers / teacher layers``, so the report can put
it beside DynaBERT's sub-networks with as many layers; selection treats it like any other candidate.
"""

from __future__ import annotations

from typing import Any

from dynaflow.config import MEASUREMENT_SECTION, Params
from dynaflow.evaluation.candidates import Candidate
from dynaflow.methods.theseus import METHOD
from stages.measure import measure_candidates, measurement_headline, this_machine
from stages.registry import Layout, Stage, StageContext, register


def candidates(params: Params, layout: Layout) -> list[Candidate]:
    # Imported here, as in every stage module: `dynaflow status` imports them all to read the declarations.
    from dynaflow.methods.theseus import candidates as theseus

    return [theseus.successor(layout.out("theseus"))]


def run(ctx: StageContext) -> dict[str, Any]:
    found = candidates(ctx.params, ctx.layout)
    return measure_candidates(ctx, METHOD, ctx.upstream("theseus"), found, ctx.params.theseus.selection)


STAGE = register(
    Stage(
        name="theseus_eval",
        out="artifacts/theseus-evaluation",
        sections=(MEASUREMENT_SECTION, "theseus"),  # theseus: how it chose (report)
        upstream=("data", "theseus"),
        run=run,
        external=this_machine,
        flow="theseus",
        candidates=candidates,
        headline=measurement_headline,
        description="the Theseus successor measured on every hardware profile",
    )
)
