"""Data-parallel training across processes and machines: torchrun's environment, and no-ops in one process.

One process is the default and nothing here changes it. Launched by ``torchrun`` (``python -m
torch.distributed.run``, which is what ``dynaflow stage NAME --nproc N`` re-executes itself under, and what
``accelerate launch`` runs for multi-process jobs), every process reads ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the environment and joins one process group: NCCL
when the process has a GPU, gloo on CPU.

The training loop (:func:`dynaflow.training.loop.fit`) gives each rank a contiguous part of every global batch
(:func:`shard`), lets the stage's step run its forward and backward passes on it, then sums the gradients
across ranks weighted by each rank's share of the batch (:func:`all_reduce_gradients`): the result is the
gradient of the mean loss over the global batch, so N processes take the same steps as one process with
the same global batch, up to floating-point rounding. Only rank 0 (:func:`is_main`) logs, checkpoints and
writes outputs.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Gradients are summed in flat buckets of at most this many elements (one collective per bucket).
BUCKET_ELEMENTS = 1 << 24


def launched() -> bool:
    """True inside a process started by torchrun (or accelerate launch) for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device() -> torch.device:
    """Where training runs: ``$DYNAFLOW_DEVICE`` if set, else this process's GPU if there is one, else CPU."""
    if name := os.environ.get("DYNAFLOW_DEVICE"):
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init() -> bool:
    """Join the process group when launched with WORLD_SIZE > 1 (idempotent); False in a single process."""
    if dist.is_initialized():
        return True
    if not launched():
        return False
    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous part of ``n`` items; the first ``n % world`` get one more.

    Rank 0's part is never empty while ``n > 0``; a later rank's may be (a last batch smaller than the
    number of processes).
    """
    r, w = rank() if rank_ is None else rank_, world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(indices: Sequence[int] | np.ndarray, rank_: int | None = None, world: int | None = None) -> Any:
    """This rank's part of a global batch of indices (the whole batch in a single process)."""
    start, stop = shard_bounds(len(indices), rank_, world)
    return indices[start:stop]


def _buckets(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    groups: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if groups[-1] and size + p.numel() > BUCKET_ELEMENTS:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel()
    return [g for g in groups if g]


@torch.no_grad()
def all_reduce_gradients(model: torch.nn.Module, local_n: int, global_n: int) -> None:
    """Make every rank's gradients the gradient of the mean loss over the global batch.

    Each rank's ``.grad`` holds the gradient of its *mean* loss over its ``local_n`` examples (summed over
    however many backward passes the step made). The global-batch gradient is
    ``Σ_r (local_n_r / global_n) · grad_r``; it is computed with one summing all-reduce per bucket, so it is
    right for uneven shards too (a last batch that does not split evenly, or a rank with no examples,
    whose gradients are None and count as zero). A parameter whose gradient is None on every rank stays
    None (the optimizer skips it, as it would in one process). No-op in a single process.
    """
    if world_size() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    weight = local_n / global_n
    for bucket in _buckets(params):
        ref = bucket[0]
        flat = torch.cat(
            [
                p.grad.detach().reshape(-1).to(ref.dtype) * weight
                if p.grad is not None
                else torch.zeros(p.numel(), device=ref.device, dtype=ref.dtype)
                for p in bucket
            ]
            + [torch.tensor([float(p.grad is not None) for p in bucket], device=ref.device, dtype=ref.dtype)]
        )
        dist.all_reduce(flat)
        offset, has_grad = 0, flat[-len(bucket) :]
        for i, p in enumerate(bucket):
            n = p.numel()
            if has_grad[i] > 0:
                values = flat[offset : offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = values.clone()
                else:
                    p.grad.copy_(values)
            offset += n


def mean_across_ranks(values: dict[str, float], local_n: int) -> dict[str, float]:
    """Example-weighted mean of per-rank batch means (what one process would report for the global batch).

    Ranks without examples (an empty shard) pass ``{}`` and ``local_n == 0``.
    """
    if world_size() == 1:
        return values
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, (local_n, values))
    total = sum(n for n, _ in gathered)
    keys = next(v for n, v in gathered if n > 0).keys()
    return {k: sum(n * v[k] for n, v in gathered if n > 0) / total for k in keys}


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the checkpoint only rank 0 read)."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=device() if device().type == "cuda" else None)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights and buffers (they load the same files, but be sure)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device().type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device().type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device())


# ---- launching -------------------------------------------------------------------------------------------


def processes(launch: Any) -> int:
    """Total number of processes a ``launch`` section asks for (nodes × processes per node)."""
    return int(launch.nnodes) * int(launch.nproc_per_node)


def torchrun_args(launch: Any) -> list[str]:
    """``torchrun`` options for a ``launch`` section: standalone on one node, static rendezvous on several.

    Several nodes: every node runs the same command with its own ``node_rank``; node 0 (where rank 0
    runs, and so where the outputs are written) listens on ``rdzv_endpoint``.
    """
    args = ["--nproc-per-node", str(launch.nproc_per_node)]
    if launch.nnodes == 1:
        return ["--standalone", *args]
    host, _, port = str(launch.rdzv_endpoint).rpartition(":")
    return [
        "--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank),
        "--master-addr", host, "--master-port", port, *args,
    ]  # fmt: skip


def launch_command(launch: Any, cli_args: list[str]) -> list[str]:
    """The command that runs ``dynaflow <cli_args>`` as ``launch`` asks, under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(launch), "-m", "dynaflow.cli",
            *cli_args]  # fmt: skip


def describe(cmd: list[str]) -> str:
    return shlex.join(cmd)


def launch_env(launch: Any, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a launched command: the machine's cores split over its processes (unless set)."""
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(launch.nproc_per_node))))
    return env
