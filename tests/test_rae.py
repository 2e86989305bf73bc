"""RAE tokenizer, its ViT pixel decoder and the latent statistics (spec ``reference.md`` §6.2-6.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nanogen.encoders.base import EncoderFeatures
from nanogen.errors import CheckpointError
from nanogen.latents.rae import RAE, RAEDecoder, ViTDecoderConfig, sincos_2d, unpatchify
from nanogen.latents.stats import LatentStats

SIZES = {"ViTB": (12, 768, 12, 3072), "ViTL": (24, 1024, 16, 4096), "ViTXL": (28, 1152, 16, 4096)}
SIZES["ViTSO"] = SIZES["ViTXL"]


def tiny_cfg(enc_dim=8, tokens=16) -> ViTDecoderConfig:
    return ViTDecoderConfig(
        hidden_size=enc_dim,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=48,
        patch_size=16,
        image_size=16 * math.isqrt(tokens),
    )


def randomized(decoder: RAEDecoder, seed=0) -> RAEDecoder:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).float() * 0.3)
    return decoder


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("size", sorted(SIZES))
def test_decoder_sizes_on_meta(size):
    cfg = ViTDecoderConfig.from_json(f"configs/decoder/{size}/config.json", encoder_dim=768, num_tokens=256)
    layers, d, heads, ffn = SIZES[size]
    assert (cfg.decoder_num_hidden_layers, cfg.decoder_hidden_size) == (layers, d)
    assert (cfg.decoder_num_attention_heads, cfg.decoder_intermediate_size) == (heads, ffn)
    assert (cfg.hidden_size, cfg.patch_size, cfg.image_size, cfg.layer_norm_eps) == (768, 16, 256, 1e-12)
    with torch.device("meta"):
        dec = RAEDecoder(cfg)
        out = dec(torch.empty(2, 256, 768))
    assert out.shape == (2, 3, 256, 256)
    assert dec.decoder_pred.out_features == 16 * 16 * 3
    n = sum(p.numel() for p in dec.parameters())
    if size == "ViTXL":
        assert abs(n - 0.42e9) <= 0.05 * 0.42e9, n


def test_config_overrides_follow_the_token_count():
    cfg = ViTDecoderConfig.from_json("configs/decoder/ViTSO/config.json", encoder_dim=1024, num_tokens=1024)
    assert (cfg.hidden_size, cfg.patch_size, cfg.image_size, cfg.grid_size) == (1024, 16, 512, 32)


def test_param_count_closed_form():
    c, d, L, f, p = 8, 32, 2, 48, 16
    dec = RAEDecoder(tiny_cfg(enc_dim=c))
    per_layer = 4 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
    expected = (c * d + d) + d + L * per_layer + 2 * d + (d * p * p * 3 + p * p * 3)
    assert sum(q.numel() for q in dec.parameters()) == expected
    assert not dec.decoder_pos_embed.requires_grad and "decoder_pos_embed" in dec.state_dict()
    assert torch.equal(dec.cls_token, torch.zeros(1, 1, d))
    norms = [m for m in dec.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * L + 1 and all(m.eps == 1e-12 for m in norms)


# ---------------------------------------------------------------------------------------- building blocks


def test_sincos_against_formula():
    d, g = 16, 3
    pe = sincos_2d(d, g)
    assert pe.shape == (1 + g * g, d)
    ref = torch.zeros(1 + g * g, d, dtype=torch.float64)
    q = d // 4
    for i in range(g):  # row
        for j in range(g):  # column
            t = 1 + i * g + j
            for k in range(q):
                w = 1.0 / 10000 ** (k / q)
                ref[t, k] = math.sin(j * w)  # first half: the column index
                ref[t, q + k] = math.cos(j * w)
                ref[t, 2 * q + k] = math.sin(i * w)  # second half: the row index
                ref[t, 3 * q + k] = math.cos(i * w)
    torch.testing.assert_close(pe.double(), ref, rtol=0, atol=1e-6)
    assert torch.equal(pe[0], torch.zeros(d))


@pytest.mark.parametrize("p,g,c", [(2, 3, 3), (16, 2, 3), (3, 2, 2)])
def test_unpatchify_against_loop(p, g, c):
    x = torch.randn(2, g * g, p * p * c)
    out = unpatchify(x, p, c)
    ref = torch.zeros(2, c, g * p, g * p)
    for b in range(2):
        for gi in range(g):
            for gj in range(g):
                for pr in range(p):
                    for pc in range(p):
                        for ch in range(c):
                            ref[b, ch, gi * p + pr, gj * p + pc] = x[b, gi * g + gj, (pr * p + pc) * c + ch]
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------------------- decoder forward


def plain_decoder(sd: dict, tokens: torch.Tensor, heads: int, eps: float, p: int = 16) -> torch.Tensor:
    """An independent float64 ViT-MAE decoder from the state dict: explicit attention softmax, erf GELU."""
    sd = {k: v.double() for k, v in sd.items()}
    x = tokens.double() @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    b, n, d = x.shape
    x = torch.cat([sd["cls_token"].expand(b, 1, d), x], dim=1) + sd["decoder_pos_embed"]

    def ln(y, pre):
        mu = y.mean(-1, keepdim=True)
        var = ((y - mu) ** 2).mean(-1, keepdim=True)
        return (y - mu) / torch.sqrt(var + eps) * sd[pre + ".weight"] + sd[pre + ".bias"]

    def lin(y, pre):
        return y @ sd[pre + ".weight"].T + sd[pre + ".bias"]

    i = 0
    while f"decoder_layers.{i}.layernorm_before.weight" in sd:
        pre = f"decoder_layers.{i}."
        h = ln(x, pre + "layernorm_before")
        hd = d // heads
        q = lin(h, pre + "attention.attention.query").reshape(b, -1, heads, hd).permute(0, 2, 1, 3)
        k = lin(h, pre + "attention.attention.key").reshape(b, -1, heads, hd).permute(0, 2, 1, 3)
        v = lin(h, pre + "attention.attention.value").reshape(b, -1, heads, hd).permute(0, 2, 1, 3)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        attn = torch.exp(scores - scores.amax(-1, keepdim=True))
        attn = attn / attn.sum(-1, keepdim=True)
        o = (attn @ v).permute(0, 2, 1, 3).reshape(b, -1, d)
        x = x + lin(o, pre + "attention.output.dense")
        h = lin(ln(x, pre + "layernorm_after"), pre + "intermediate.dense")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + lin(h, pre + "output.dense")
        i += 1
    y = lin(ln(x, "decoder_norm"), "decoder_pred")[:, 1:]
    g = math.isqrt(n)
    img = torch.zeros(b, 3, g * p, g * p, dtype=torch.float64)
    for t in range(n):
        patch = y[:, t].reshape(b, p, p, 3).permute(0, 3, 1, 2)
        img[:, :, (t // g) * p : (t // g + 1) * p, (t % g) * p : (t % g + 1) * p] = patch
    return img


def test_decoder_matches_plain_reimplementation():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    dec = randomized(RAEDecoder(cfg)).eval()
    tokens = torch.randn(2, 16, 8)
    out = dec(tokens)
    assert out.shape == (2, 3, 64, 64)
    ref = plain_decoder(dec.state_dict(), tokens, heads=4, eps=cfg.layer_norm_eps)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_decoder_resamples_a_different_grid():
    torch.manual_seed(1)
    dec = randomized(RAEDecoder(tiny_cfg())).eval()
    tokens = torch.randn(2, 9, 8)  # a 3x3 grid into the 4x4 decoder
    out = dec(tokens)
    assert out.shape == (2, 3, 64, 64)
    grid = tokens.transpose(1, 2).reshape(2, 8, 3, 3).double()
    resampled = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
    ref = plain_decoder(dec.state_dict(), resampled.flatten(2).transpose(1, 2), heads=4, eps=1e-12)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- tokenizer


class StubEncoder(nn.Module):
    """Patch-16 conv 'encoder' on [-1, 1] images, (B, (H/16)^2, C) tokens; ``zeros`` returns all zeros."""

    def __init__(self, dim=8, zeros=False):
        super().__init__()
        self.embed_dim = dim
        self.zeros = zeros
        self.proj = nn.Conv2d(3, dim, 16, 16)

    def forward(self, images):
        t = self.proj(images).flatten(2).transpose(1, 2)
        if self.zeros:
            t = torch.zeros_like(t)
        return EncoderFeatures(cls=None, patches=t)


def make_rae(tmp_path, dim=8, grid=4, zeros=False, stats=True, tau=0.8):
    torch.manual_seed(0)
    enc = StubEncoder(dim, zeros)
    path = None
    if stats:
        mean = torch.randn(dim, grid, grid)
        var = torch.rand(dim, grid, grid) * 3 + 0.1
        path = tmp_path / "stats.pt"
        torch.save({"mean": mean, "var": var}, path)
    dec = randomized(RAEDecoder(tiny_cfg(dim, grid * grid)))
    return RAE(enc, dec, resolution=16 * grid, noise_tau=tau, stats_path=path)


def test_rae_normalisation_round_trip(tmp_path):
    rae = make_rae(tmp_path).eval()
    assert rae.latent_shape == (8, 4, 4) and rae.patch_size == 16
    x = torch.rand(2, 3, 64, 64)  # the tokenizer interface: [0, 1]; the encoder itself takes [-1, 1]
    raw_tokens = rae.encoder(x * 2 - 1).patches.detach()
    raw = raw_tokens.transpose(1, 2).reshape(2, 8, 4, 4)
    stats = torch.load(tmp_path / "stats.pt")
    z = rae.encode(x)
    torch.testing.assert_close(z, (raw - stats["mean"]) / torch.sqrt(stats["var"] + 1e-5))
    # token t = row * 4 + column of the latent grid
    torch.testing.assert_close(
        z[1, :, 2, 3] * torch.sqrt(stats["var"][:, 2, 3] + 1e-5) + stats["mean"][:, 2, 3], raw_tokens[1, 11]
    )
    images = rae.decode(z)
    assert images.shape == (2, 3, 64, 64)
    torch.testing.assert_close(images, rae.decoder(raw_tokens), rtol=1e-4, atol=1e-4)
    # no clamp in decode: the randomized decoder goes well outside [0, 1]
    assert images.min() < 0 and images.max() > 1


def test_rae_without_stats_is_identity_normalisation(tmp_path):
    rae = make_rae(tmp_path, stats=False).eval()
    x = torch.rand(1, 3, 64, 64)
    raw = rae.encoder(x * 2 - 1).patches.transpose(1, 2).reshape(1, 8, 4, 4)
    torch.testing.assert_close(rae.encode(x), raw)


def test_noise_only_in_train_mode(tmp_path):
    tau = 0.5
    rae = make_rae(tmp_path, dim=64, zeros=True, stats=False, tau=tau)
    x = torch.zeros(64, 3, 64, 64)
    rae.eval()
    assert torch.equal(rae.encode(x), torch.zeros(64, 64, 4, 4))
    rae.train()
    assert not rae.encoder.training
    torch.manual_seed(3)
    z = rae.encode(x)
    std = z.flatten(1).std(1)  # 1024 draws per sample: the estimate of sigma is within a few percent
    assert (std <= tau * 1.12).all(), std.max()
    assert std.max() > 0.7 * tau and std.min() < 0.3 * tau  # sigma varies per sample over (0, tau)
    assert abs(z.mean().item()) < 0.02
    rae.noise_tau = 0.0
    assert torch.equal(rae.encode(x), torch.zeros(64, 64, 4, 4))


def test_stats_shape_mismatch_is_one_line(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"mean": torch.zeros(8, 8, 8), "var": torch.ones(8, 8, 8)}, path)
    with pytest.raises(CheckpointError) as e:
        RAE(StubEncoder(8), RAEDecoder(tiny_cfg()), resolution=64, stats_path=path)
    msg = str(e.value)
    assert "\n" not in msg and "(8, 8, 8)" in msg and "(8, 4, 4)" in msg


# --------------------------------------------------------------------------------------------- statistics


def test_stats_accumulator_matches_numpy_and_merges_exactly(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(60, 3, 4, 4)) * rng.uniform(0.1, 5, size=(1, 3, 4, 4))
    ref_mean, ref_var = data.mean(0), data.var(0)  # population (ddof=0)

    def run(splits, batch):
        shards = []
        for lo, hi in zip(splits[:-1], splits[1:], strict=True):
            s = LatentStats()
            for i in range(lo, hi, batch):
                s.update(torch.from_numpy(data[i : min(i + batch, hi)]))
            # through the all-gather format
            shards.append(LatentStats.from_state(s.state(), (3, 4, 4)))
        return LatentStats.merged(shards).finalize()

    results = [run([0, 10, 35, 60], 4), run([0, 30, 31, 60], 7), run([0, 1, 2, 60], 60)]
    for r in results:
        assert r["mean"].dtype == torch.float64
        np.testing.assert_allclose(r["mean"].numpy(), ref_mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(r["var"].numpy(), ref_var, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(r["var"].numpy(), results[0]["var"].numpy(), rtol=1e-12, atol=0)
    assert not np.allclose(results[0]["var"].numpy(), data.var(0, ddof=1), rtol=1e-6)

    s = LatentStats().update(torch.from_numpy(data).float())
    saved = s.save(tmp_path / "stats.pt")
    loaded = torch.load(tmp_path / "stats.pt")
    assert set(loaded) == {"mean", "var"} and loaded["var"].shape == (3, 4, 4)
    torch.testing.assert_close(loaded["var"], saved["var"])
    with pytest.raises(ValueError):
        s.update(torch.zeros(2, 3, 4, 5))


def test_pretrained_decoder_loading(tmp_path):
    src = randomized(RAEDecoder(tiny_cfg()), seed=5)
    sd = {k: v for k, v in src.state_dict().items() if k != "decoder_pos_embed"}
    torch.save({"model": sd}, tmp_path / "decoder.pt")
    rae = RAE(
        StubEncoder(8), RAEDecoder(tiny_cfg()), resolution=64, pretrained_decoder_path=tmp_path / "decoder.pt"
    )
    for k, v in src.state_dict().items():
        assert torch.equal(rae.decoder.state_dict()[k], v), k
    del sd["decoder_pred.bias"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="decoder_pred.bias"):
        RAE(
            StubEncoder(8), RAEDecoder(tiny_cfg()), resolution=64, pretrained_decoder_path=tmp_path / "bad.pt"
        )
