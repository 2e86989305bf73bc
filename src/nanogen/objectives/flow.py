"""Rectified flow with v- or x-prediction (spec ``reference.md`` §4.1-4.2).

Convention: t = 0 is data, t = 1 is noise, x_t = (1 - t) x + t eps.

- Time: t0 = sigmoid(mu + sigma n), n ~ N(0, 1), then the resolution shift t = s t0 / (1 + (s - 1) t0) with
  s = sqrt(D / base) (D = number of latent elements), i.e. logit(t) = logit(t0) + ln s.
- Target: v = (x_t - x) / max(t, t_eps), which is eps - x for t >= t_eps and damped below it (a reference
  QUIRK kept for parity with released checkpoints; set ``t_eps: 0`` for the plain target).
- Prediction -> velocity: v-pred is used as is; x-pred gives v = (x_t - x_hat) / max(t, t_eps) (JiT's
  "x-prediction, v-loss").
- Loss: plain MSE over (B, C, H, W).
- CFG dropout: with probability ``cfg_dropout_prob`` per sample the condition becomes the null condition.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nanogen.conditioning import Cond
from nanogen.errors import ConfigError


@dataclass(frozen=True)
class LogitNormal:
    mu: float = 0.0
    sigma: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> LogitNormal:
        """'logit-normal_MU_SIGMA' (the reference's only family), e.g. 'logit-normal_-1.1_0.8'."""
        m = re.fullmatch(r"logit-normal_(-?[0-9.eE+-]+)_([0-9.eE+-]+)", spec.strip())
        if not m:
            raise ConfigError(
                f"transport.time_dist_type: cannot parse '{spec}'; write logit-normal_MU_SIGMA, e.g. logit-normal_0_1"
            )
        try:
            return cls(float(m.group(1)), float(m.group(2)))
        except ValueError:
            raise ConfigError(f"transport.time_dist_type: '{spec}' has a non-numeric MU or SIGMA") from None

    def sample(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, device=device, generator=generator)
        return torch.sigmoid(self.mu + self.sigma * z)


def shift_factor(dim: int, base: int) -> float:
    """s = sqrt(D / base): 1 for SD-VAE 4x32x32 at base 4096, sqrt(48) for RAE 768x16x16 (§4.1)."""
    return math.sqrt(dim / base)


def shift_time(t: Tensor | float, s: float) -> Tensor | float:
    """t -> s t / (1 + (s - 1) t): moves mass toward noise for s > 1; fixes 0 and 1."""
    return s * t / (1 + (s - 1) * t)


class FlowObjective(nn.Module):
    """Wraps ``net``; ``forward`` is the training loss, ``velocity`` is what samplers integrate."""

    def __init__(
        self,
        net: nn.Module,
        *,
        prediction: str = "velocity",
        time_dist: LogitNormal = LogitNormal(),
        shift: float = 1.0,
        t_eps: float = 0.05,
        cfg_dropout_prob: float = 0.1,
    ):
        super().__init__()
        if prediction not in ("velocity", "x"):
            raise ConfigError(f"transport.prediction must be 'velocity' or 'x', got '{prediction}'")
        self.net = net
        self.prediction = prediction
        self.time_dist = time_dist
        self.shift = shift
        self.t_eps = t_eps
        self.cfg_dropout_prob = cfg_dropout_prob

    def sample_t(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        return shift_time(self.time_dist.sample(n, device, generator), self.shift)  # type: ignore[return-value]

    def to_velocity(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.prediction == "velocity":
            return out
        denom = t.clamp_min(self.t_eps).view(-1, *([1] * (x_t.ndim - 1)))
        return (x_t - out) / denom

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.to_velocity(self.net(x_t, t, cond.value, cond.mask), x_t, t)

    def forward(self, x: Tensor, cond: Cond, null: Cond) -> dict[str, Tensor]:
        """x: clean latents (B, C, H, W); cond: the batch's conditions; null: the null condition (batch 1 or B)."""
        B = x.shape[0]
        t = self.sample_t(B, x.device)
        eps = torch.randn_like(x)
        tb = t.view(-1, *([1] * (x.ndim - 1)))
        x_t = (1 - tb) * x + tb * eps
        target = (x_t - x) / tb.clamp_min(self.t_eps)
        if self.cfg_dropout_prob > 0:
            drop = torch.rand(B, device=x.device) < self.cfg_dropout_prob
            cond = cond.where(drop, null)
        v_hat = self.velocity(x_t, t, cond)
        loss = (v_hat.float() - target.float()).pow(2).mean()
        return {"loss": loss}
