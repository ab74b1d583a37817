"""A candidate: one deployable model a compression method produced, as the shared bench sees it.

Every method (DynaBERT's sub-networks, the Theseus successor, the next ones) describes its models this
way and nothing more; measurement (:mod:`dynaflow.evaluation.harness`), selection, the report and export
treat all candidates alike. A candidate is cheap to list: ``build`` makes the model only when it is
measured or exported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where models are built: listing candidates must stay cheap
    import torch

Batch = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class Candidate:
    method: str  # the compression method that made it (``dynabert``, ``theseus``)
    name: str  # unique within the method: ``w0.5_d0.75``, ``L3``
    arch: Mapping[str, Any]  # layers, heads, intermediate, and what else describes it (width, depth)
    # The standalone model that would ship: a Hugging Face sequence classifier, CPU, eval mode.
    build: Callable[[], torch.nn.Module]
    label: str = ""  # short point label in plots (default: the name)
    title: str = ""  # the model card's heading (default: "<method> candidate <name>")
    description: str = ""  # the model card's first paragraph
    # Logits the built model must reproduce on a batch (DynaBERT: the elastic model at that width and
    # depth); None: the built model's own, computed before export.
    reference: Callable[[Batch], np.ndarray] | None = None
    # Encoder FLOPs per sequence of this many tokens; None: counted by torch's FlopCounterMode.
    flops: Callable[[int], float] | None = None
    # Files an export must carry to load without dynaflow installed (name -> text), e.g. remote code.
    remote_code: Mapping[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """``method/name``: unique across methods (rows, metric keys, report tables)."""
        return f"{self.method}/{self.name}"

    def row_id(self) -> dict[str, Any]:
        """The identifying fields every measured row starts with."""
        return {
            "candidate": self.id,
            "method": self.method,
            "name": self.name,
            "label": self.label or self.name,
            **dict(self.arch),
        }


def remote_auto_map(code_file: str, config_class: str, model_class: str) -> dict[str, str]:
    """A config's ``auto_map`` pointing at a method's remote code (``code_file`` shipped beside the weights),
    so a saved model opens with ``trust_remote_code=True`` where dynaflow is not installed."""
    module = code_file.removesuffix(".py")
    return {
        "AutoConfig": f"{module}.{config_class}",
        "AutoModelForSequenceClassification": f"{module}.{model_class}",
    }


def counted_flops(model: torch.nn.Module, vocab_size: int, seq_len: int) -> float:
    """FLOPs of one forward pass over one sequence, as torch's FlopCounterMode counts them.

    Fused attention kernels (scaled_dot_product_attention on CPU) are not counted by it: methods whose
    models have attention give an analytic ``Candidate.flops`` instead.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(1, vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    return float(counter.get_total_flops())
