"""PixelGen perceptual losses (spec reference.md §4.7): LPIPS-VGG16, P-DINO, t-gating, the config parser.

No pretrained weights exist offline, so LPIPS is checked with seeded random weights written in the two real
file formats (torchvision VGG16 state dict, LPIPS lin state dict) against (a) a plain float64 re-computation
in this file (explicit F.conv2d / max-pool over the state dict, normalisation and lin in numpy) and (b)
numbers produced by the reference ``lpips`` package (0.1.4) from the same seeded weights and inputs.
torchvision is not imported: its import alone costs ~8 s on two loaded cores; its VGG16 layout is written
out below as public facts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanogen.encoders.base import EncoderFeatures
from nanogen.errors import CheckpointError, ConfigError, NotAvailableError
from nanogen.models import lpips as lp
from nanogen.objectives.perceptual import (
    PatchFeatureLoss,
    PerceptualLoss,
    build_perceptual,
    parse_perceptual,
)

# Public facts of LPIPS v0.1 (VGG variant) and of torchvision's VGG16, written out independently of the code.
SHIFT = [-0.030, -0.088, -0.188]
SCALE = [0.458, 0.448, 0.450]
TAPS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}  # torchvision features index
CHANNELS = [64, 128, 256, 512, 512]
CONV_SHAPES = [  # (index, out, in) of the 13 conv3x3 (each followed by a ReLU) in torchvision vgg16().features
    (0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128), (12, 256, 256), (14, 256, 256),
    (17, 512, 256), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512),
]  # fmt: skip

# lpips 0.1.4, ``lpips.LPIPS(net="vgg", pnet_rand=True)`` with the seeded weights below loaded into
# ``net.slice*`` / ``lin*``, model in float64, on the seeded inputs of ``seeded_inputs()``.
POOLS_BEFORE = {5, 10, 17, 24}  # conv indices preceded by a 2x2 max-pool (features[4, 9, 16, 23])

EXPECTED_LPIPS_PACKAGE = [0.7739995848811833, 0.7601969360824191]


def seeded_vgg() -> dict[str, torch.Tensor]:
    """torchvision-format (``features.*``) VGG16 weights from seed 0: He-normal weights, small biases."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i, c_out, c_in in CONV_SHAPES:
        w = torch.randn((c_out, c_in, 3, 3), generator=g, dtype=torch.float64) * math.sqrt(2.0 / (9 * c_in))
        sd[f"features.{i}.weight"] = w.float()
        sd[f"features.{i}.bias"] = (torch.randn((c_out,), generator=g, dtype=torch.float64) * 0.01).float()
    return sd


def seeded_lin() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        f"lin{k}.model.1.weight": torch.rand((1, c, 1, 1), generator=g, dtype=torch.float64).float()
        for k, c in enumerate(CHANNELS)
    }


def seeded_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    a = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    b = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    return a, b


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    vgg, lin = seeded_vgg(), seeded_lin()
    torch.save(vgg, d / "vgg16-397923af.pth")
    torch.save(lin, d / "vgg.pth")
    return d, vgg, lin


@pytest.fixture(scope="module")
def model(weights):
    d, _, _ = weights
    return lp.load_lpips(d / "vgg16-397923af.pth", d / "vgg.pth")


def reference_lpips(vgg: dict, lin: dict, x0: torch.Tensor, x1: torch.Tensor) -> np.ndarray:
    """Plain float64 LPIPS: explicit VGG16 convs from the state dict, normalisation / lin / mean in numpy."""
    # LPIPS holds the scaling constants as float32 buffers, also when the model runs in float64
    shift = torch.tensor(SHIFT, dtype=torch.float32).double().view(1, 3, 1, 1)
    scale = torch.tensor(SCALE, dtype=torch.float32).double().view(1, 3, 1, 1)

    def taps(x):
        h, out = (x.double() - shift) / scale, []
        for i, _, _ in CONV_SHAPES:
            if i in POOLS_BEFORE:
                h = F.max_pool2d(h, 2)
            w, b = vgg[f"features.{i}.weight"].double(), vgg[f"features.{i}.bias"].double()
            h = F.relu(F.conv2d(h, w, b, padding=1))
            if i + 1 in TAPS.values():
                out.append(h.numpy())
        return out

    total = np.zeros(x0.shape[0])
    for k, (f0, f1) in enumerate(zip(taps(x0), taps(x1), strict=True)):
        n0 = f0 / (np.sqrt((f0**2).sum(axis=1, keepdims=True)) + 1e-10)
        n1 = f1 / (np.sqrt((f1**2).sum(axis=1, keepdims=True)) + 1e-10)
        w = lin[f"lin{k}.model.1.weight"].double().numpy().reshape(-1)
        total += np.einsum("bchw,c->bhw", (n0 - n1) ** 2, w).mean(axis=(1, 2))
    return total


def pair(seed: int, n: int = 3, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    b = (a + 0.4 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    return a, b


# ----------------------------------------------------------------------------------------------------------
# LPIPS: constants and structure


def test_scaling_layer_and_taps():
    m = lp.LPIPS()
    assert torch.equal(m.shift.flatten(), torch.tensor(SHIFT)) and torch.equal(
        m.scale.flatten(), torch.tensor(SCALE)
    )
    assert m.taps == tuple(TAPS.values())
    assert [lin.weight.shape[1] for lin in m.lins] == CHANNELS
    want = {}
    for i, c_out, c_in in CONV_SHAPES:  # torchvision vgg16().features keys and shapes load unchanged
        want[f"{i}.weight"], want[f"{i}.bias"] = (c_out, c_in, 3, 3), (c_out,)
    assert {k: tuple(v.shape) for k, v in m.features.state_dict().items()} == want
    for i in TAPS.values():  # every tap is the ReLU after the last conv of a block
        assert isinstance(m.features[i], nn.ReLU) and isinstance(m.features[i - 1], nn.Conv2d)
        assert i == 29 or isinstance(m.features[i + 1], nn.MaxPool2d)
    feats = m.tap_features(torch.zeros(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 32, 32),
        (128, 16, 16),
        (256, 8, 8),
        (512, 4, 4),
        (512, 2, 2),
    ]


# ----------------------------------------------------------------------------------------------------------
# LPIPS: values


def test_lpips_matches_plain_float64_recomputation(model, weights):
    _, vgg, lin = weights
    a, b = pair(0)
    expected = reference_lpips(vgg, lin, a, b)
    with torch.no_grad():
        got32 = model(a, b)
        got64 = model.double()(a.double(), b.double())
    model.float()
    assert got32.shape == (3,) and got32.dtype == torch.float32
    assert expected.min() > 0.05  # a real, non-degenerate distance
    np.testing.assert_allclose(got64.numpy(), expected, rtol=1e-10, atol=0)
    np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-4, atol=0)
    # a wrong constant / normalisation / tap would be visible far above these tolerances
    wrong = reference_lpips(vgg, {k: v * (1 + 0.01 * (i == 4)) for i, (k, v) in enumerate(lin.items())}, a, b)
    assert np.abs(wrong - expected).max() > 1e-4 * expected.max()


def test_lpips_matches_the_lpips_package_numbers(model):
    a, b = seeded_inputs()
    with torch.no_grad():
        got = model.double()(a, b)
    model.float()
    np.testing.assert_allclose(got.numpy(), EXPECTED_LPIPS_PACKAGE, rtol=1e-9, atol=0)


def test_lpips_properties(model):
    a, b = pair(1, n=4)
    with torch.no_grad():
        assert torch.equal(model(a, a), torch.zeros(4))  # exactly 0 for identical images
        d_ab, d_ba = model(a, b), model(b, a)
        assert torch.equal(d_ab, d_ba)  # symmetric
        assert (d_ab > 0).all()
        assert torch.allclose(model(a[2:3], b[2:3]), d_ab[2:3], rtol=1e-5)  # per-sample, batch-independent
        far = model(a, -a)
        assert (far > d_ab).all()  # a larger perturbation is further away
    with pytest.raises(ValueError, match="at least 16"):
        model(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_lpips_gradient_reaches_the_input_not_the_weights(model):
    a, b = pair(2, n=2)
    x_hat = a.clone().requires_grad_(True)
    model.train()  # frozen: stays in eval mode
    assert not model.training
    model(x_hat, b).sum().backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 14_714_688 + sum(CHANNELS)  # VGG16 features + lins


# ----------------------------------------------------------------------------------------------------------
# LPIPS: weight files


def test_load_lpips_file_formats(model, weights, tmp_path, monkeypatch):
    d, vgg, lin = weights
    a, b = pair(3, n=2)
    with torch.no_grad():
        want = model(a, b)
    # vgg16().features state dict (no prefix), legacy serialisation; an lpips.LPIPS-style full state dict
    torch.save(
        {k[len("features.") :]: v for k, v in vgg.items()},
        tmp_path / "features.pth",
        _use_new_zipfile_serialization=False,
    )
    full = {"scaling_layer.shift": torch.zeros(1, 3, 1, 1), **lin}
    slice_of = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
    for k, v in vgg.items():
        i = int(k.split(".")[1])
        full[f"net.slice{slice_of[i]}.{i}.{k.split('.')[2]}"] = v
    torch.save(full, tmp_path / "lpips_full.pth")
    with torch.no_grad():
        assert torch.equal(lp.load_lpips(tmp_path / "features.pth", d / "vgg.pth")(a, b), want)
        assert torch.equal(
            lp.load_lpips(tmp_path / "lpips_full.pth", tmp_path / "lpips_full.pth")(a, b), want
        )
        assert torch.equal(lp.load_lpips(str(d), str(d))(a, b), want)  # directories holding the usual names
        monkeypatch.setenv("NANOGEN_LPIPS_VGG", str(d / "vgg16-397923af.pth"))
        monkeypatch.setenv("NANOGEN_LPIPS_LIN", str(d))
        assert torch.equal(lp.load_lpips()(a, b), want)
        monkeypatch.delenv("NANOGEN_LPIPS_VGG")  # torch hub cache
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
        (tmp_path / "th" / "hub" / "checkpoints").mkdir(parents=True)
        (tmp_path / "th" / "hub" / "checkpoints" / "vgg16-397923af.pth").symlink_to(d / "vgg16-397923af.pth")
        assert torch.equal(lp.load_lpips()(a, b), want)


def test_load_lpips_missing_files(weights, tmp_path, monkeypatch):
    d, _, _ = weights
    monkeypatch.delenv("NANOGEN_LPIPS_VGG", raising=False)
    monkeypatch.delenv("NANOGEN_LPIPS_LIN", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(lp, "_lpips_package_lin", lambda: None)  # as if the lpips package were not installed
    with pytest.raises(NotAvailableError, match=r"vgg16-397923af\.pth.*NANOGEN_LPIPS_VGG") as e:
        lp.load_lpips(None, d / "vgg.pth")
    assert "\n" not in str(e.value)
    with pytest.raises(NotAvailableError, match=r"'vgg16-397923af\.pth'"):
        lp.load_lpips("", d / "vgg.pth")  # an empty config value means "not given"
    with pytest.raises(NotAvailableError, match=r"'vgg\.pth'.*NANOGEN_LPIPS_LIN"):
        lp.load_lpips(d / "vgg16-397923af.pth", None)
    with pytest.raises(NotAvailableError, match=r"nope\.pth"):
        lp.load_lpips(tmp_path / "nope.pth", d / "vgg.pth")
    with pytest.raises(NotAvailableError, match=r"vgg\.pth"):
        lp.load_lpips(d, tmp_path)  # a directory without the file
    monkeypatch.setenv("NANOGEN_LPIPS_LIN", str(tmp_path / "gone.pth"))
    with pytest.raises(NotAvailableError, match=r"gone\.pth.*from NANOGEN_LPIPS_LIN"):
        lp.load_lpips(d, None)


def test_load_lpips_bad_files(weights, tmp_path):
    d, vgg, lin = weights
    torch.save({k: -v.abs() if k.startswith("lin2") else v for k, v in lin.items()}, tmp_path / "neg.pth")
    with pytest.raises(CheckpointError, match="lin2.*negative"):
        lp.load_lpips(d, tmp_path / "neg.pth")
    torch.save({k: v for k, v in lin.items() if not k.startswith("lin4")}, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match="lin4.model.1.weight"):
        lp.load_lpips(d, tmp_path / "short.pth")
    torch.save({**vgg, "features.28.weight": torch.zeros(512, 256, 3, 3)}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"features\.28\.weight"):
        lp.load_lpips(tmp_path / "shape.pth", d)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        lp.load_lpips(tmp_path / "junk.pth", d)


# ----------------------------------------------------------------------------------------------------------
# P-DINO


class StubEncoder(nn.Module):
    """A frozen linear "encoder": 4x4 patches -> Linear -> tokens; records whether grad mode was on."""

    def __init__(self, dim: int = 5, p: int = 4):
        super().__init__()
        self.p = p
        self.proj = nn.Linear(3 * p * p, dim)
        for q in self.parameters():
            q.requires_grad_(False)
        self.grad_modes: list[bool] = []

    def forward(self, images):
        self.grad_modes.append(torch.is_grad_enabled())
        B, C, H, W = images.shape
        p = self.p
        x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        return EncoderFeatures(cls=None, patches=self.proj(x))


def numpy_patch_mse(enc: StubEncoder, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    W, bias, p = enc.proj.weight.double().numpy(), enc.proj.bias.double().numpy(), enc.p

    def tokens(x):
        x = x.double().numpy()
        B, C, H, Wd = x.shape
        rows = [
            x[n, :, i : i + p, j : j + p].reshape(-1)
            for n in range(B)
            for i in range(0, H, p)
            for j in range(0, Wd, p)
        ]
        return (np.stack(rows) @ W.T + bias).reshape(B, -1, W.shape[0])

    return ((tokens(a) - tokens(b)) ** 2).mean(axis=(1, 2))


def test_pdino_is_the_per_sample_patch_mse():
    torch.manual_seed(0)
    enc = StubEncoder()
    a, b = pair(4, n=3, size=8)
    x_hat = a.clone().requires_grad_(True)
    loss = PatchFeatureLoss(enc)
    enc.grad_modes.clear()
    got = loss(x_hat, b)
    assert enc.grad_modes == [False, True]  # target under no_grad, prediction with grad
    assert got.shape == (3,)
    np.testing.assert_allclose(got.detach().numpy(), numpy_patch_mse(enc, a, b), rtol=1e-5)
    got.sum().backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert all(q.grad is None for q in enc.parameters())


# ----------------------------------------------------------------------------------------------------------
# Gating and weights


class SumAbs(nn.Module):
    """A per-sample stand-in term: sum |x_hat - x| * factor; counts the samples it sees."""

    def __init__(self, factor: float = 1.0):
        super().__init__()
        self.factor = factor
        self.seen = 0

    def forward(self, x_hat, x):
        self.seen += x_hat.shape[0]
        return (x_hat - x).abs().flatten(1).sum(1) * self.factor


@pytest.mark.parametrize("skip_gated", [True, False])
def test_gating_full_batch_average_and_weights(skip_gated):
    a, b = pair(5, n=5, size=4)
    t = torch.tensor([0.1, 0.69, 0.7, 0.95, 0.3])  # t = 0.7 is NOT below the 0.7 threshold
    lp_term, enc = SumAbs(1.0), StubEncoder(p=2)
    loss = PerceptualLoss(
        [("lpips", 0.1, lp_term), ("dinov2-vit-b", 0.01, enc)], t_thresh=0.7, skip_gated=skip_gated
    )
    x_hat = a.clone().requires_grad_(True)
    out = loss(x_hat, b, t)
    keep = np.array([1, 1, 0, 0, 1], dtype=np.float64)
    l1 = (a - b).abs().flatten(1).sum(1).double().numpy()
    l2 = numpy_patch_mse(enc, a, b)
    assert set(out) == {"lpips", "dinov2-vit-b", "total"}
    assert out["lpips"].item() == pytest.approx((keep * l1).sum() / 5, rel=1e-6)  # over the FULL batch of 5
    assert out["dinov2-vit-b"].item() == pytest.approx((keep * l2).sum() / 5, rel=1e-5)
    assert out["total"].item() == pytest.approx(
        0.1 * (keep * l1).sum() / 5 + 0.01 * (keep * l2).sum() / 5, rel=1e-5
    )
    out["total"].backward()
    g = x_hat.grad.abs().flatten(1).sum(1)
    assert (g[[2, 3]] == 0).all() and (g[[0, 1, 4]] > 0).all()  # gated samples contribute nothing
    assert lp_term.seen == (3 if skip_gated else 5)


def test_gating_all_samples_gated_and_skip_equivalence():
    a, b = pair(6, n=4, size=4)
    loss = PerceptualLoss([("lpips", 2.0, SumAbs())], t_thresh=0.5)
    out = loss(a, b, torch.full((4,), 0.9))
    assert out["lpips"].item() == 0 and out["total"].item() == 0
    t = torch.tensor([0.2, 0.8, 0.4, 0.6])
    full = PerceptualLoss([("lpips", 2.0, SumAbs())], t_thresh=0.5, skip_gated=False)(a, b, t)
    skip = loss(a, b, t.view(4, 1, 1, 1))  # t of shape (B,) or broadcastable (B, 1, 1, 1)
    assert torch.allclose(full["total"], skip["total"]) and skip["total"].item() > 0


# ----------------------------------------------------------------------------------------------------------
# Config


def test_parse_perceptual():
    assert parse_perceptual("lpips,dinov2-vit-b", [0.1, 0.01]) == [("lpips", 0.1), ("dinov2-vit-b", 0.01)]
    assert parse_perceptual(" lpips , dinov2-vit-b ", [1, 0]) == [("lpips", 1.0), ("dinov2-vit-b", 0.0)]
    assert parse_perceptual("", []) == [] and parse_perceptual(None, None) == []


@pytest.mark.parametrize(
    "spec, weights, match",
    [
        ("lpips,dinov2-vit-b", [0.1], r"2 encoder name\(s\).*1 weight\(s\)"),
        ("lpips", [0.1, 0.01], r"1 encoder name\(s\).*2 weight\(s\)"),
        ("", [0.1], r"0 encoder name\(s\)"),
        ("lpips,,dinov2-vit-b", [0.1, 0.2, 0.3], "empty name"),
        ("lpips,", [0.1, 0.2], "empty name"),
        ("lpips,lpips", [0.1, 0.2], "'lpips' is listed twice"),
        ("lpips,dinov2-vit-b", [0.1, -0.01], "'dinov2-vit-b' must be finite and >= 0"),
        ("lpips", [float("nan")], "finite"),
        ("lpips", ["0.1"], "must be a number"),
    ],
)
def test_parse_perceptual_errors(spec, weights, match):
    with pytest.raises(ConfigError, match=match):
        parse_perceptual(spec, weights)


def test_build_perceptual_uses_the_factories(model):
    calls = []

    def encoder_factory(name):
        calls.append(name)
        torch.manual_seed(0)
        return StubEncoder(p=4)

    assert build_perceptual("", [], 0.7, encoder_factory, lambda: model) is None
    loss = build_perceptual("lpips,dinov2-vit-b", [0.1, 0.01], 0.7, encoder_factory, lambda: model)
    assert (
        calls == ["dinov2-vit-b"] and loss.names == ["lpips", "dinov2-vit-b"] and loss.weights == [0.1, 0.01]
    )
    assert loss.terms[0] is model and isinstance(loss.terms[1], PatchFeatureLoss)
    a, b = pair(7, n=2, size=16)
    t = torch.tensor([0.2, 0.9])
    x_hat = a.clone().requires_grad_(True)
    out = loss(x_hat, b, t)
    with torch.no_grad():
        lp0 = model(a[:1], b[:1]).item()
    pd0 = numpy_patch_mse(loss.terms[1].encoder, a[:1], b[:1])[0]
    assert out["lpips"].item() == pytest.approx(lp0 / 2, rel=1e-5)
    assert out["total"].item() == pytest.approx(0.1 * lp0 / 2 + 0.01 * pd0 / 2, rel=1e-5)
    out["total"].backward()
    assert x_hat.grad[0].abs().sum() > 0 and x_hat.grad[1].abs().sum() == 0
    with pytest.raises(ConfigError, match="percep_loss_t_thresh"):
        build_perceptual("lpips", [1.0], float("inf"), encoder_factory, lambda: model)
