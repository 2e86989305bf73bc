"""MeanFlow (spec reference.md §4.6, §4.1, §5.1) against closed forms and independent computations."""

import math
import random

import pytest
import torch
from scipy import stats

from nanogen import sampling
from nanogen.conditioning import Cond
from nanogen.errors import ConfigError
from nanogen.models import layers
from nanogen.models.ddt import DDT, DDTConfig
from nanogen.objectives.flow import LogitNormal
from nanogen.objectives.meanflow import (
    MeanFlowObjective,
    adaptive_weighted_mean,
    bind,
    meanflow_sample,
)

NULL = 10  # the null label of the tiny nets (num_classes = 10)


@pytest.fixture
def true_float64(monkeypatch):
    """Make a ``.double()`` net float64 end to end.

    The shared layers compute RMSNorm, RoPE and the time features in float32 (``x.float()``), which *down*-casts
    float64 inputs; that rounding noise (~1e-7) swamps a central difference. Upcast-only stand-ins (same math)
    make the finite-difference checks meaningful; they change nothing for float32 nets.
    """

    def wide(x):
        return x.to(torch.promote_types(x.dtype, torch.float32))

    def rms_forward(self, x):
        xf = wide(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight

    def apply_rope(x, cos, sin):
        xf = wide(x)
        swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return (xf * cos + swapped * sin).to(x.dtype)

    def time_forward(self, t):
        proj = 2 * math.pi * wide(t)[:, None] * self.W[None, :]
        e = self.mlp(torch.cat([proj.sin(), proj.cos()], dim=-1).to(self.mlp[0].weight.dtype))[:, None]
        return self.learnable_tokens[None] + e, e

    monkeypatch.setattr(layers.RMSNorm, "forward", rms_forward)
    monkeypatch.setattr(layers, "apply_rope", apply_rope)
    monkeypatch.setattr(layers.TimeTokens, "forward", time_forward)


def tiny_ddt(seed: int = 0, dtype: torch.dtype = torch.float32) -> DDT:
    torch.manual_seed(seed)
    net = DDT(
        DDTConfig(
            input_size=8, in_channels=3, patch_size=2, hidden_size=[32, 32], depth=[1, 1], num_heads=[2, 2],
            num_classes=10, is_meanflow=True,
        )
    )  # fmt: skip
    # AdaLN-Zero and the final linear start at zero (u == 0, du/dt == 0): perturb them so the JVP is non-trivial.
    for name, p in net.named_parameters():
        if "adaln" in name or name.startswith("final_layer.linear"):
            torch.nn.init.normal_(p, std=0.1)
    return net.to(dtype)


class Affine(torch.nn.Module):
    """u = a(cond) x + b h + c t_abs with a(cond) = 1 + 0.1 * (sum of the condition's entries), per sample.

    A known function of every input, so guided targets and sampler calls have closed forms. Records (h, t_abs)
    as Python lists (works inside torch.func.jvp too).
    """

    def __init__(self, b: float = 0.7, c: float = -0.3):
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=torch.float64))
        self.calls: list[tuple[list[float], list[float]]] = []

    def coef(self, cond: torch.Tensor) -> torch.Tensor:
        return 1 + 0.1 * cond.double().reshape(cond.shape[0], -1).sum(1)

    def forward(self, x, h, cond, mask=None, *, t_abs=None):
        self.calls.append((h.tolist(), t_abs.tolist()))
        view = (-1,) + (1,) * (x.ndim - 1)
        return (self.coef(cond).view(view) * x + self.b * h.view(view) + self.c * t_abs.view(view)).to(
            x.dtype
        )


def objective(net, **kw) -> MeanFlowObjective:
    base = dict(cfg_dropout_prob=0.0, fm_ratio=0.75, cfg_omega=1.0, cfg_kappa=0.0)
    return MeanFlowObjective(net, **{**base, **kw})


def fd_dudt(net, z, t, r, v, y, delta=1e-6):
    """Central difference of net(z + d v, (t + d) - r, y, t_abs = t + d) in d: the total derivative along the
    path with dz/dt = v, dt/dt = 1, dr/dt = 0, built from the raw network call (not the objective)."""

    def u(d):
        td = t + d
        return net(z + d * v.view_as(z), td - r, y, None, t_abs=td)

    return (u(delta) - u(-delta)) / (2 * delta)


# --------------------------------------------------------------------------------------------------------------
# JVP and the loss


def test_jvp_matches_central_difference_float64(true_float64):
    net = tiny_ddt(dtype=torch.float64)
    obj = objective(net)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.35], dtype=torch.float64)
    r = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)  # includes h = 0
    y = torch.tensor([1, 4, 7])
    u, dudt = obj.average_velocity_jvp(z, t, r, v, Cond(y))
    torch.testing.assert_close(u, net(z, t - r, y, None, t_abs=t), rtol=1e-12, atol=1e-12)
    fd = fd_dudt(net, z, t, r, v, y)
    assert fd.norm() > 1e-2  # non-trivial derivative
    assert ((dudt - fd).norm() / fd.norm()).item() < 1e-4
    # both the interval h and the absolute time must move with t: dropping dt_abs/dt changes the answer
    fd_h_only = (
        net(z + 1e-6 * v, t + 1e-6 - r, y, None, t_abs=t) - net(z - 1e-6 * v, t - 1e-6 - r, y, None, t_abs=t)
    ) / 2e-6
    assert ((dudt - fd_h_only).norm() / fd.norm()).item() > 1e-3


def test_jvp_runs_under_math_sdpa_only_inside_the_jvp():
    """performance.md §8.7: MATH is forced for the JVP call, not for the guidance forwards."""
    flags = []

    class Probe(Affine):
        def forward(self, x, h, cond, mask=None, *, t_abs=None):
            flags.append(torch.backends.cuda.flash_sdp_enabled())
            return super().forward(x, h, cond, mask, t_abs=t_abs)

    obj = objective(Probe(), fm_ratio=0.0, cfg_kappa=0.5)
    before = torch.backends.cuda.flash_sdp_enabled()
    obj(torch.randn(2, 1, 2, 2), Cond(torch.tensor([1, 2])), Cond(torch.tensor([NULL])))
    assert flags == [before, False]  # guidance forward (default kernels), then the JVP (MATH only)
    assert torch.backends.cuda.flash_sdp_enabled() == before


def _hand_case():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.85, 0.5, 0.7, 0.95], dtype=torch.float64)  # t = 0.95 lies outside [0, 0.9]
    r = torch.tensor([0.2, 0.5, 0.05, 0.4], dtype=torch.float64)
    y = torch.tensor([3, 5, 9, 0])
    drop = torch.tensor([False, False, True, False])
    return x, eps, t, r, y, drop


@pytest.mark.parametrize("branch", ["mf", "fm"])
def test_branch_loss_matches_hand_computation(branch, true_float64):
    """§4.6 formulas written out with raw network calls (kappa = 0.5, omega = 1.2, window [0, 0.9], one dropped)."""
    net = tiny_ddt(dtype=torch.float64)
    kw = dict(cfg_omega=1.2, cfg_kappa=0.5, cfg_t_end=0.9, norm_p=0.75, norm_eps=0.01)
    obj = objective(net, **kw)
    x, eps, t, r, y, drop = _hand_case()
    if branch == "fm":
        r = t.clone()
    null = torch.full_like(y, NULL)
    y_d = torch.where(drop, null, y)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
    v = eps - x
    with torch.no_grad():
        zero = torch.zeros_like(t)
        u_c = net(x_t, zero, y_d, None, t_abs=t)
        u_n = net(x_t, zero, null, None, t_abs=t)
    v_g = 1.2 * v + (1 - 1.2 - 0.5) * u_n + 0.5 * u_c
    keep_v = drop | (t > 0.9)
    v_g = torch.where(keep_v.view(-1, 1, 1, 1), v, v_g)

    u = net(x_t, t - r, y_d, None, t_abs=t)
    if branch == "mf":
        dudt = fd_dudt(net, x_t, t, r, v_g, y_d).detach()
        V = u + (t - r).view(-1, 1, 1, 1) * dudt
    else:
        dudt = torch.zeros_like(u)
        V = u
    L = (V - v_g).pow(2).sum(dim=(1, 2, 3))
    loss_hand = (L / (L.detach() + 0.01) ** 0.75).mean()
    params = [p for p in net.parameters() if p.requires_grad]
    grads_hand = torch.autograd.grad(loss_hand, params, allow_unused=True)

    out = obj.compute_loss(
        x, eps, t, None if branch == "fm" else r, Cond(y), Cond(torch.tensor([NULL])), drop
    )
    torch.testing.assert_close(out["loss"], loss_hand.detach(), rtol=1e-7, atol=0)
    torch.testing.assert_close(out["orig_mf_loss"], L.detach().mean(), rtol=1e-7, atol=0)
    dn = dudt.flatten(1).norm(dim=1).mean()
    torch.testing.assert_close(out["dudt_norm"].double(), dn, rtol=1e-6, atol=0)
    assert out["branch"].item() == (1.0 if branch == "mf" else 0.0)
    assert not out["orig_mf_loss"].requires_grad and not out["dudt_norm"].requires_grad
    grads = torch.autograd.grad(out["loss"], params, allow_unused=True)
    n_checked = 0
    for gh, go in zip(grads_hand, grads, strict=True):
        if gh is None:
            assert go is None or go.abs().max() == 0
            continue
        torch.testing.assert_close(go, gh, rtol=1e-5, atol=1e-9)
        n_checked += 1
    assert n_checked > 20


def test_forward_draws_fm_and_mf_times_as_specified():
    """FM: t = shift(LN); MF: t = shift(max(a, b)), r = shift(min(a, b)); h = t - r and t_abs = t reach the net."""
    mu, sigma, s, n = -0.4, 1.0, 3.0, 4000
    x = torch.zeros(n, 1, 1, 1, dtype=torch.float64)  # float64 keeps logit(r) accurate near 0
    cond, null = Cond(torch.zeros(n, dtype=torch.long)), Cond(torch.tensor([NULL]))
    torch.manual_seed(0)

    fm = objective(Affine(), fm_ratio=1.0, time_dist=LogitNormal(mu, sigma), shift=s)
    fm(x, cond, null)
    ((h, t_abs),) = fm.net.calls
    assert max(abs(v) for v in h) == 0.0
    z = torch.logit(torch.tensor(t_abs, dtype=torch.float64)) - math.log(s)
    assert stats.kstest(z.numpy(), "norm", args=(mu, sigma)).pvalue > 1e-3

    mf = objective(Affine(), fm_ratio=0.0, time_dist=LogitNormal(mu, sigma), shift=s)
    mf(x, cond, null)
    ((h, t_abs),) = mf.net.calls
    t = torch.tensor(t_abs, dtype=torch.float64)
    r = t - torch.tensor(h, dtype=torch.float64)
    assert (r <= t).all()
    zt = (torch.logit(t) - math.log(s) - mu) / sigma
    zr = (torch.logit(r) - math.log(s) - mu) / sigma
    norm = stats.norm.cdf
    assert stats.kstest(zt.numpy(), lambda q: norm(q) ** 2).pvalue > 1e-3  # max of two
    assert stats.kstest(zr.numpy(), lambda q: 1 - (1 - norm(q)) ** 2).pvalue > 1e-3  # min of two
    # shifting after max/min, not drawing shifted pairs: r is not independent of t
    assert stats.kstest(zt.numpy(), "norm").pvalue < 1e-6


def test_gradient_flows_through_the_jvp():
    net = tiny_ddt()
    obj = objective(net, fm_ratio=0.0)
    out = obj(torch.randn(2, 3, 8, 8), Cond(torch.tensor([1, 2])), Cond(torch.tensor([NULL])))
    out["loss"].backward()
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert sum(p.grad.abs().sum().item() for p in trainable) > 0
    assert out["dudt_norm"].item() > 0


# --------------------------------------------------------------------------------------------------------------
# guided target


@pytest.mark.parametrize("text", [False, True])
@pytest.mark.parametrize("omega, kappa", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5), (1.5, 0.3)])
def test_guided_target_closed_form(omega, kappa, text):
    net = Affine(b=0.7, c=-0.3)
    obj = objective(net, cfg_omega=omega, cfg_kappa=kappa, cfg_t_start=0.1, cfg_t_end=0.8)
    g = torch.Generator().manual_seed(0)
    B = 5
    x_t = torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64)
    v = torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.5, 0.05, 0.95, 0.3, 0.8], dtype=torch.float64)  # 0.05 and 0.95 outside [0.1, 0.8]
    drop = torch.tensor([False, False, False, True, False])
    if text:
        cond = Cond(torch.randn(B, 4, 3, generator=g), torch.tensor([[1, 1, 0, 0]] * B, dtype=torch.bool))
        null = Cond(torch.full((1, 4, 3), -0.5), torch.tensor([[1, 0, 0, 0]], dtype=torch.bool))
    else:
        cond = Cond(torch.tensor([1, 2, 3, 4, 5]))
        null = Cond(torch.tensor([NULL]))
    cond_d = cond.where(drop, null)
    v_g = obj.guided_velocity(x_t, t, v, cond_d, null, drop)

    a_c = net.coef(cond_d.value).view(-1, 1, 1, 1)
    a_n = net.coef(null.value.expand_as(cond.value)).view(-1, 1, 1, 1)
    tb = t.view(-1, 1, 1, 1)
    u_c = a_c * x_t - 0.3 * tb  # h = 0: no b term
    u_n = a_n * x_t - 0.3 * tb
    if (omega, kappa) == (1.0, 0.0):
        expected = v
        assert net.calls == []  # guidance off: no extra forwards
    elif kappa == 0.0:
        expected = u_n + omega * (v - u_n)
    elif omega == 1.0:
        expected = v + kappa * (u_c - u_n)
    else:
        expected = omega * v + (1 - omega - kappa) * u_n + kappa * u_c
    keep_v = torch.tensor([False, True, True, True, False]).view(-1, 1, 1, 1)
    expected = torch.where(keep_v, v, expected)
    torch.testing.assert_close(v_g, expected, rtol=1e-6, atol=1e-6)
    if (omega, kappa) != (1.0, 0.0):
        assert not torch.allclose(v_g[0], v[0])  # guidance did something on an eligible sample
        for h, t_abs in net.calls:  # guidance forwards at h = 0, t_abs = t
            assert max(abs(e) for e in h) == 0
            assert t_abs[:B] == pytest.approx(t.tolist())
    assert not v_g.requires_grad


# --------------------------------------------------------------------------------------------------------------
# adaptive weighting


def test_adaptive_weighting_value_and_gradient():
    L = torch.tensor([0.0, 1.0, 3.0, 100.0], dtype=torch.float64, requires_grad=True)
    for p, eps in [(1.0, 0.01), (0.5, 0.01), (2.0, 0.1), (0.0, 0.01)]:
        val = adaptive_weighted_mean(L, p, eps)
        expected = sum(li / (li + eps) ** p for li in [0.0, 1.0, 3.0, 100.0]) / 4
        assert val.item() == pytest.approx(expected, rel=1e-12)
        (grad,) = torch.autograd.grad(val, L)
        # the weight is stop-gradient: d/dL_i = 1 / (B (L_i + eps)^p)
        expected_grad = [1 / (4 * (li + eps) ** p) for li in [0.0, 1.0, 3.0, 100.0]]
        assert grad.tolist() == pytest.approx(expected_grad, rel=1e-12)
    assert adaptive_weighted_mean(L, 1.0, 0.01).item() == pytest.approx(
        (0 + 1 / 1.01 + 3 / 3.01 + 100 / 100.01) / 4
    )


# --------------------------------------------------------------------------------------------------------------
# branch schedule


def test_branch_frequency_determinism_and_reference_draw():
    for ratio in (0.75, 0.3):
        obj = objective(Affine(), fm_ratio=ratio, seed=42)
        draws = [obj.next_branch_is_mf() for _ in range(2000)]
        fm_freq = 1 - sum(draws) / len(draws)
        assert abs(fm_freq - ratio) < 4 * math.sqrt(ratio * (1 - ratio) / 2000)
        ref = random.Random(42)  # the reference's per-step draw: FM iff rng.random() < fm_ratio
        assert draws == [not (ref.random() < ratio) for _ in range(2000)]
    a = [objective(Affine(), seed=7).next_branch_is_mf() for _ in range(1)]
    o1, o2, o3 = objective(Affine(), seed=7), objective(Affine(), seed=7), objective(Affine(), seed=8)
    s1 = [o1.next_branch_is_mf() for _ in range(200)]
    assert s1 == [o2.next_branch_is_mf() for _ in range(200)]
    assert s1 != [o3.next_branch_is_mf() for _ in range(200)]
    assert a[0] == s1[0]
    assert all(not objective(Affine(), fm_ratio=1.0).next_branch_is_mf() for _ in range(50))
    assert all(objective(Affine(), fm_ratio=0.0).next_branch_is_mf() for _ in range(50))


def test_branch_rng_state_restores_the_sequence(tmp_path):
    obj = objective(Affine(), seed=42)
    for _ in range(137):
        obj.next_branch_is_mf()
    state = obj.branch_rng_state()
    sd = obj.state_dict()
    torch.save(sd, tmp_path / "obj.pt")
    cont = [obj.next_branch_is_mf() for _ in range(100)]

    obj.set_branch_rng_state(state)
    assert [obj.next_branch_is_mf() for _ in range(100)] == cont

    fresh = objective(Affine(), seed=42)  # would restart from the seed (the reference's behaviour on resume)
    assert [fresh.next_branch_is_mf() for _ in range(100)] != cont
    fresh = objective(Affine(), seed=42)
    fresh.load_state_dict(torch.load(tmp_path / "obj.pt", weights_only=True))
    assert [fresh.next_branch_is_mf() for _ in range(100)] == cont


def test_forward_follows_the_branch_schedule():
    obj = objective(Affine(), fm_ratio=0.5, seed=3)
    twin = objective(Affine(), fm_ratio=0.5, seed=3)
    x, cond, null = torch.randn(2, 1, 2, 2), Cond(torch.tensor([1, 2])), Cond(torch.tensor([NULL]))
    got = [obj(x, cond, null)["branch"].item() for _ in range(12)]
    assert got == [float(twin.next_branch_is_mf()) for _ in range(12)]
    assert 0 < sum(got) < 12


# --------------------------------------------------------------------------------------------------------------
# sampling


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_sampler_is_exact_for_the_point_mass_field(num_steps, shift):
    """For data = delta(x*), the straight path's average velocity is u(x_t, t, r) = (x_t - x*) / t for every r,
    so every jump lands exactly on the path and the sampler returns x*."""
    g = torch.Generator().manual_seed(0)
    x_star = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    seen = []

    def u_fn(x, t, r):
        assert isinstance(t, float) and isinstance(r, float) and r < t
        seen.append((t, r))
        return (x - x_star) / t

    out = meanflow_sample(u_fn, noise, num_steps, shift)
    torch.testing.assert_close(out, x_star, rtol=0, atol=1e-6)
    assert len(seen) == num_steps
    grid = sampling.time_grid(num_steps, shift)
    assert seen == list(zip(grid[:-1], grid[1:], strict=True))
    assert seen[0][0] == 1.0 and seen[-1][1] == 0.0


def test_one_step_sample_through_the_objective():
    """x_0 = eps - u(eps, h = 1, t_abs = 1) (§4.6), via bind(); the network sees h = t - r and t_abs = t."""
    net = Affine(b=0.7, c=-0.3)
    obj = objective(net)
    noise = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    cond = Cond(torch.tensor([0, 1, 2, 3]))
    out = meanflow_sample(bind(obj, cond), noise, 1)
    a = net.coef(cond.value).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, noise - (a * noise + 0.7 * 1 - 0.3 * 1))
    assert net.calls == [([1.0] * 4, [1.0] * 4)]

    net.calls.clear()
    meanflow_sample(bind(obj, cond), noise, 3, shift=3.0)
    grid = sampling.time_grid(3, 3.0)
    for (h, t_abs), t, r in zip(net.calls, grid[:-1], grid[1:], strict=True):
        assert h == pytest.approx([t - r] * 4) and t_abs == pytest.approx([t] * 4)


# --------------------------------------------------------------------------------------------------------------
# training and config


def test_tiny_meanflow_training_reduces_the_loss():
    torch.manual_seed(0)
    net = tiny_ddt()
    obj = MeanFlowObjective(net, fm_ratio=0.5, cfg_dropout_prob=0.1, cfg_omega=1.0, cfg_kappa=0.5)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(8, 3, 8, 8)
    cond, null = Cond(torch.arange(8) % 10), Cond(torch.tensor([NULL]))
    losses, branches = [], []
    for _ in range(40):
        out = obj(x, cond, null)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out["orig_mf_loss"].item())
        branches.append(out["branch"].item())
    assert all(math.isfinite(v) for v in losses)
    assert 0 < sum(branches) < 40  # both branches ran
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_non_velocity_prediction_is_a_config_error():
    with pytest.raises(ConfigError, match="velocity"):
        MeanFlowObjective(Affine(), prediction="x")
    with pytest.raises(ConfigError, match="fm_ratio"):
        MeanFlowObjective(Affine(), fm_ratio=1.5)
