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


State = Tensor | tuple[Tensor, Tensor]  # the image latent, or (latent, REG token) for REG models


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.ndim - 1)))


class FlowObjective(nn.Module):
    """Wraps ``net``; ``forward`` is the training loss, ``velocity`` is what samplers integrate.

    Optional terms (all zero-cost when off):
    - REG (§4.4): the frozen encoder's CLS token of the clean image is noised with the same t, fed as an extra
      first token, and its velocity is a second target: ``L_reg = reg_coeff * MSE(v_cls_hat, v_cls)``. At
      sampling time the state is the pair (latent, cls) and both are integrated together.
    - REPA (§4.3): ``L_repa = repa_coeff * MSE(projected encoder tokens after block k, encoder patch tokens)``
      (the CLS target is prepended when REG is on).
    - perceptual (§4.7): a ``PerceptualLoss`` on the predicted clean image (x-prediction), gated by t.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        prediction: str = "velocity",
        time_dist: LogitNormal = LogitNormal(),
        shift: float = 1.0,
        t_eps: float = 0.05,
        cfg_dropout_prob: float = 0.1,
        reg_coeff: float = 0.0,
        repa_coeff: float = 0.0,
        encoder: nn.Module | None = None,
        perceptual: nn.Module | None = None,
    ):
        super().__init__()
        if prediction not in ("velocity", "x"):
            raise ConfigError(f"transport.prediction must be 'velocity' or 'x', got '{prediction}'")
        if perceptual is not None and prediction != "x":
            raise ConfigError("perceptual_loss: the perceptual losses need transport.prediction: x (they read the predicted clean image)")
        self.net = net
        self.prediction = prediction
        self.time_dist = time_dist
        self.shift = shift
        self.t_eps = t_eps
        self.cfg_dropout_prob = cfg_dropout_prob
        # a REG network integrates (latent, token) pairs even when only sampling (reg_coeff then unused)
        self.reg = bool(reg_coeff) or bool(getattr(getattr(net, "cfg", None), "enable_reg", False))
        self.reg_coeff = reg_coeff
        self.repa_coeff = repa_coeff
        self.encoder = encoder
        self.perceptual = perceptual

    def sample_t(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        return shift_time(self.time_dist.sample(n, device, generator), self.shift)  # type: ignore[return-value]

    def to_velocity(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Raw network output -> velocity. x-pred: v = (x_t - x_hat) / max(t, t_eps) (§4.2)."""
        if self.prediction == "velocity":
            return out
        return (x_t - out) / _bcast(t, x_t).clamp_min(self.t_eps)

    def velocity(self, x_t: State, t: Tensor, cond: Cond) -> State:
        if self.reg:
            x, c = x_t  # type: ignore[misc]
            out = self.net(x, t, cond.value, cond.mask, cls_t=c)
            return self.to_velocity(out.x, x, t), self.to_velocity(out.cls, c, t)
        return self.to_velocity(self.net(x_t, t, cond.value, cond.mask), x_t, t)  # type: ignore[arg-type]

    def target(self, x_t: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """v = (x_t - x) / max(t, t_eps): eps - x for t >= t_eps, damped below it (reference QUIRK, §4.2)."""
        return (x_t - x) / _bcast(t, x).clamp_min(self.t_eps)

    def forward(self, x: Tensor, cond: Cond, null: Cond, images: Tensor | None = None) -> dict[str, Tensor]:
        """x: clean latents (B, C, H, W); cond: the batch's conditions; null: the null condition (batch 1 or B);
        images: the clean images in [-1, 1] for the frozen encoder (default: x, i.e. pixel space)."""
        B = x.shape[0]
        t = self.sample_t(B, x.device)
        # drawn in logical (row-major) order, not x's memory layout: the same latents give the same noise
        # whether they come channels-last from a VAE encoder or contiguous from extracted shards
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype)
        tb = _bcast(t, x)
        x_t = (1 - tb) * x + tb * eps
        if self.cfg_dropout_prob > 0:
            drop = torch.rand(B, device=x.device) < self.cfg_dropout_prob
            cond = cond.where(drop, null)
        feats = None
        if self.reg or self.repa_coeff:
            if self.encoder is None:
                raise RuntimeError("REPA / REG training needs the frozen target encoder: build the objective with "
                                   "nanogen.build.build_objective(cfg, net, load_frozen(cfg))")  # fmt: skip
            with torch.no_grad():
                feats = self.encoder(images if images is not None else x)
        kwargs: dict = {}
        if self.reg:
            cls = feats.cls.to(x.dtype)  # type: ignore[union-attr]
            cls_t = (1 - t[:, None]) * cls + t[:, None] * torch.randn_like(cls)
            kwargs["cls_t"] = cls_t
        if self.repa_coeff:
            kwargs["return_repa"] = True
        out = self.net(x_t, t, cond.value, cond.mask, **kwargs)
        raw = out if isinstance(out, Tensor) else out.x
        v_hat = self.to_velocity(raw, x_t, t)
        loss_fm = (v_hat.float() - self.target(x_t, x, t).float()).pow(2).mean()
        losses = {"loss_fm": loss_fm}
        if self.reg:
            v_cls = self.to_velocity(out.cls, cls_t, t)
            losses["loss_reg"] = self.reg_coeff * (v_cls.float() - self.target(cls_t, cls, t).float()).pow(2).mean()
        if self.repa_coeff:
            z = feats.patches  # type: ignore[union-attr]
            if self.reg:
                z = torch.cat([feats.cls[:, None], z], dim=1)  # type: ignore[union-attr]
            if z.shape[1] != out.repa.shape[1]:
                raise ValueError(
                    f"REPA: the encoder gives {z.shape[1]} tokens but the network has {out.repa.shape[1]} "
                    f"(REG + patch) tokens; match the encoder resolution to the patch grid"
                )
            losses["loss_repa"] = self.repa_coeff * (out.repa.float() - z.float()).pow(2).mean()
        if self.perceptual is not None:
            perc = self.perceptual(raw, x, t)  # raw = the predicted clean image (x-prediction)
            losses.update({f"loss_{k}": v for k, v in perc.items() if k != "total"})
            losses["loss_perceptual"] = perc["total"]
        total = sum(v for k, v in losses.items() if k in ("loss_fm", "loss_reg", "loss_repa", "loss_perceptual"))
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}}
