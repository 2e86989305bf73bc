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
        self._src = [p for p in net.parameters()]
        self._dst = [p for p in self.model.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._dst, [p.detach() for p in self._src], 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
