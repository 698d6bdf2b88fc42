"""Multi-process training under torchrun: DistributedDataParallel on gloo (CPU) or nccl (CUDA).

A plain ``python cli.py train`` has no ``WORLD_SIZE`` in its environment and runs as one process
with every helper here reduced to a no-op.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from digitgen.training.errors import TrainingError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place among the ranks of a run (one rank without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group of more than one (torchrun sets ``WORLD_SIZE``)."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    if not (world_size.strip().isascii() and world_size.strip().isdigit()):
        raise TrainingError(
            f"WORLD_SIZE={world_size!r} is not a number of processes; launch with torchrun, or unset it"
        )
    return int(world_size) > 1


def init_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes; nccl on CUDA, gloo on CPU."""
    if not launched_by_torchrun():
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except ValueError as exc:  # an environment torchrun did not make: WORLD_SIZE set, RANK or MASTER_ADDR not
        raise TrainingError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a process group, but {exc}; launch with torchrun, or "
            "unset WORLD_SIZE"
        ) from exc
    return DistContext(dist.get_rank(), dist.get_world_size()), device


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(ctx: DistContext, flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (so all ranks stop together)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def on_main_first(ctx: DistContext, device: torch.device, work: Callable[[], T], failed: str) -> T | None:
    """``work()`` on the main process while the others wait for it: its result there, ``None`` on the others. If it
    raises, every process raises (the main one its error, the others :class:`TrainingError` ``failed``), rather
    than the others waiting for a process that has gone."""
    result, failure = None, None
    if ctx.is_main:
        try:
            result = work()
        except Exception as exc:  # an OSError of a folder, say, as much as the package's own errors
            failure = exc
    if any_rank(ctx, failure is not None, device):
        raise failure or TrainingError(failed)
    return result


def gather_objects(ctx: DistContext, obj: object) -> list[object]:
    """``obj`` from every rank, in rank order (``[obj]`` in a single process)."""
    if not ctx.enabled:
        return [obj]
    gathered: list[object] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters: equal digests mean identical weights.

    Buffers are left out: BatchNorm running statistics are per rank (rank 0's are saved).
    """
    digest = hashlib.sha256()
    for tensor in module.parameters():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
