"""Conditions and their null versions (spec ``reference.md`` §3.1, §4.2).

A ``Cond`` is what the network's condition tokens are made from: class labels (B,) or text-encoder states
(B, L, C) with a key mask (B, L). The null condition (label ``num_classes``, or the encoding of "" for
text) drives classifier-free guidance: it replaces the condition with probability ``cfg_dropout_prob``
during training and forms the unconditional half of the batch when sampling with CFG.

A conditioner turns what the data gives (labels, or captions) into a ``Cond``: ``LabelConditioner`` here,
``TextConditioner`` in ``encoders/text.py``. Both are called as ``conditioner(batch_conditions, device)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Cond:
    value: Tensor  # labels (B,) int64, or text states (B, L, C)
    mask: Tensor | None = None  # (B, L) bool, True = real token; None = no padding anywhere

    def cat(self, other: Cond) -> Cond:
        if (self.mask is None) != (other.mask is None):
            a = self.mask if self.mask is not None else _ones_mask(self.value)
            b = other.mask if other.mask is not None else _ones_mask(other.value)
            return Cond(torch.cat([self.value, other.value]), torch.cat([a, b]))
        mask = None if self.mask is None else torch.cat([self.mask, other.mask])  # type: ignore[list-item]
        return Cond(torch.cat([self.value, other.value]), mask)

    def where(self, drop: Tensor, null: Cond) -> Cond:
        """Per sample: the null condition where ``drop`` is True, else this one."""
        d = drop.view(-1, *([1] * (self.value.ndim - 1)))
        value = torch.where(d, null.value.expand_as(self.value), self.value)
        if self.mask is None and null.mask is None:
            return Cond(value)
        mine = self.mask if self.mask is not None else _ones_mask(self.value)
        theirs = null.mask.expand_as(mine) if null.mask is not None else _ones_mask(self.value)
        return Cond(value, torch.where(drop[:, None], theirs, mine))


def _ones_mask(value: Tensor) -> Tensor:
    return torch.ones(value.shape[:2], dtype=torch.bool, device=value.device)


class LabelConditioner:
    """Class labels; the null label is index ``num_classes`` (the embedding table has num_classes + 1 rows)."""

    kind = "label"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, labels: Tensor, device: torch.device | str | None = None) -> Cond:
        if not isinstance(labels, Tensor):
            raise TypeError(f"a label-conditioned model needs class labels, got {type(labels).__name__}")
        return Cond(labels.long().to(device) if device is not None else labels.long())

    def null(self, batch: int, device: torch.device | str = "cpu") -> Cond:
        return Cond(torch.full((batch,), self.num_classes, dtype=torch.long, device=device))
