"""Process groups, devices, and everything applied to a model from outside: DDP, torch.compile.

The networks and objectives contain no distributed code; this module wraps them. Runs plain (one process)
or under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set): NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanogen.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("run.device: 'cuda' was requested but no CUDA device is visible; use run.device=cpu")
        return torch.device("cuda", local_rank if spec == "cuda" else int(spec.split(":")[1]))
    if spec != "cpu":
        raise UserError(f"run.device: expected auto, cpu or cuda, got '{spec}'")
    return torch.device("cpu")


def init(device_spec: str = "auto") -> DistInfo:
    """Join the process group if launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return DistInfo(rank, world, local, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_module(module: nn.Module) -> None:
    """Make every rank hold rank 0's weights (done before the EMA copy, so EMAs agree across ranks)."""
    if dist.is_initialized():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's (n_r, ...) tensor in rank order (n_r may differ); a no-op on one process."""
    if not dist.is_initialized():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros(most, *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts, strict=True)])


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_for_training(objective: nn.Module, info: DistInfo, compile: bool) -> nn.Module:
    """DDP over the objective (the loss is its forward), then optionally torch.compile."""
    wrapped: nn.Module = objective
    if info.enabled:
        kwargs = {"device_ids": [info.device.index]} if info.device.type == "cuda" else {}
        wrapped = nn.parallel.DistributedDataParallel(objective, broadcast_buffers=False, **kwargs)
    if compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return wrapped
