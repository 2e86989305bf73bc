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

State = Tensor | tuple[Tensor, ...]  # one latent, or (latent, REG token) integrated jointly (§4.4)
VelocityFn = Callable[[State, float], State]


def _map(fn: Callable[..., Tensor], *states: State) -> State:
    """Apply ``fn`` leaf-wise to states that are tensors or tuples of tensors."""
    if isinstance(states[0], tuple):
        return tuple(fn(*leaves) for leaves in zip(*states, strict=True))
    return fn(*states)


def _step(x: State, h: float, d: State) -> State:
    """x - h d, leaf-wise."""
    return _map(lambda a, b: a - h * b, x, d)


def _batch(x: State) -> Tensor:
    return x[0] if isinstance(x, tuple) else x


def time_grid(num_steps: int, shift: float = 1.0) -> list[float]:
    """t_i = s tau_i / (1 + (s - 1) tau_i) with tau = linspace(1, 0, N + 1) (§5.1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    taus = [1 - i / num_steps for i in range(num_steps + 1)]
    return [shift * tau / (1 + (shift - 1) * tau) for tau in taus]


def euler(v: VelocityFn, x: State, grid: list[float], progress: Callable[[], None] | None = None) -> State:
    """x <- x - (t_i - t_{i+1}) v(x, t_i); the reference's only solver."""
    for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
        h = t_cur - t_next
        x = _step(x, h, v(x, t_cur))
        if progress is not None:
            progress()
    return x


def heun(v: VelocityFn, x: State, grid: list[float], progress: Callable[[], None] | None = None) -> State:
    """Second-order Heun (trapezoid) steps; the last step (to t = 0) is plain Euler, as in EDM / JiT."""
    for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
        h = t_cur - t_next
        d_cur = v(x, t_cur)
        x_euler = _step(x, h, d_cur)
        if t_next == 0:
            x = x_euler
        else:
            d_next = v(x_euler, t_next)
            x = _step(x, h, _map(lambda d1, d2: 0.5 * (d1 + d2), d_cur, d_next))
        if progress is not None:
            progress()
    return x


SOLVERS = {"euler": euler, "heun": heun}


def conditional(velocity: Callable[[State, Tensor, Cond], State], cond: Cond) -> VelocityFn:
    """Bind a condition: v(x, t_float) -> velocity(x, t_batch, cond)."""

    def fn(x: State, t: float) -> State:
        b = _batch(x)
        return velocity(x, torch.full((b.shape[0],), t, device=b.device, dtype=torch.float32), cond)

    return fn


def classifier_free(
    velocity: Callable[[State, Tensor, Cond], State],
    cond: Cond,
    null: Cond,
    scale: float,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> VelocityFn:
    """CFG with an interval (§5.2): o = o_u + w (o_c - o_u) for t in [t_min, t_max], else o_c.

    Applied to the velocity, which is linear in the raw output, so it equals guiding the raw v or x output.
    Outside the interval only the conditional half is run (the reference runs both and discards one; §8.3 of
    performance.md). Both halves share the same noise x. A REG token is guided like the image (§5.2).
    The interval test is on the host-side float t, so it costs no device sync.
    """
    if scale == 1.0:
        return conditional(velocity, cond)
    both = cond.cat(null)

    def fn(x: State, t: float) -> State:
        b = _batch(x)
        tb = torch.full((b.shape[0],), t, device=b.device, dtype=torch.float32)
        if not (t_min <= t <= t_max):
            return velocity(x, tb, cond)
        out = velocity(_map(lambda a: torch.cat([a, a]), x), torch.cat([tb, tb]), both)
        return _map(lambda o: (lambda c, u: u + scale * (c - u))(*o.chunk(2)), out)

    return fn


def sample(
    v: VelocityFn,
    noise: State,
    num_steps: int,
    shift: float = 1.0,
    solver: str = "euler",
    progress: Callable[[], None] | None = None,
) -> State:
    return SOLVERS[solver](v, noise, time_grid(num_steps, shift), progress)
