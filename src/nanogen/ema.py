"""Exponential moving average of the network's parameters (spec ``reference.md`` §1.5).

After every optimizer step: ema <- d * ema + (1 - d) * theta, over parameters only (buffers are copied),
no warmup. The EMA is created from the network *after* it is synchronised across ranks, so every rank's
EMA starts identical (fixing the reference's per-rank EMA quirk).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(net).eval().requires_grad_(False)
        self.bind(net)

    def bind(self, net: nn.Module) -> None:
        """(Re)attach to the live network, e.g. after FSDP2 replaced its parameters by shards (the EMA network
        is then sharded the same way, so each process averages its own shard)."""
        from nanogen.parallel import local_tensors

        self._src, self._dst = local_tensors(net), local_tensors(self.model)

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._dst, [p.detach() for p in self._src], 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA state dict (a collective under FSDP; rank 0 gets the tensors)."""
        from nanogen.parallel import full_state_dict

        return full_state_dict(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from nanogen.parallel import load_full_state_dict

        load_full_state_dict(self.model, state)
