"""This machine, as measurements depend on it: CPU, cores, GPUs and runtime versions.

Measured latency belongs to the hardware it was measured on, so a measurement stage hashes this machine's
identity (:func:`machine_file`) into its cache key. Reading it must be cheap: `dynaflow status` computes
every stage's key, and importing torch to ask for its version and GPUs would cost it a second and a half.
Versions come from the installed packages' metadata; the GPU names (which need torch) are remembered per
boot, per ``CUDA_VISIBLE_DEVICES`` and per torch version, which is when they can change.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from dynaflow.core.artifacts import atomic_write_bytes

BUSY_CORES = 0.25  # warn when other processes used more cores than this during a measurement


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), which is what ``threads: all`` means."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``); empty where they cannot be read (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni(flags: set[str]) -> bool | None:
    """Whether the CPU has VNNI (AVX-512 VNNI or AVX-VNNI); None when its flags are unknown."""
    return bool(flags & {"avx512_vnni", "avx_vnni"}) if flags else None


def package_version(name: str) -> str | None:
    """An installed distribution's version (``torch.__version__`` is the same string), or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dynaflow"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: no boot to remember the GPUs by, so they are asked for every time
        return None


def cuda_devices() -> list[str]:
    """The names of the GPUs torch sees; asked of torch once per boot, visible-device set and version."""
    when = {
        "boot": _boot_id(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch": package_version("torch"),
    }
    remembered = cache_dir() / "cuda.json"
    if when["boot"] is not None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads(remembered.read_text())
            if saved["when"] == when:
                return list(saved["devices"])
    import torch

    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    if when["boot"] is not None:
        with contextlib.suppress(OSError):
            atomic_write_bytes(remembered, json.dumps({"when": when, "devices": devices}).encode())
    return devices


def machine_info() -> dict[str, Any]:
    """What the measurements ran on (stored with every result and shown in the report)."""
    return {
        "host": platform.node(),
        "cpu": cpu_name(),
        "cpus": available_cpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "cuda": cuda_devices(),
        "onnxruntime": package_version("onnxruntime"),
    }


def machine_identity() -> dict[str, Any]:
    """The parts of :func:`machine_info` that change measured latency (not the host name or load)."""
    info = machine_info()
    return {k: info[k] for k in ("cpu", "cpus", "torch", "cuda", "onnxruntime")}


def machine_file() -> Path:
    """A file whose content is this machine's identity (hashed into the measurement stages' cache keys).

    On another machine (another CPU, core count, GPU or runtime version) the file's content differs and the
    stage runs again.
    """
    path = cache_dir() / "machine.json"
    text = json.dumps(machine_identity(), indent=2, sort_keys=True) + "\n"
    with contextlib.suppress(OSError):
        if not path.is_file() or path.read_text() != text:
            atomic_write_bytes(path, text.encode())
    return path
