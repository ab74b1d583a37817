"""Mixed precision for training steps: bf16 autocast where the hardware computes bf16 natively.

On a CPU with AVX512-BF16 (or AMX) oneDNN runs bf16 matrix products natively; on one without, PyTorch
emulates them and a step gets slower, not faster. ``auto`` therefore means bf16 only where the hardware
has it (a CUDA GPU that supports bf16, a CPU whose flags list ``avx512_bf16`` or ``amx_bf16``) and fp32
elsewhere. Autocast keeps the weights, the optimizer state and the losses' reductions in fp32; only the
matrix products and what PyTorch's autocast lists run in bf16, so no loss scaling is needed. Evaluation
(dev scores, checkpoint selection) always runs in fp32: the scores that are reported are not approximated.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import get_args

import torch

from dynaflow.config import Precision

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = get_args(Precision)  # auto, fp32, bf16: what params.yaml allows
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU computes bf16 natively (Linux: its flags; elsewhere we cannot tell: False)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def resolve(setting: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for ``setting`` (auto, fp32, bf16) on ``device``."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if setting == "bf16" and not bf16_native(device):
        log.warning("precision bf16 on %s, which has no native bf16: emulated, slower than fp32", device)
    return setting


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
