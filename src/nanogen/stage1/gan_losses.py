"""GAN losses of stage-1 training (reference §6.7, config §2.2 ``gan.loss``).

All logits are any-shape tensors (the DINO discriminator gives ``(B, 5 · tokens)``); means are over all elements.

* hinge D loss:   ``½ [mean relu(1 − D(real)) + mean relu(1 + D(fake))]``
* vanilla D loss: ``½ [mean softplus(−D(real)) + mean softplus(D(fake))]``
* G loss: ``−mean D(fake)`` for both ``hinge`` and ``vanilla`` -- §6.7 states ``L_gan = −mean(D(aug(2x̂−1)))`` with
  the stage-1 configs' ``gen_loss: vanilla``, so that is what the reference's "vanilla" generator computes.
  ``non-saturating`` (``mean softplus(−D(fake))``, the textbook non-saturating loss) is offered as a nanogen extra.
* adaptive weight: ``λ = clamp(‖∇_W L_rec‖ / (‖∇_W L_gan‖ + 1e-6), 0, max_d_weight)``, detached (Frobenius norms over
  the whole parameter ``W``, the decoder's last layer weight).
* 8-bit quantisation of fakes for the D step: ``round((clamp(x, −1, 1) + 1) · 127.5) / 127.5 − 1`` (round half to
  even, torch.round), without gradient.
* D accuracy: ``mean(D(real) > D(fake))`` elementwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "adaptive_weight",
    "disc_accuracy",
    "disc_loss",
    "gen_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "quantize_8bit",
    "vanilla_d_loss",
    "vanilla_g_loss",
]


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def vanilla_g_loss(logits_fake: Tensor) -> Tensor:
    """The reference's generator loss under ``gen_loss: vanilla`` (§6.7): ``−mean D(fake)``."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    return F.softplus(-logits_fake).mean()


_D = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
_G = {"hinge": hinge_g_loss, "vanilla": vanilla_g_loss, "non-saturating": non_saturating_g_loss}


def disc_loss(kind: str, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss by name (``gan.loss.disc_loss``: ``hinge`` | ``vanilla``)."""
    try:
        return _D[kind](logits_real, logits_fake)
    except KeyError:
        raise ValueError(f"unknown disc_loss {kind!r}; expected one of {sorted(_D)}") from None


def gen_loss(kind: str, logits_fake: Tensor) -> Tensor:
    """Generator adversarial loss by name (``gan.loss.gen_loss``: ``hinge`` | ``vanilla``)."""
    try:
        return _G[kind](logits_fake)
    except KeyError:
        raise ValueError(f"unknown gen_loss {kind!r}; expected one of {sorted(_G)}") from None


def adaptive_weight(
    rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_d_weight: float = 1e4, eps: float = 1e-6
) -> Tensor:
    """``clamp(‖∇_W rec‖ / (‖∇_W gan‖ + eps), 0, max_d_weight)``, detached; keeps both graphs (retain_graph)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    w = torch.linalg.vector_norm(g_rec) / (torch.linalg.vector_norm(g_gan) + eps)
    return w.clamp(0.0, max_d_weight).detach()


@torch.no_grad()
def quantize_8bit(x: Tensor) -> Tensor:
    """Clamp to [-1, 1] and snap to the 256 8-bit levels: ``round((x + 1) · 127.5) / 127.5 − 1``."""
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


@torch.no_grad()
def disc_accuracy(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``mean(D(real) > D(fake))`` as a float scalar."""
    return (logits_real > logits_fake).float().mean()
