"""The pipeline's stages: one module per stage (or per pair of related stages), each registering itself.

Importing this package registers every stage in pipeline order (see :mod:`stages.registry` for the stage
interface, the cache keys and the runner). A new compression method adds its stage module(s) here: its
training stage(s) and a measurement stage whose ``candidates`` join selection (see ARCHITECTURE.md).
"""

import importlib

from stages.registry import (
    CODE_VERSION,
    STAGES,
    Layout,
    Stage,
    StageContext,
    check_upstream,
    code_modules,
    flow_stages,
    flows,
    register,
    run_stage,
    stage_key,
    summary,
    unregister,
)

__all__ = [
    "CODE_VERSION",
    "STAGES",
    "Layout",
    "Stage",
    "StageContext",
    "check_upstream",
    "code_modules",
    "flow_stages",
    "flows",
    "register",
    "run_stage",
    "stage_key",
    "summary",
    "unregister",
]

# Pipeline order: a stage registers after its upstream. A new method appends its module(s) here.
STAGE_MODULES = (
    "data",
    "teacher",
    "rewire",
    "augment",
    "distill",
    "evaluate",
    "theseus",
    "theseus_eval",
    "convbert",
    "convbert_eval",
    "gates",
    "gates_dynabert",
    "powerbert",
    "gates_eval",
    "gates_dynabert_eval",
    "adabert",
    "adabert_eval",
    "select",
)
for _module in STAGE_MODULES:
    importlib.import_module(f"stages.{_module}")
