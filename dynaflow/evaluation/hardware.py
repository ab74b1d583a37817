"""Hardware profiles on this machine: is the device here, how many threads, and how fast and how big.

Latency is measured the way a deployment sees it: threads pinned to the profile (``torch.set_num_threads``,
ONNX Runtime ``intra_op_num_threads``), untimed warm-up calls, then ``repeats`` timed calls per model.
Several models are timed in interleaved rounds (one call of each per round, the starting model rotating), so
slow drifts in machine load hit all of them alike. Each model gets the median, the 90th percentile
(linear interpolation, so ``median <= p90``), mean, min and max.

Peak memory is what holding the model and running one batch adds to the process:

* CPU (Linux): the resident-set high-water mark (``VmHWM``) is reset (``/proc/self/clear_refs``) after
  freed heap memory is handed back to the system (``malloc_trim``); the model is then built (weights copied
  or an ONNX Runtime session created) and run once; peak minus the resident set before.
* CUDA: ``torch.cuda.max_memory_allocated`` over the same build-and-run, minus what was allocated before.

Elsewhere (no ``/proc``) memory is reported as unknown (None).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaflow.config import HardwareProfile
from dynaflow.evaluation.machine import available_cpus

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MiB = 1024 * 1024


# ------------------------------------------------------------------------------------------------------------
# This machine


def resolve_threads(profile: HardwareProfile) -> int:
    return available_cpus() if profile.threads == "all" else int(profile.threads)


def _ort_providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


def unavailable(profile: HardwareProfile) -> str | None:
    """Why ``profile`` cannot be measured on this machine, or None when it can."""
    if profile.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device on this machine (torch.cuda.is_available() is False)"
    if profile.runtime == "onnxruntime":
        providers = _ort_providers()
        if providers is None:
            return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for cuda)"
        wanted = "CUDAExecutionProvider" if profile.device == "cuda" else "CPUExecutionProvider"
        if wanted not in providers:
            return f"onnxruntime here has no {wanted} (available: {', '.join(providers)})"
    cpus = available_cpus()
    if profile.threads != "all" and int(profile.threads) > cpus:
        return f"needs {profile.threads} threads, but this process may use {cpus} CPU(s)"
    return None


def _cpu_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (Linux /proc/stat), or None if unavailable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """Average number of cores kept busy by *other* processes during a block (None where unknown).

    Latency measured while other processes compete for the cores is inflated, and with several threads
    badly so (every parallel region waits for its slowest thread); the report warns about it.
    """

    cores: float | None = None
    wall_s: float = 0.0  # the block's wall time

    def __enter__(self) -> ForeignLoad:
        self._wall, self._own, self._busy = time.perf_counter(), time.process_time(), _cpu_busy_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, self.wall_s = _cpu_busy_seconds(), time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and self.wall_s > 0:
            own = time.process_time() - self._own
            self.cores = max(0.0, (busy - self._busy - own) / self.wall_s)


# ------------------------------------------------------------------------------------------------------------
# Latency


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per forward call over ``repeats`` timed calls."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @classmethod
    def from_seconds(cls, samples: list[float]) -> LatencyStats:
        if not samples:
            raise ValueError("no latency samples")
        ms = np.asarray(samples, dtype=np.float64) * 1e3
        return cls(
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            mean_ms=float(ms.mean()),
            min_ms=float(ms.min()),
            max_ms=float(ms.max()),
            repeats=len(samples),
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """torch intra-op threads set to ``threads`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_interleaved(
    runs: dict[Hashable, Callable[[], Any]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
    block: int = 1,
) -> dict[Hashable, LatencyStats]:
    """Latency of each zero-argument callable: ``warmup`` untimed calls, then ``repeats`` timed calls.

    The timed calls come in rounds; each round gives every callable ``block`` consecutive calls, starting one
    further along each round, so a load spike or a frequency change is shared by all instead of hitting
    whichever happened to run then. ``block=1`` interleaves fully. A larger block suits runtimes with a
    thread pool per model (ONNX Runtime sessions): a pool that just ran keeps spinning for a while and would
    steal cores from the next model; each block then starts with one untimed call. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called after each call, inside the timed region.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    done = sync or (lambda: None)
    keys = list(runs)
    for _ in range(warmup):
        for key in keys:
            runs[key]()
            done()
    samples: dict[Hashable, list[float]] = {k: [] for k in keys}
    r = 0
    while any(len(v) < repeats for v in samples.values()):
        for i in range(len(keys)):
            key = keys[(r + i) % len(keys)]
            if block > 1:
                runs[key]()
                done()
            for _ in range(min(block, repeats - len(samples[key]))):
                t0 = time.perf_counter()
                runs[key]()
                done()
                samples[key].append(time.perf_counter() - t0)
        r += 1
    return {k: LatencyStats.from_seconds(v) for k, v in samples.items()}


def measure_latency(
    run: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None] | None = None
) -> LatencyStats:
    """Latency of one callable (see :func:`time_interleaved`)."""
    return time_interleaved({0: run}, warmup, repeats, sync)[0]


# ------------------------------------------------------------------------------------------------------------
# Peak memory


def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size (Linux >= 4.0)
    except OSError:
        return False
    return True


def peak_memory_mb(build: Callable[[], Callable[[], Any]], device: str = "cpu") -> float | None:
    """MiB that building a runner (``build()``) and running it once adds at peak; None where unknown."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner = build()
        runner()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del runner
        torch.cuda.empty_cache()
        return peak / MiB
    _release_free_memory()
    if not _reset_peak_rss():
        return None
    before = _proc_status_mib("VmRSS")
    runner = build()
    runner()
    peak = _proc_status_mib("VmHWM")
    del runner
    _release_free_memory()
    if before is None or peak is None:
        return None
    return max(0.0, peak - before)


# ------------------------------------------------------------------------------------------------------------
# Runners: one zero-argument callable per (model, profile) that runs one batch


def synthetic_inputs(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed batch of random token ids (latency does not depend on which tokens), full attention mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, size=(batch_size, seq_len), dtype=np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }


def dev_batches(
    split: Any, batch_size: int, count: int, seq_len: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``count`` batches of ``batch_size`` consecutive dev examples (dev order: lengths mix as they come),
    drawn without replacement by a seeded generator, each padded to its own longest input (at most
    ``seq_len`` tokens): the inputs every candidate is timed on."""
    from dynaflow.data.splits import pad

    starts = list(range(0, len(split), batch_size))
    chosen = np.random.default_rng(seed).permutation(len(starts))[: min(count, len(starts))]
    batches = []
    for b in sorted(chosen):
        rows = range(starts[b], min(starts[b] + batch_size, len(split)))
        ids = [split.input_ids[i][:seq_len] for i in rows]
        types = [split.token_type_ids[i][:seq_len] for i in rows]
        batches.append(pad(ids, types))
    return batches


def cycling(runs: list[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable that runs ``runs`` in turn, call after call. Every candidate gets the same calls from
    :func:`time_interleaved` (warm-up, rounds, blocks), so each candidate's n-th call runs the same batch."""
    position = [0]

    def run() -> Any:
        out = runs[position[0] % len(runs)]()
        position[0] += 1
        return out

    return run


def torch_runner(
    model: torch.nn.Module, inputs: dict[str, np.ndarray], device: str = "cpu"
) -> Callable[[], Any]:
    """``model`` (already on ``device``, eval mode) on ``inputs``, under ``torch.inference_mode``."""
    feed = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}

    def run() -> Any:
        with torch.inference_mode():
            return model(**feed).logits

    return run


def ort_session(onnx_model: str | Path | bytes, threads: int, device: str = "cpu") -> Any:
    """An ONNX Runtime session with ``threads`` intra-op threads, sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    )
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    return ort.InferenceSession(source, options, providers=providers)


def ort_runner(session: Any, inputs: dict[str, np.ndarray]) -> Callable[[], Any]:
    wanted = {i.name for i in session.get_inputs()}
    feed = {k: v for k, v in inputs.items() if k in wanted}

    def run() -> Any:
        return session.run(None, feed)[0]

    return run


def cuda_sync() -> Callable[[], None] | None:
    return torch.cuda.synchronize if torch.cuda.is_available() else None
