"""Running one batch on one sub-network: the two ways a server can switch sub-networks per batch.

* :class:`ElasticActuator`: one copy of the weights (the trained elastic DynaBERT); width and depth are
  arguments of each forward call (SubNetAct-like: nothing to load when the policy switches).
* :class:`OrtActuator`: one ONNX Runtime session per sub-network, each extracted and exported once (memory =
  the sum of the sub-networks; ONNX Runtime is faster than PyTorch eager at small batches on CPU).

Both take padded numpy inputs and return float32 logits; ``bench/serve.py`` measures both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dynaflow.core.artifacts import atomic_file
from dynaflow.evaluation.hardware import ort_session, synthetic_inputs
from dynaflow.models.extract import extract_subnetwork

log = logging.getLogger(__name__)

Inputs = Mapping[str, np.ndarray]  # input_ids, attention_mask, token_type_ids: int64 [batch, length]


class Actuator(Protocol):
    runtime: str
    vocab_size: int

    def __call__(self, subnet: str, inputs: Inputs) -> np.ndarray: ...


def parse_subnet(name: str) -> tuple[float, float]:
    """``w0.5_d0.75`` -> (0.5, 0.75)."""
    try:
        w, d = name.split("_")
        if not (w.startswith("w") and d.startswith("d")):
            raise ValueError
        return float(w[1:]), float(d[1:])
    except ValueError:
        raise ValueError(
            f"{name!r} is not a sub-network name (expected w<width>_d<depth>, e.g. w0.5_d0.75)"
        ) from None


class ElasticActuator:
    runtime = "torch"

    def __init__(self, model: Any, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = model.eval()
        self.vocab_size = int(model.config.vocab_size)

    @torch.inference_mode()
    def __call__(self, subnet: str, inputs: Inputs) -> np.ndarray:
        width, depth = parse_subnet(subnet)
        feed = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
        return self.model(**feed, width_mult=width, depth_mult=depth).logits.float().numpy()


class OrtActuator:
    runtime = "onnxruntime"

    def __init__(self, model: Any, subnets: Sequence[str], threads: int, cache_dir: Path) -> None:
        from dynaflow.evaluation.export import export_onnx

        self.vocab_size = int(model.config.vocab_size)
        self.sessions: dict[str, Any] = {}
        cache_dir.mkdir(parents=True, exist_ok=True)
        for name in subnets:
            path = cache_dir / f"{name}.onnx"
            if not path.is_file():
                log.info("exporting sub-network %s to ONNX (%s)", name, path)
                sub = extract_subnetwork(model, *parse_subnet(name)).eval()
                with atomic_file(path) as tmp:
                    export_onnx(sub, tmp)
            self.sessions[name] = ort_session(path, threads)

    def __call__(self, subnet: str, inputs: Inputs) -> np.ndarray:
        session = self.sessions.get(subnet)
        if session is None:
            raise KeyError(f"no ONNX session for sub-network {subnet!r}")
        wanted = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in inputs.items() if k in wanted})[0].astype(np.float32)


def timing_run(actuator: Actuator, subnet: str) -> Any:
    """``run(batch, length)`` on random tokens, for :func:`dynaflow.serving.profile.time_subnet`."""

    def run(batch: int, length: int) -> np.ndarray:
        return actuator(subnet, synthetic_inputs(actuator.vocab_size, batch, length))

    return run
