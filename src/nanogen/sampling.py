"""Samplers: pure functions over a precomputed time grid (spec ``reference.md`` §5).

A velocity function ``v(x, t)`` (t a Python float; conditioning closed over) is integrated from t = 1
(noise) to t = 0 (data). The grid lives on the host, so the loop has no device-to-host syncs. Guidance is
a wrapper that turns one velocity function into another.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nanogen.conditioning import Cond

VelocityFn = Callable[[Tensor, float], Tensor]


def time_grid(num_steps: int, shift: float = 1.0) -> list[float]:
    """t_i = s tau_i / (1 + (s - 1) tau_i) with tau = linspace(1, 0, N + 1) (§5.1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    taus = [1 - i / num_steps for i in range(num_steps + 1)]
    return [shift * tau / (1 + (shift - 1) * tau) for tau in taus]


def euler(v: VelocityFn, x: Tensor, grid: list[float], progress: Callable[[], None] | None = None) -> Tensor:
    """x <- x - (t_i - t_{i+1}) v(x, t_i); the reference's only solver."""
    for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
        x = x - (t_cur - t_next) * v(x, t_cur)
        if progress is not None:
            progress()
    return x


def heun(v: VelocityFn, x: Tensor, grid: list[float], progress: Callable[[], None] | None = None) -> Tensor:
    """Second-order Heun (trapezoid) steps; the last step (to t = 0) is plain Euler, as in EDM / JiT."""
    for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
        h = t_cur - t_next
        d_cur = v(x, t_cur)
        x_euler = x - h * d_cur
        x = x_euler if t_next == 0 else x - h * 0.5 * (d_cur + v(x_euler, t_next))
        if progress is not None:
            progress()
    return x


SOLVERS = {"euler": euler, "heun": heun}


def conditional(velocity: Callable[[Tensor, Tensor, Cond], Tensor], cond: Cond) -> VelocityFn:
    """Bind a condition: v(x, t_float) -> velocity(x, t_batch, cond)."""

    def fn(x: Tensor, t: float) -> Tensor:
        return velocity(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32), cond)

    return fn


def classifier_free(
    velocity: Callable[[Tensor, Tensor, Cond], Tensor],
    cond: Cond,
    null: Cond,
    scale: float,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> VelocityFn:
    """CFG with an interval (§5.2): o = o_u + w (o_c - o_u) for t in [t_min, t_max], else o_c.

    Applied to the velocity, which is linear in the raw output, so it equals guiding the raw v or x output.
    Outside the interval only the conditional half is run. Both halves share the same noise x.
    """
    if scale == 1.0:
        return conditional(velocity, cond)
    both = cond.cat(null)

    def fn(x: Tensor, t: float) -> Tensor:
        tb = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        if not (t_min <= t <= t_max):
            return velocity(x, tb, cond)
        out = velocity(torch.cat([x, x]), torch.cat([tb, tb]), both)
        o_c, o_u = out.chunk(2)
        return o_u + scale * (o_c - o_u)

    return fn


def sample(
    v: VelocityFn,
    noise: Tensor,
    num_steps: int,
    shift: float = 1.0,
    solver: str = "euler",
    progress: Callable[[], None] | None = None,
) -> Tensor:
    return SOLVERS[solver](v, noise, time_grid(num_steps, shift), progress)
