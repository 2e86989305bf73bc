"""Do ImageNet rankings predict text-to-image rankings? Pearson, Spearman and Kendall tau-b between every
ImageNet metric and every T2I metric, over the methods that have both values.

The coefficients are computed here with numpy (equal to ``scipy.stats.pearsonr``, ``spearmanr`` and
``kendalltau(variant="b")``; tests compare them). They are **raw**: FID is lower-better while GenEval is
higher-better, so a *negative* FID-vs-GenEval coefficient means the two axes agree. ``Pair.agree_sign`` says
which sign means agreement for each pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nanogen.errors import UserError
from nanogen.leaderboard.results import (
    CATEGORIES,
    FAMILIES,
    MODES,
    Result,
    categories,
    metric_info,
    metric_order,
    table,
)

MIN_METHODS = 3
SUBSETS = ("all", "latent-space", "improved-latent", "traditional-latent", "pixel-space", "one-few-step", "reference")
_SUBSET_ALIASES = {"one-/few-step": "one-few-step", "one-step": "one-few-step", "few-step": "one-few-step",
                   "latent": "latent-space", "pixel": "pixel-space"}  # fmt: skip


def _vectors(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"need two 1-D sequences of the same length, got shapes {a.shape} and {b.shape}")
    return a, b


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; NaN when either vector is constant or shorter than 2."""
    a, b = _vectors(x, y)
    if a.size < 2:
        return float("nan")
    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)  # scaled internally: no under- or overflow
    if not (np.isfinite(na) and np.isfinite(nb)) or na == 0 or nb == 0:
        return float("nan")
    a, b = a / na, b / nb
    return float(np.clip((a * b).sum(), -1.0, 1.0))


def rank(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given the average of the ranks they span (``scipy.stats.rankdata(method="average")``)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], a.size]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    out = np.empty(a.size)
    out[order] = np.repeat(avg, ends - starts)
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    a, b = _vectors(x, y)
    return pearson(rank(a), rank(b))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((pairs untied in x) (pairs untied in y))."""
    a, b = _vectors(x, y)
    if a.size < 2:
        return float("nan")
    sx = np.sign(a[:, None] - a[None, :])
    sy = np.sign(b[:, None] - b[None, :])
    # every pair counted twice on each side: the factors cancel
    num = (sx * sy).sum()
    den = np.sqrt((sx * sx).sum() * (sy * sy).sum())
    if den == 0:
        return float("nan")
    return float(np.clip(num / den, -1.0, 1.0))


@dataclass
class Pair:
    """The correlation of one ImageNet metric with one T2I metric over ``methods``."""

    imagenet_metric: str
    t2i_metric: str
    methods: list[str]
    pearson: float | None = None
    spearman: float | None = None
    kendall: float | None = None
    reason: str | None = None  # why there is no coefficient

    @property
    def n(self) -> int:
        return len(self.methods)

    @property
    def agree_sign(self) -> int:
        """+1 when a positive coefficient means the axes agree (both metrics better in the same direction)."""
        same = metric_info(self.imagenet_metric).better == metric_info(self.t2i_metric).better
        return 1 if same else -1


@dataclass
class Report:
    subset: str
    guidance: str
    methods: list[str]  # the subset's methods that have any value on either axis
    pairs: list[Pair] = field(default_factory=list)
    reason: str | None = None  # why there are no pairs at all


def resolve_subset(results: list[Result], subset: str | Sequence[str]) -> tuple[str, list[str]]:
    """A subset name (a category or family, or "all") or an explicit method list -> (label, methods)."""
    cats = categories(results)
    if isinstance(subset, str):
        name = _SUBSET_ALIASES.get(subset.strip().lower(), subset.strip().lower())
        if name == "all":
            return "all", list(cats)
        if name in CATEGORIES:
            return name, [m for m, (c, _) in cats.items() if c == name]
        if name in FAMILIES:
            return name, [m for m, (_, f) in cats.items() if f == name]
        raise UserError(f"unknown subset '{subset}' (choose one of {', '.join(SUBSETS)}, or list methods: A,B,C)")
    wanted = [s.strip() for s in subset if s.strip()]
    unknown = [m for m in wanted if m not in cats]
    if unknown:
        known = ", ".join(list(cats)[:12]) + (", ..." if len(cats) > 12 else "")
        raise UserError(f"subset: unknown method(s) {', '.join(map(repr, unknown))} (known: {known})")
    return ",".join(wanted), list(dict.fromkeys(wanted))


def correlate(results: list[Result], subset: str | Sequence[str] = "all", guidance: str = "with") -> Report:
    """Pearson, Spearman and Kendall tau-b for every (ImageNet metric, T2I metric) pair over the methods of
    ``subset`` that have both values in the ``guidance`` setting ("with" or "without" CFG). A pair with fewer
    than three such methods gets no coefficients and a reason."""
    if guidance not in MODES:
        raise UserError(f"guidance must be one of {', '.join(MODES)}, not '{guidance}'")
    label, methods = resolve_subset(results, subset)
    im, t2i = table(results, "imagenet", guidance), table(results, "t2i", guidance)
    chosen = set(methods)
    present = [m for m in methods if m in im or m in t2i]
    report = Report(label, guidance, present)
    im_metrics = metric_order({k for m, row in im.items() if m in chosen for k, v in row.metrics.items() if v is not None})
    t2i_metrics = metric_order({k for m, row in t2i.items() if m in chosen for k, v in row.metrics.items() if v is not None})
    if not im_metrics or not t2i_metrics:
        missing = " and ".join(a for a, ms in (("ImageNet", im_metrics), ("T2I", t2i_metrics)) if not ms)
        report.reason = f"no {missing} results {guidance} CFG for the methods of subset '{label}'"
        return report
    for a in im_metrics:
        for b in t2i_metrics:
            both = [m for m in methods if m in im and m in t2i and im[m].get(a) is not None and t2i[m].get(b) is not None]
            pair = Pair(a, b, both)
            if len(both) < MIN_METHODS:
                pair.reason = (f"only {len(both)} method{'s' * (len(both) != 1)} of subset '{label}' "
                               f"{'has' if len(both) == 1 else 'have'} both {metric_info(a).label} and "
                               f"{metric_info(b).label} {guidance} CFG (need at least {MIN_METHODS})")  # fmt: skip
            else:
                x = [im[m].get(a) for m in both]
                y = [t2i[m].get(b) for m in both]
                values = pearson(x, y), spearman(x, y), kendall_tau_b(x, y)
                if any(np.isnan(v) for v in values):
                    pair.reason = "constant values on one axis: the correlation is undefined"
                else:
                    pair.pearson, pair.spearman, pair.kendall = values
            report.pairs.append(pair)
    return report
