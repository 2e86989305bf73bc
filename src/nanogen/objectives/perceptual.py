"""PixelGen perceptual losses on the predicted clean image (spec ``reference.md`` §4.7).

Config (§2.3)::

    perceptual_loss:
      encoders: "lpips,dinov2-vit-b"     # comma list; empty = off
      percep_loss_weights: [0.1, 0.01]   # one weight per name, in the comma order
    transport:
      percep_loss_t_thresh: 0.7

Terms, each a per-sample value ``L_k`` of shape (B,) for images x_hat (prediction) and x (ground truth) in
[-1, 1]:
- ``lpips``: LPIPS-VGG16 (``nanogen.models.lpips``), spatially averaged per sample;
- any other name is a frozen representation encoder ("P-DINO" for ``dinov2-vit-b``): the MSE over tokens and
  dims between ``enc(x_hat).patches`` and ``enc(x).patches`` (target side under no_grad).

Gating: only samples with ``t < t_thresh`` (the low-noise ones, t = 0 is data) contribute; the masked values
are averaged over the FULL batch: ``total = sum_k w_k * mean_b(mask_b * L_k[b])``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from nanogen.errors import ConfigError

LPIPS_NAME = "lpips"


class PatchFeatureLoss(nn.Module):
    """Per-sample MSE between a frozen encoder's patch tokens of the prediction and of the target.

    ``encoder(images in [-1, 1])`` must return an object with ``.patches`` (B, T, D). The encoder is frozen
    here (``requires_grad`` False, eval mode) if it was not already. Gradients flow to ``x_hat`` only; the
    target's features are computed under no_grad."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.encoder = encoder.eval()

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        with torch.no_grad():
            target = self.encoder(x).patches
        pred = self.encoder(x_hat).patches
        if pred.ndim != 3 or pred.shape != target.shape:
            raise ValueError(
                f"perceptual encoder: patch tokens must be (B, T, D) and equal in shape, got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        return (pred.float() - target.float()).pow(2).mean(dim=(1, 2))


class PerceptualLoss(nn.Module):
    """Weighted, t-gated sum of perceptual terms.

    ``terms``: (name, weight, module) triples. For ``name == "lpips"`` the module is used as is:
    ``module(x_hat, x) -> (B,)`` (an ``LPIPS``). For any other name the module is a frozen encoder (its call
    returns ``.patches``) and is wrapped in ``PatchFeatureLoss``, unless it already is one.

    ``forward(x_hat, x, t)`` returns ``{name: mean_b(mask * L_name), ..., "total": sum_k w_k * (that)}``: the
    per-term values are unweighted (directly comparable with the metric), the total is weighted. ``mask`` is
    ``t < t_thresh`` per sample and the means run over the full batch.

    ``skip_gated`` (default True) evaluates the terms only on the samples with ``t < t_thresh``: the same
    value and gradient as the reference's multiply-by-mask of a full-batch evaluation (every term is
    per-sample), at a fraction of the cost, but with a data-dependent batch size (one host sync per step).
    Set it False for the literal full-batch computation (fixed shapes, e.g. for CUDA graphs).
    """

    def __init__(
        self, terms: Sequence[tuple[str, float, nn.Module]], t_thresh: float = 0.7, skip_gated: bool = True
    ):
        super().__init__()
        validate_terms([(name, w) for name, w, _ in terms])
        if (
            not isinstance(t_thresh, (int, float))
            or isinstance(t_thresh, bool)
            or not math.isfinite(t_thresh)
        ):
            raise ConfigError(f"transport.percep_loss_t_thresh must be a finite number, got {t_thresh!r}")
        self.names = [name for name, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        mods = []
        for name, _, module in terms:
            if name != LPIPS_NAME and not isinstance(module, PatchFeatureLoss):
                module = PatchFeatureLoss(module)
            mods.append(module)
        self.terms = nn.ModuleList(mods)
        self.t_thresh = float(t_thresh)
        self.skip_gated = skip_gated

    def forward(self, x_hat: Tensor, x: Tensor, t: Tensor) -> dict[str, Tensor]:
        B = x_hat.shape[0]
        if x.shape != x_hat.shape:
            raise ValueError(
                f"perceptual loss: x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)} differ in shape"
            )
        t = t.reshape(-1)
        if t.numel() != B:
            raise ValueError(f"perceptual loss: t has {t.numel()} values for a batch of {B}")
        mask = (t < self.t_thresh).float()
        out: dict[str, Tensor] = {}
        if self.skip_gated:
            idx = mask.nonzero().squeeze(1)
            for name, term in zip(self.names, self.terms, strict=True):
                if idx.numel() == 0:
                    out[name] = torch.zeros((), device=x_hat.device)
                else:
                    out[name] = term(x_hat[idx], x[idx]).float().sum() / B
        else:
            for name, term in zip(self.names, self.terms, strict=True):
                out[name] = (mask * term(x_hat, x).float()).mean()
        total = torch.zeros((), device=x_hat.device)
        for name, w in zip(self.names, self.weights, strict=True):
            total = total + w * out[name]
        out["total"] = total
        return out


def validate_terms(pairs: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    seen: set[str] = set()
    out = []
    for name, w in pairs:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                "perceptual_loss.encoders: empty name in the list (write e.g. 'lpips,dinov2-vit-b')"
            )
        if name in seen:
            raise ConfigError(f"perceptual_loss.encoders: '{name}' is listed twice")
        seen.add(name)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(
                f"perceptual_loss.percep_loss_weights: the weight of '{name}' must be a number, got {w!r}"
            )
        if not math.isfinite(w) or w < 0:
            raise ConfigError(
                f"perceptual_loss.percep_loss_weights: the weight of '{name}' must be finite and >= 0, got {w}"
            )
        out.append((name, float(w)))
    return out


def parse_perceptual(encoders: str | None, weights: Sequence[float] | None) -> list[tuple[str, float]]:
    """``perceptual_loss.encoders`` ("lpips,dinov2-vit-b") + ``percep_loss_weights`` ([0.1, 0.01]) ->
    ``[("lpips", 0.1), ("dinov2-vit-b", 0.01)]``. An empty string (or None) means off and gives []."""
    weights = list(weights or [])
    text = (encoders or "").strip()
    names = [n.strip() for n in text.split(",")] if text else []
    if len(names) != len(weights):
        raise ConfigError(
            f"perceptual_loss: {len(names)} encoder name(s) ({text!r}) but {len(weights)} weight(s) in "
            f"percep_loss_weights {weights}; give one weight per name, in the same order"
        )
    return validate_terms(list(zip(names, weights, strict=True)))


def build_perceptual(
    spec: str | None,
    weights: Sequence[float] | None,
    t_thresh: float,
    encoder_factory: Callable[[str], nn.Module],
    lpips_factory: Callable[[], nn.Module],
    skip_gated: bool = True,
) -> PerceptualLoss | None:
    """The ``PerceptualLoss`` of a config, or None when ``spec`` is empty (off). ``lpips_factory()`` gives the
    LPIPS module (e.g. ``nanogen.models.lpips.load_lpips``), ``encoder_factory(name)`` a frozen encoder
    (e.g. ``nanogen.encoders.build_encoder``); each is called once per listed name."""
    pairs = parse_perceptual(spec, weights)
    if not pairs:
        return None
    terms = [(name, w, lpips_factory() if name == LPIPS_NAME else encoder_factory(name)) for name, w in pairs]
    return PerceptualLoss(terms, t_thresh, skip_gated=skip_gated)
