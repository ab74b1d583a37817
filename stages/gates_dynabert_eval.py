"""The measurement stage of token gates on DynaBERT sub-networks: every cell and λ through the shared
harness, as the gates stage's models are measured."""

from dynaflow.methods.gates import GATES_ON_DYNABERT
from stages.gates_dynabert import run_names
from stages.gates_eval import family
from stages.registry import register

STAGE = register(
    family(GATES_ON_DYNABERT, "gates_dynabert", ("gates", "gates_dynabert"), run_names, flow="gates_dynabert")
)
