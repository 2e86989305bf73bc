"""MeanFlow: a two-time average-velocity objective and its few-step sampler (spec ``reference.md`` §4.6).

Convention (§4.2): t = 0 is data, t = 1 is noise, z_t = (1 - t) x + t eps, instantaneous velocity v = eps - x.
The network predicts the *average* velocity over [r, t],

    u(z_t, r, t) = 1/(t - r) * integral_r^t v(z_s, s) ds,   so   z_r = z_t - (t - r) u(z_t, r, t),

and is called as ``net(z, h, cond, mask, t_abs=t)``: the main time input is the interval h = t - r and a second
time embedder sees the absolute t (§3.2). At h = 0 it is the instantaneous velocity.

Training (§4.6), one branch per *step* (not per sample):

- FM branch (probability ``fm_ratio``): t from the time distribution with the resolution shift (§4.1), a
  forward at h = 0, per-sample loss sum_{C,H,W} (u - sg(v_g))^2.
- MF branch: t, r drawn independently, t = max, r = min, then both shifted. The MeanFlow identity
  u = v - (t - r) du/dt, with the total derivative d/dt along the path (dz/dt = v_g, dt/dt = 1, dr/dt = 0),
  is trained as V = u + (t - r) sg(du/dt) against sg(v_g); du/dt is one ``torch.func.jvp`` with tangents
  (v_g, 1, 0), i.e. dh/dt = 1 and dt_abs/dt = 1. Forward-mode AD through attention needs the MATH SDPA kernel;
  it is forced for the JVP call only (``performance.md`` §8 item 7), so the other forwards keep fast kernels.
- Guided target v_g (CFG distillation in MeanFlow's omega/kappa form): off when omega = 1 and kappa = 0;
  otherwise no-grad forwards at h = 0 give u_null and (kappa != 0) u_c, and
  v_g = omega v + (1 - omega - kappa) u_null + kappa u_c (for kappa = 0: u_null + omega (v - u_null)), only for
  t in [cfg_t_start, cfg_t_end] and never for CFG-dropped samples (they keep v).
- Adaptive weighting: L_i / (sg(L_i) + norm_eps)^norm_p, then the batch mean.

Cost (``performance.md`` §2.1): the JVP is about forward + tangent, and with kappa != 0 every step adds two
no-grad forwards (run here as one doubled batch), about 1.75x a plain flow-matching step at fm_ratio 0.75.

Branch schedule RNG: a ``random.Random(seed)`` drawn once per step. It consumes no torch randomness and every rank
holds the same one, so all ranks take the same branch: the branches differ ~2x in cost, and a per-rank choice
would leave fast ranks waiting at the gradient all-reduce every step. The reference does not
checkpoint it (§1.4: a resumed run restarts the schedule from seed 42); here it is part of the objective's
``state_dict`` through ``get_extra_state`` / ``set_extra_state`` and reachable via ``branch_rng_state`` /
``set_branch_rng_state``, so a restored objective continues the exact FM/MF sequence.

Sampling (§4.6, §5.1): on the shifted grid t_0 = 1 > ... > t_N = 0, z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) u;
one step is x_0 = eps - u(eps, h = 1, t_abs = 1). Guidance is never applied at sampling time (it is distilled).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanogen.conditioning import Cond
from nanogen.errors import ConfigError
from nanogen.objectives.flow import LogitNormal, shift_time
from nanogen.sampling import time_grid

AverageVelocityFn = Callable[[Tensor, float, float], Tensor]


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) so it broadcasts against ``like``."""
    return t.view(-1, *([1] * (like.ndim - 1)))


def _wide(a: Tensor) -> Tensor:
    """At least float32 (bf16 network outputs are summed over C*H*W elements), float64 stays float64."""
    return a.to(torch.promote_types(a.dtype, torch.float32))


def adaptive_weighted_mean(per_sample: Tensor, norm_p: float, norm_eps: float) -> Tensor:
    """mean_i L_i / (sg(L_i) + eps)^p (§4.6). With p = 1 every sample contributes ~1 to the value and its gradient
    is the gradient of L_i scaled by 1/(L_i + eps): a robust (log-like) loss that keeps large-error samples from
    dominating."""
    weight = (per_sample.detach() + norm_eps).pow(norm_p)
    return (per_sample / weight).mean()


class MeanFlowObjective(nn.Module):
    """Wraps a MeanFlow network (built with ``is_meanflow=True``); ``forward`` is the training loss (§4.6).

    ``forward`` returns ``loss`` (adaptively weighted, with gradient), and detached ``orig_mf_loss`` (mean of the
    pre-weighting per-sample losses), ``dudt_norm`` (mean over samples of ||du/dt||_2; 0 on FM steps) and
    ``branch`` (0. for FM, 1. for MF).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        prediction: str = "velocity",
        time_dist: LogitNormal = LogitNormal(),
        shift: float = 1.0,
        cfg_dropout_prob: float = 0.1,
        fm_ratio: float = 0.75,
        norm_p: float = 1.0,
        norm_eps: float = 0.01,
        cfg_omega: float = 1.0,
        cfg_kappa: float = 0.5,
        cfg_t_start: float = 0.0,
        cfg_t_end: float = 1.0,
        seed: int = 42,
    ):
        super().__init__()
        if prediction != "velocity":
            # The network output *is* the average velocity u; an x-prediction has no h-dependent meaning here and
            # the reference's TransportMF supports only v-prediction.
            raise ConfigError(
                f"transport.prediction must be 'velocity' with transport.meanflow (the network predicts the "
                f"average velocity u), got '{prediction}'"
            )
        if not 0.0 <= fm_ratio <= 1.0:
            raise ConfigError(f"transport.meanflow.fm_ratio must be in [0, 1], got {fm_ratio}")
        if norm_eps <= 0 and norm_p != 0:
            raise ConfigError(
                f"transport.meanflow.norm_eps must be > 0 (it bounds the weight 1/L^p), got {norm_eps}"
            )
        self.net = net
        self.prediction = prediction
        self.time_dist = time_dist
        self.shift = shift
        self.cfg_dropout_prob = cfg_dropout_prob
        self.fm_ratio = fm_ratio
        self.norm_p = norm_p
        self.norm_eps = norm_eps
        self.cfg_omega = cfg_omega
        self.cfg_kappa = cfg_kappa
        self.cfg_t_start = cfg_t_start
        self.cfg_t_end = cfg_t_end
        self.seed = seed
        self._branch_rng = random.Random(seed)

    # ------------------------------------------------------------------------------------------------------
    # branch schedule

    def next_branch_is_mf(self) -> bool:
        """One draw of the per-step schedule: False = FM branch (probability fm_ratio), True = MF branch."""
        return not (self._branch_rng.random() < self.fm_ratio)

    def branch_rng_state(self) -> dict:
        """The schedule RNG's state as plain Python data (safe for ``torch.load(weights_only=True)``)."""
        version, internal, gauss = self._branch_rng.getstate()
        return {"seed": self.seed, "version": version, "internal": list(internal), "gauss_next": gauss}

    def set_branch_rng_state(self, state: dict) -> None:
        self._branch_rng.setstate((state["version"], tuple(state["internal"]), state["gauss_next"]))

    def get_extra_state(self) -> dict:
        # Carried in state_dict() so a checkpoint of the objective resumes the FM/MF sequence exactly (the
        # reference restarts it from the seed on resume; §1.4).
        return {"branch_rng": self.branch_rng_state()}

    def set_extra_state(self, state: dict) -> None:
        self.set_branch_rng_state(state["branch_rng"])

    # ------------------------------------------------------------------------------------------------------
    # time sampling (§4.1)

    def sample_t(self, n: int, device: torch.device | str) -> Tensor:
        """FM branch: t ~ time_dist, then the resolution shift."""
        return shift_time(self.time_dist.sample(n, device), self.shift)  # type: ignore[return-value]

    def sample_t_r(self, n: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """MF branch: two independent draws, t = max and r = min, *then* the shift (monotone, so r <= t holds)."""
        a = self.time_dist.sample(n, device)
        b = self.time_dist.sample(n, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        return shift_time(t, self.shift), shift_time(r, self.shift)  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------------------
    # the network

    def average_velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Cond) -> Tensor:
        """u(x_t, r, t) = net(x_t, h = t - r, cond, t_abs = t); t, r: (B,)."""
        return self.net(x_t, t - r, cond.value, cond.mask, t_abs=t)

    def average_velocity_jvp(
        self, z_t: Tensor, t: Tensor, r: Tensor, v: Tensor, cond: Cond
    ) -> tuple[Tensor, Tensor]:
        """(u, du/dt): u and its total derivative along (dz/dt, dt/dt, dr/dt) = (v, 1, 0) (§4.6).

        ``u`` keeps its autograd graph to the parameters. Only this call runs under the MATH SDPA kernel
        (fused attention kernels have no forward-mode AD rule).
        """

        def u_fn(z: Tensor, t_: Tensor, r_: Tensor) -> Tensor:
            return self.average_velocity(z, t_, r_, cond)

        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(u_fn, (z_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))

    @property
    def guidance_on(self) -> bool:
        return not (self.cfg_omega == 1.0 and self.cfg_kappa == 0.0)

    @torch.no_grad()
    def guided_velocity(
        self, x_t: Tensor, t: Tensor, v: Tensor, cond: Cond, null: Cond, drop: Tensor
    ) -> Tensor:
        """The guided target v_g (§4.6); ``cond`` is the (possibly dropped) batch condition, ``drop`` (B,) bool.

        v_g = omega v + (1 - omega - kappa) u_null + kappa u_c, with u at h = 0 (t_abs = t); for kappa = 0 this is
        u_null + omega (v - u_null) and u_c is not computed. Samples with t outside [cfg_t_start, cfg_t_end] or a
        dropped condition keep the plain v.
        """
        if not self.guidance_on:
            return v
        B = x_t.shape[0]
        null_b = cond.where(torch.ones(B, dtype=torch.bool, device=x_t.device), null)  # null at batch size B
        zero = torch.zeros_like(t)
        if self.cfg_kappa == 0.0:
            u_null = self.average_velocity(x_t, t, t, null_b).to(v.dtype)
            guided = u_null + self.cfg_omega * (v - u_null)
        else:
            # One doubled forward instead of two: same math, one launch sequence.
            both = cond.cat(null_b)
            u = self.net(
                torch.cat([x_t, x_t]), torch.cat([zero, zero]), both.value, both.mask, t_abs=torch.cat([t, t])
            )
            u_c, u_null = u.to(v.dtype).chunk(2)
            guided = (
                self.cfg_omega * v + (1 - self.cfg_omega - self.cfg_kappa) * u_null + self.cfg_kappa * u_c
            )
        apply = (t >= self.cfg_t_start) & (t <= self.cfg_t_end) & ~drop
        return torch.where(_per_sample(apply, v), guided, v)

    # ------------------------------------------------------------------------------------------------------
    # the loss

    def compute_loss(
        self, x: Tensor, eps: Tensor, t: Tensor, r: Tensor | None, cond: Cond, null: Cond, drop: Tensor
    ) -> dict[str, Tensor]:
        """The §4.6 loss for given draws: ``r is None`` selects the FM branch, else the MF branch with r <= t.

        ``cond`` is the batch condition *before* CFG dropout; ``drop`` (B,) bool says which samples get ``null``.
        """
        cond = cond.where(drop, null)
        tb = _per_sample(t, x)
        x_t = (1 - tb) * x + tb * eps
        # dz_t/dt exactly: it is also the JVP tangent, so the §4.2 t_eps damping of the plain-flow target (a quirk
        # of FlowObjective kept for checkpoint parity) would make the tangent disagree with the path.
        v = eps - x
        v_g = self.guided_velocity(x_t, t, v, cond, null, drop).detach()
        if r is None:
            u = self.average_velocity(x_t, t, t, cond)  # h = 0: instantaneous velocity
            pred = _wide(u)
            dudt_norm = torch.zeros((), device=x.device)
        else:
            u, dudt = self.average_velocity_jvp(x_t, t, r, v_g, cond)
            dudt = _wide(dudt.detach())
            pred = _wide(u) + _wide(_per_sample(t - r, x)) * dudt
            dudt_norm = dudt.flatten(1).norm(dim=1).mean()
        per_sample = (pred - _wide(v_g)).pow(2).flatten(1).sum(dim=1)
        loss = adaptive_weighted_mean(per_sample, self.norm_p, self.norm_eps)
        return {
            "loss": loss,
            "orig_mf_loss": per_sample.detach().mean(),
            # the adaptively weighted loss is ~1 by construction; progress shows in the unweighted one
            "report_loss": per_sample.detach().mean(),
            "dudt_norm": dudt_norm.detach(),
            "branch": torch.full((), 0.0 if r is None else 1.0, device=x.device),
        }

    def forward(self, x: Tensor, cond: Cond, null: Cond, images: Tensor | None = None) -> dict[str, Tensor]:
        """x: clean latents (B, C, H, W); cond: the batch's conditions; null: the null condition (batch 1 or B).
        ``images`` is accepted for the trainer's uniform call and unused (MeanFlow reads no frozen encoder)."""
        B = x.shape[0]
        mf = self.next_branch_is_mf()  # host-side Python draw: no device sync, identical on all ranks
        # float64 inputs keep float64 times; anything narrower uses float32 times, as FlowObjective does
        tdtype = torch.promote_types(x.dtype, torch.float32)
        if mf:
            t, r = self.sample_t_r(B, x.device)
            t, r = t.to(tdtype), r.to(tdtype)
        else:
            t, r = self.sample_t(B, x.device).to(tdtype), None
        # drawn in logical (row-major) order, not x's memory layout: the same latents give the same noise
        # whether they come channels-last from a VAE encoder or contiguous from extracted shards
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype)
        drop = torch.rand(B, device=x.device) < self.cfg_dropout_prob
        return self.compute_loss(x, eps, t, r, cond, null, drop)


# ----------------------------------------------------------------------------------------------------------
# sampling (§4.6, §5.1)


def meanflow_sample(
    u_fn: AverageVelocityFn,
    noise: Tensor,
    num_steps: int,
    shift: float = 1.0,
    progress: Callable[[], None] | None = None,
) -> Tensor:
    """Integrate from t = 1 (noise) to t = 0 with average-velocity jumps over the shifted grid (§5.1).

    ``u_fn(x, t, r)`` (t, r Python floats, r < t) returns the average velocity; each step is
    x_r = x_t - (t - r) u(x_t, t, r). One step is x_0 = eps - u(eps, 1, 0), i.e. h = 1, t_abs = 1. The grid is
    built on the host, so the loop never syncs with the device.
    """
    x = noise
    grid = time_grid(num_steps, shift)
    for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
        x = x - (t_cur - t_next) * u_fn(x, t_cur, t_next)
        if progress is not None:
            progress()
    return x


def bind(objective: MeanFlowObjective, cond: Cond) -> AverageVelocityFn:
    """u_fn(x, t, r) for ``meanflow_sample``: floats become (B,) float32 tensors; the condition is closed over.
    No guidance: MeanFlow distils it into the network at training time (§4.6)."""

    def fn(x: Tensor, t: float, r: float) -> Tensor:
        n = x.shape[0]
        tb = torch.full((n,), t, device=x.device, dtype=torch.float32)
        rb = torch.full((n,), r, device=x.device, dtype=torch.float32)
        return objective.average_velocity(x, tb, rb, cond)

    return fn
