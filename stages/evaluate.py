"""DynaBERT's measurement stage: every (width, depth) grid point of the trained model, on every profile.

Each grid point is physically extracted (what would ship) and goes through the shared harness
(:mod:`stages.measure`) like every other method's candidates. Selection and export happen in the
``select`` stage, over the candidates of every method that ran.
"""

from __future__ import annotations

from typing import Any

from dynaflow.config import MEASUREMENT_SECTION, Params
from dynaflow.evaluation.candidates import Candidate
from dynaflow.methods.dynabert import METHOD
from stages.measure import measure_candidates, measurement_headline, this_machine
from stages.registry import Layout, Stage, StageContext, register


def candidates(params: Params, layout: Layout) -> list[Candidate]:
    # Imported here, as in every stage module: `dynaflow status` imports them all to read the declarations.
    from dynaflow.methods.dynabert import candidates as dynabert
    from dynaflow.models.backbone import load_elastic

    model = load_elastic(layout.out("depth_kd")).eval()
    return dynabert.grid(model, params.widths, params.depths)


def run(ctx: StageContext) -> dict[str, Any]:
    found = candidates(ctx.params, ctx.layout)
    return measure_candidates(ctx, METHOD, ctx.upstream("depth_kd"), found, ctx.params.depth_kd.selection)


STAGE = register(
    Stage(
        name="evaluate",
        out="artifacts/evaluation",
        sections=(MEASUREMENT_SECTION, "widths", "depths", "depth_kd"),  # depth_kd: how it chose (report)
        upstream=("data", "depth_kd"),
        run=run,
        external=this_machine,
        candidates=candidates,
        headline=measurement_headline,
        description="DynaBERT's grid points, extracted, measured on every hardware profile",
    )
)
