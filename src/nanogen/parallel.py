"""Process groups, devices, and everything applied to a model from outside: DDP, FSDP2, torch.compile,
activation checkpointing.

The networks and objectives contain no distributed code; this module wraps them. Runs plain (one process)
or under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set): NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
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


def _ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """DDP without per-forward buffer broadcasts (buffers are fixed tables, identical on every rank after
    ``broadcast_module``); torch >= 2.15 names that ``forward_sync_buffers``, older releases ``broadcast_buffers``."""
    import inspect

    kwargs: dict[str, Any] = {"device_ids": [info.device.index]} if info.device.type == "cuda" else {}
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    return nn.parallel.DistributedDataParallel(module, **kwargs)


def wrap_for_training(objective: nn.Module, info: DistInfo, compile: bool) -> nn.Module:
    """Stage 1: DDP over the loss module, then optionally torch.compile of the whole of it. (Stage 2 uses
    ``prepare_training``: per-block compile, activation checkpointing, DDP or FSDP2.)"""
    wrapped: nn.Module = objective
    if info.enabled:
        wrapped = _ddp(objective, info)
    if compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return wrapped


# ----------------------------------------------------------------------------------------------------------
# Stage 2: everything applied to the network from outside, in one place (performance.md §10; style: "DDP,
# FSDP2, compile and activation checkpointing are applied from one module"). Order, as in torchtitan:
# activation checkpointing, then torch.compile, both per transformer block, then FSDP2 per block and at the
# root (or DDP over the objective). Parameter names never change: the per-block wrappers replace the block's
# ``forward`` on the instance, so checkpoints stay plain state dicts with the model's own keys.


def blocks_of(net: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: every module of a ``ModuleList`` child of the network."""
    return [b for child in net.children() if isinstance(child, nn.ModuleList) for b in child]


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # sampling / eval: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _fsdp(net: nn.Module, info: DistInfo, bf16: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    # bf16: gather parameters in bf16 (half the traffic), reduce gradients in fp32; the sharded master
    # parameters and the optimizer state stay fp32, as with DDP + autocast.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    blocks = blocks_of(net)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by the backward pass: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(net, mesh=mesh, mp_policy=mp)


def prepare_training(
    net: nn.Module, objective: nn.Module, ema_net: nn.Module | None, info: DistInfo, tc: Any
) -> nn.Module:
    """Apply the config's speed and scale settings to ``net`` (in place) and return the module whose forward
    computes the loss: the objective itself, or DDP over it. Build the optimizer *after* this call (FSDP2
    replaces the parameters with sharded ones). With FSDP the EMA network is sharded the same way, so its
    update is a local lerp on each shard."""
    blocks = blocks_of(net)
    if tc.activation_checkpointing:  # recompute each block's activations in the backward pass
        for block in blocks:
            block.forward = _checkpointed(block.forward)
    if tc.compile:  # per block: identical blocks share one compiled graph, and compile time stays small
        for block in blocks:
            block.forward = torch.compile(block.forward, backend=tc.compile_backend, mode=tc.compile_mode)
    if info.enabled and tc.parallel == "fsdp":
        _fsdp(net, info, tc.precision == "bf16")
        if ema_net is not None:
            _fsdp(ema_net, info, bf16=False)
        return objective
    if info.enabled:
        return _ddp(objective, info)
    return objective


@contextmanager
def gradient_sync(wrapped: nn.Module, net: nn.Module, sync: bool) -> Iterator[None]:
    """Gradient accumulation: reduce gradients only on the last micro-step of an optimizer step."""
    if sync:
        yield
    elif is_fsdp(net):
        net.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)  # type: ignore[operator]
    elif isinstance(wrapped, nn.parallel.DistributedDataParallel):
        with wrapped.no_sync():
            yield
    else:
        yield


def local_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Each parameter's storage on this process: the shard under FSDP, the parameter itself otherwise."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]  # type: ignore[operator]


def full_state_dict(module: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole state dict with the model's own keys. Under FSDP this is a collective (call it on every rank):
    by default rank 0 gets it on CPU and the other ranks an empty dict; ``everywhere`` gives every rank a copy
    on its device."""
    if not is_fsdp(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    return get_model_state_dict(module, options=options)


def load_full_state_dict(module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load a whole (unsharded) state dict; each FSDP rank keeps its own shard."""
    if not is_fsdp(module):
        module.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True))


def optimizer_state_dict(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name (not by position), whole, on CPU: the same file resumes
    under one process, DDP or FSDP, on any number of processes. A collective under FSDP (rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=is_fsdp(net)))


def load_optimizer_state_dict(net: nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a name-keyed whole optimizer state (``optimizer_state_dict``) or torch's position-keyed one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if sd.get("state") and all(isinstance(k, int) for k in sd["state"]) or (
        sd.get("param_groups") and all(isinstance(k, int) for k in sd["param_groups"][0]["params"])
    ):
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        sd = {
            "state": {names[k]: v for k, v in sd.get("state", {}).items()},
            "param_groups": [{**g, "params": [names[k] for k in g["params"]]} for g in sd["param_groups"]],
        }
    set_optimizer_state_dict(net, opt, sd, options=StateDictOptions(full_state_dict=True))
