"""Objectives and samplers against closed forms (spec reference.md §4-§5): the exact Gaussian flow, solver
orders, v<->x identities, REG / REPA loss values, REG sampling with CFG, no host syncs, batch invariance."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nanogen import sampling
from nanogen.conditioning import Cond, LabelConditioner
from nanogen.config import load_config
from nanogen.encoders import EncoderFeatures
from nanogen.errors import ConfigError
from nanogen.eval.generate import SamplerSettings, generate, per_sample_noise
from nanogen.latents.pixel import PixelSpace
from nanogen.models.ddt import DDT, DDTConfig
from nanogen.models.outputs import DiTOutput
from nanogen.objectives.flow import FlowObjective, LogitNormal

DEMO = "configs/stage2/training/nano/lightningdit-xs-pixel-xpred-t4c8.yaml"

# ----------------------------------------------------------------------------------------------------------
# the exact velocity of Gaussian data: x ~ N(mu, S), x_t = (1 - t) x + t eps  =>  C_t = (1-t)^2 S + t^2 I,
# E[x | x_t] = mu + (1-t) S C_t^-1 (x_t - (1-t) mu),  E[eps | x_t] = t C_t^-1 (x_t - (1-t) mu),  v = E[eps - x | x_t]

MU = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
A = torch.tensor([[0.6, 0.0, 0.0], [0.3, 0.5, 0.0], [-0.2, 0.1, 0.3]], dtype=torch.float64)
SIGMA = A @ A.T


def gaussian_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    C = (1 - t) ** 2 * SIGMA + t**2 * torch.eye(3, dtype=torch.float64)
    r = torch.linalg.solve(C, (x - (1 - t) * MU).T).T
    return t * r - (MU + (1 - t) * r @ SIGMA)


def pushed_moments(solver: str, steps: int, shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler is affine in x for this field, so running it on 0 and the unit vectors gives the map
    x1 -> M x1 + c exactly; with x1 ~ N(0, I) the samples have mean c and covariance M M^T (no sampling noise)."""
    pts = torch.cat([torch.zeros(1, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)])
    out = sampling.sample(gaussian_velocity, pts, steps, shift, solver)
    c = out[0]
    M = (out[1:] - c).T
    return c, M @ M.T


@pytest.mark.parametrize("solver, tol", [("euler", 5e-3), ("heun", 1e-4)])
def test_fine_steps_reproduce_the_gaussian_target(solver, tol):
    mean, cov = pushed_moments(solver, 400)
    torch.testing.assert_close(mean, MU, atol=tol, rtol=0)
    torch.testing.assert_close(cov, SIGMA, atol=tol, rtol=0)


def test_heun_converges_at_second_order_euler_at_first():
    def err(solver, n):
        mean, cov = pushed_moments(solver, n)
        return ((mean - MU).norm() + (cov - SIGMA).norm()).item()

    e = {s: [err(s, n) for n in (16, 32, 64)] for s in ("euler", "heun")}
    for s, lo, hi in (("euler", 1.7, 2.3), ("heun", 3.4, 4.6)):  # halving h divides the error by 2^order
        ratios = [e[s][i] / e[s][i + 1] for i in range(2)]
        assert all(lo < r < hi for r in ratios), (s, ratios)
    assert e["heun"][-1] < e["euler"][-1] / 20


# ----------------------------------------------------------------------------------------------------------
# v <-> x conversions (§4.2)


def test_x_prediction_conversion_identities():
    obj = FlowObjective(nn.Identity(), prediction="x", t_eps=0.05)
    x, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0.9, 0.5, 0.05, 0.01])
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x + tb * eps
    v = obj.to_velocity(x, x_t, t)  # a perfect x-prediction gives the target exactly...
    torch.testing.assert_close(v, obj.target(x_t, x, t))
    torch.testing.assert_close(v[:3], (eps - x)[:3])  # ...which is eps - x for t >= t_eps
    torch.testing.assert_close(v[3], (eps - x)[3] * 0.01 / 0.05)  # and damped below (reference QUIRK)
    textbook = FlowObjective(nn.Identity(), prediction="x", t_eps=0.0)  # the documented switch: t_eps = 0
    torch.testing.assert_close(textbook.to_velocity(x, x_t, t), eps - x, rtol=1e-4, atol=1e-4)
    # velocity -> clean image: x_hat = x_t - t v inverts the conversion
    torch.testing.assert_close(x_t - tb * (eps - x), x)


# ----------------------------------------------------------------------------------------------------------
# REG and REPA loss values (§4.3, §4.4) on tiny known inputs


class RecordingNet(nn.Module):
    """Returns fixed outputs and records what it was given."""

    def __init__(self, out_x, out_cls, out_repa):
        super().__init__()
        self.out = (out_x, out_cls, out_repa)
        self.seen = {}

    def forward(self, x, t, cond, mask=None, *, cls_t=None, t_abs=None, return_repa=False):
        self.seen.update(x_t=x, t=t, cls_t=cls_t, return_repa=return_repa)
        return DiTOutput(*self.out)


class FixedEncoder(nn.Module):
    def __init__(self, cls, patches):
        super().__init__()
        self.feats = EncoderFeatures(cls, patches)

    def forward(self, images):
        return self.feats


def test_reg_and_repa_losses_equal_their_formulas():
    torch.manual_seed(0)
    B, z = 3, 5
    x = torch.randn(B, 2, 4, 4)
    cls, patches = torch.randn(B, z), torch.randn(B, 4, z)
    out_x, out_cls, out_repa = torch.randn(B, 2, 4, 4), torch.randn(B, z), torch.randn(B, 5, z)
    net = RecordingNet(out_x, out_cls, out_repa)
    obj = FlowObjective(net, prediction="velocity", t_eps=0.05, cfg_dropout_prob=0.0, reg_coeff=0.03,
                        repa_coeff=0.5, encoder=FixedEncoder(cls, patches))  # fmt: skip
    lab = LabelConditioner(10)
    res = obj(x, lab(torch.tensor([1, 2, 3])), lab.null(1))
    t, x_t, cls_t = net.seen["t"], net.seen["x_t"], net.seen["cls_t"]
    tb = t.view(-1, 1).clamp_min(0.05)
    eps_c = (cls_t - (1 - t.view(-1, 1)) * cls) / t.view(-1, 1)  # the noise the objective drew
    assert eps_c.std() > 0.3  # cls_t is (1 - t) cls + t eps_c with real noise
    target_c = (cls_t - cls) / tb
    assert res["loss_reg"].item() == pytest.approx(0.03 * (out_cls - target_c).pow(2).mean().item(), rel=1e-5)
    z_target = torch.cat([cls[:, None], patches], dim=1)  # REG on: the CLS target is prepended
    assert res["loss_repa"].item() == pytest.approx(0.5 * (out_repa - z_target).pow(2).mean().item(), rel=1e-5)
    target_x = (x_t - x) / t.view(-1, 1, 1, 1).clamp_min(0.05)
    assert res["loss_fm"].item() == pytest.approx((out_x - target_x).pow(2).mean().item(), rel=1e-5)
    total = res["loss_fm"] + res["loss_reg"] + res["loss_repa"]
    assert res["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    assert net.seen["return_repa"]


def test_reg_training_without_encoder_is_a_clear_error():
    obj = FlowObjective(RecordingNet(None, None, None), reg_coeff=0.03)
    lab = LabelConditioner(10)
    with pytest.raises(RuntimeError, match="frozen target encoder"):
        obj(torch.randn(2, 3, 4, 4), lab(torch.tensor([1, 2])), lab.null(1))


# ----------------------------------------------------------------------------------------------------------
# sampling: REG jointly with CFG (§4.4, §5.2), interval switching, no host syncs, batch invariance


def tiny_reg_objective() -> FlowObjective:
    torch.manual_seed(0)
    net = DDT(DDTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=[32, 32], depth=[1, 1],
                        num_heads=[2, 2], num_classes=10, enable_reg=True, z_dim=6))  # fmt: skip
    for p in net.parameters():  # replace the zero init, so outputs depend on every input
        if p.dim() > 1 and torch.all(p == 0):
            nn.init.normal_(p, std=0.05)
    return FlowObjective(net.eval(), prediction="x")


def test_reg_token_is_integrated_and_guided():
    obj = tiny_reg_objective()
    lab = LabelConditioner(10)
    cond, null = lab(torch.tensor([3, 7])), lab.null(2)
    x = (torch.randn(2, 3, 8, 8), torch.randn(2, 6))
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        v_c, v_u = obj.velocity(x, t, cond), obj.velocity(x, t, null)
        g = sampling.classifier_free(obj.velocity, cond, null, 2.5)(x, 0.5)
    for i in range(2):  # both the image and the REG token get o_u + w (o_c - o_u)
        torch.testing.assert_close(g[i], v_u[i] + 2.5 * (v_c[i] - v_u[i]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(v_c[1], v_u[1])


def test_cfg_runs_one_branch_outside_the_interval():
    batches = []

    def velocity(x, t, cond):
        batches.append(x.shape[0])
        return torch.zeros_like(x)

    lab = LabelConditioner(10)
    grid = sampling.time_grid(10, 3.0)
    v = sampling.classifier_free(velocity, lab(torch.tensor([1, 2])), lab.null(2), 4.0, t_min=0.0, t_max=0.9)
    sampling.euler(v, torch.zeros(2, 1), grid)
    expected = [4 if t <= 0.9 else 2 for t in grid[:-1]]
    assert batches == expected and 2 in expected and 4 in expected


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("_local_scalar_dense"):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_no_host_sync_inside_the_step_loop(solver):
    obj = tiny_reg_objective()
    lab = LabelConditioner(10)
    v = sampling.classifier_free(obj.velocity, lab(torch.tensor([1, 2])), lab.null(2), 3.0, 0.0, 0.9)
    x = (torch.randn(2, 3, 8, 8), torch.randn(2, 6))
    with torch.no_grad(), CountSyncs() as c:
        sampling.sample(v, x, 4, 2.0, solver)
    assert c.n == 0


def test_samples_do_not_depend_on_batch_size():
    obj = tiny_reg_objective()
    lab, pix = LabelConditioner(10), PixelSpace(image_size=8, channels=3)
    s = SamplerSettings(num_steps=3, shift=2.0, cfg_scale=2.0, cfg_interval=(0.0, 0.9), solver="heun")
    idx = list(range(7))
    labels = torch.tensor([i % 10 for i in idx])
    all7 = generate(obj, pix, lab, labels, per_sample_noise(idx, (3, 8, 8), 5, torch.device("cpu"), 6), s)
    for i in (0, 4, 6):
        one = generate(obj, pix, lab, labels[i : i + 1], per_sample_noise([i], (3, 8, 8), 5, torch.device("cpu"), 6), s)
        torch.testing.assert_close(one[0], all7[i], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# training and config checks


def test_tiny_reg_repa_training_loss_falls():
    torch.manual_seed(0)
    net = DDT(DDTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=[32, 32], depth=[2, 1],
                        num_heads=[2, 2], num_classes=10, enable_reg=True, enable_repa=True, repa_layer_depth=1,
                        z_dim=6))  # fmt: skip
    proj = nn.Linear(6, 6)  # a fixed "encoder": CLS and patch features are linear in the image

    class Enc(nn.Module):
        def forward(self, img):
            p = img.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, 3, 4, 4, 2, 2) -> 16 tokens, one per patch
            tok = p.permute(0, 2, 3, 1, 4, 5).reshape(img.shape[0], 16, 3, 4).mean(-1)
            tok = torch.cat([tok, tok**2], -1) @ proj.weight.detach().T
            return EncoderFeatures(tok.mean(1), tok)

    obj = FlowObjective(net, prediction="x", reg_coeff=0.03, repa_coeff=0.5, encoder=Enc(), cfg_dropout_prob=0.1)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    lab = LabelConditioner(10)
    cond, null = lab(torch.arange(8)), lab.null(1)
    losses = []
    for _ in range(60):
        res = obj(x, cond, null)
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        losses.append((res["loss_fm"].item(), res["loss_reg"].item(), res["loss_repa"].item()))
    first, last = torch.tensor(losses[:10]).mean(0), torch.tensor(losses[-10:]).mean(0)
    assert torch.all(last < first), (first, last)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["repa.use_reg=true", "transport.meanflow={}"], "REG cannot be combined with MeanFlow"),
        (["perceptual_loss.encoders=lpips", "perceptual_loss.percep_loss_weights=[0.1]", "transport.prediction=velocity"],
         "need transport.prediction: x"),
        (["perceptual_loss.encoders=lpips,dinov2-vit-b", "perceptual_loss.percep_loss_weights=[0.1]"], "2 encoders"),
        (["transport.prediction=eps"], "must be one of"),
        (["transport.time_dist_type=uniform"], "logit-normal_MU_SIGMA"),
        (["guidance.cfg.t_max=1.5"], "0 <= t_min <= t_max <= 1"),
        (["guidance.cfg.t_min=0.8", "guidance.cfg.t_max=0.2"], "0 <= t_min <= t_max <= 1"),
    ],
)  # fmt: skip
def test_incompatible_options_are_rejected_at_load(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config(DEMO, overrides)


def test_logit_normal_shift_is_a_logit_offset_in_distribution():
    """t = s t0 / (1 + (s - 1) t0) with t0 ~ LN(mu, sigma) is LN(mu + ln s, sigma) (§4.1)."""
    torch.manual_seed(0)
    obj = FlowObjective(nn.Identity(), time_dist=LogitNormal(-0.4, 1.0), shift=math.sqrt(48))
    t = obj.sample_t(200_000, "cpu")
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - (-0.4 + math.log(math.sqrt(48)))) < 0.01
    assert abs(logit.std().item() - 1.0) < 0.01


def test_cond_for_text_masks_survives_reg_state():
    c = Cond(torch.randn(2, 3, 4), torch.tensor([[True, False, False], [True, True, True]]))
    assert c.cat(c).mask.shape == (4, 3)


def test_perceptual_losses_need_pixel_space():
    vae = "configs/stage2/training/imagenet/ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4c8.yaml"
    with pytest.raises(ConfigError, match="need the pixel space"):
        load_config(vae, ["perceptual_loss.encoders=lpips", "perceptual_loss.percep_loss_weights=[0.1]",
                          "transport.prediction=x"])  # fmt: skip
