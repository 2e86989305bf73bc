"""`nanogen compute-stats` (RAE latent statistics, spec §6.4) and `nanogen extract-latents` (pre-encoded latent
shards that `nanogen train` reads through dataset.latents_dir), with tiny saved encoders / VAEs on CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import one_line_error
from nanogen.cli import main
from nanogen.encoders.base import EncoderFeatures, env_key
from nanogen.latents.base import to_unit
from nanogen.latents.rae import RAE, RAEDecoder, ViTDecoderConfig
from nanogen.latents.stats import LatentStats

diffusers = pytest.importorskip("diffusers")

NANO = "configs/stage2/training/nano/ddt-xs-pixel-xpred-t4c8.yaml"
N_IMAGES = 64  # the nano training set, cut down so every test encodes it in well under a second


# ----------------------------------------------------------------------------------------------- fixtures


class StubEncoder(nn.Module):
    """Patch-16 conv 'encoder' on [-1, 1] images -> (B, (H/16)^2, C) tokens."""

    def __init__(self, dim=8):
        super().__init__()
        self.embed_dim = dim
        self.proj = nn.Conv2d(3, dim, 16, 16)

    def forward(self, images):
        return EncoderFeatures(cls=None, patches=self.proj(images).flatten(2).transpose(1, 2) * 3 + 1)


def stub_rae(tmp_path=None, dim=8, grid=2, tau=0.8) -> RAE:
    torch.manual_seed(0)
    path = None
    if tmp_path is not None:
        path = tmp_path / "stats.pt"
        torch.save({"mean": torch.randn(dim, grid, grid), "var": torch.rand(dim, grid, grid) + 0.5}, path)
    dec = RAEDecoder(ViTDecoderConfig(dim, 16, 1, 2, 32, image_size=16 * grid))
    return RAE(StubEncoder(dim), dec, resolution=16 * grid, noise_tau=tau, stats_path=path)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=0.5,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    patch_size=14, image_size=28, num_register_tokens=4)  # fmt: skip
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2WithRegistersModel(cfg).save_pretrained(path)
    return path


@pytest.fixture
def small_data(monkeypatch):
    """The first N_IMAGES nano training digits stand in for the whole training set (train and both tools)."""
    import nanogen.build
    from nanogen.data.nano import load_nano

    ds = load_nano("train", 32)
    images, labels = ds.images[:N_IMAGES].clone(), ds.labels[:N_IMAGES].clone()

    def load(cfg):
        return images, labels

    monkeypatch.setattr(nanogen.build, "load_train_images", load)
    return images, labels


def vae_args(vae_dir, tmp_path, *extra):
    return ["-c", NANO, "stage_1.target=vae", "stage_1.params={vae_type: sdvae-ema, resolution: 32}",
            f"misc.weights={{sdvae-ema: {vae_dir}}}", "misc.latent_size=[4,16,16]", "stage_2.params.patch_size=[2,2]",
            "stage_2.params.hidden_size=[32,32]", "stage_2.params.depth=[1,1]", "stage_2.params.num_heads=[2,2]",
            "transport.prediction=velocity", "training.max_steps=2", "training.batch_size=4", "eval=null",
            "sampler.num_steps=2", f"run.results_dir={tmp_path}", *extra]  # fmt: skip


def vae_cfg(vae_dir, tmp_path, *extra):
    from nanogen.config import load_config

    args = vae_args(vae_dir, tmp_path, *extra)
    return load_config(args[1], args[2:])


# ------------------------------------------------------------------------------------------ RAE encode_raw


def test_encode_raw_is_encode_without_noise_and_normalisation(tmp_path):
    rae = stub_rae(tmp_path)
    x = torch.rand(3, 3, 32, 32)
    tokens = rae.encoder(x * 2 - 1).patches.detach()  # (B, N, C)
    raw = rae.encode_raw(x)
    torch.testing.assert_close(raw, tokens.transpose(1, 2).reshape(3, 8, 2, 2), rtol=0, atol=0)
    assert rae.training and torch.equal(rae.encode_raw(x), raw)  # train mode: still no noise
    stats = torch.load(tmp_path / "stats.pt")
    norm = lambda z: (z - stats["mean"]) / torch.sqrt(stats["var"] + 1e-5)
    torch.testing.assert_close(rae.eval().encode(x), norm(raw))
    # train mode: the noise is the one the reference adds to the (B, N, C) tokens before the reshape
    rae.train()
    torch.manual_seed(5)
    z = rae.encode(x)
    torch.manual_seed(5)
    sigma = torch.rand(3, 1, 1) * 0.8
    noisy = tokens + sigma * torch.randn_like(tokens)
    torch.testing.assert_close(z, norm(noisy.transpose(1, 2).reshape(3, 8, 2, 2)))


# --------------------------------------------------------------------------------------------- statistics


def test_stats_are_the_population_moments_of_the_raw_latents():
    from nanogen.latents.extract import accumulate_stats

    rae = stub_rae().eval()
    torch.manual_seed(1)
    images = torch.rand(50, 3, 32, 32) * 2 - 1
    raw = rae.encode_raw(to_unit(images)).double().numpy()
    s = accumulate_stats(rae, images, batch_size=8, device=torch.device("cpu"))
    assert s.count == 50
    res = s.finalize()
    np.testing.assert_allclose(res["mean"].numpy(), raw.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res["var"].numpy(), raw.var(0), rtol=1e-5, atol=1e-6)  # ddof = 0
    assert not np.allclose(res["var"].numpy(), raw.var(0, ddof=1), rtol=1e-3)
    # two "ranks" (strided halves), merged, give the single pass
    parts = [accumulate_stats(rae, images, 8, torch.device("cpu"), rank=r, world_size=2) for r in (0, 1)]
    assert [p.count for p in parts] == [25, 25]
    merged = LatentStats.merged(parts).finalize()
    for k in ("mean", "var"):
        torch.testing.assert_close(merged[k], res[k], rtol=1e-6, atol=1e-7)
    # and on identical latents, a 2-part merge is the single pass up to float64 rounding
    raw_t = torch.from_numpy(raw)
    two = LatentStats().update(raw_t[:17]).merge(LatentStats().update(raw_t[17:])).finalize()
    one = LatentStats().update(raw_t).finalize()
    for k in ("mean", "var"):
        torch.testing.assert_close(two[k], one[k], rtol=1e-12, atol=1e-12)


def stage1_yaml(tmp_path) -> str:
    dec = tmp_path / "decoder.json"
    dec.write_text(json.dumps({"decoder_hidden_size": 16, "decoder_num_hidden_layers": 1,
                               "decoder_num_attention_heads": 2, "decoder_intermediate_size": 32}))  # fmt: skip
    path = tmp_path / "stage1.yaml"
    path.write_text(
        "stage_1:\n  target: rae\n  params:\n    encoder_name: dinov2-vit-b\n    resolution: 32\n"
        f"    decoder_config_path: {dec}\n    normalization_stat_path: {tmp_path / 'not-computed-yet.pt'}\n"
        "dataset: {target: mnist, type: builtin, split: train}\ntraining: {image_size: 32}\n"
        f"run: {{results_dir: {tmp_path / 'results'}}}\ngan: {{}}\n"
    )
    return str(path)


def test_compute_stats_cli_on_a_stage1_rae_config(tmp_path, tiny_dinov2, small_data, monkeypatch, capsys):
    from nanogen.latents.extract import build_any_tokenizer, is_stage1_config, load_any_config

    monkeypatch.setenv(env_key("dinov2-vit-b"), str(tiny_dinov2))
    cfg_path = stage1_yaml(tmp_path)
    assert is_stage1_config(cfg_path) and not is_stage1_config(NANO)
    assert main(["compute-stats", "-c", cfg_path, "--batch-size", "16"]) == 0
    out = tmp_path / "results" / "stats" / "dinov2-vit-b-32px-mnist.pt"  # the default --out
    assert str(out) in capsys.readouterr().out
    saved = torch.load(out)
    assert set(saved) == {"mean", "var"} and saved["mean"].shape == (32, 2, 2) and saved["var"].dtype == torch.float32

    tok = build_any_tokenizer(load_any_config(cfg_path), ignore_stats=True)
    raw = tok.encode_raw(to_unit(small_data[0])).double().numpy()  # independent: one pass, numpy moments
    np.testing.assert_allclose(saved["mean"].numpy(), raw.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(saved["var"].numpy(), raw.var(0), rtol=1e-4, atol=1e-6)

    # --compare: same data -> zero difference; a shifted reference -> its shift
    assert main(["compute-stats", "-c", cfg_path, "--out", str(tmp_path / "again.pt"), "--compare", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mean: max |diff| 0.000e+00" in text and "var:  max |diff| 0.000e+00" in text, text
    torch.save({"mean": saved["mean"] + 0.25, "var": saved["var"]}, tmp_path / "shifted.pt")
    assert main(["compute-stats", "-c", cfg_path, "--out", str(tmp_path / "again.pt"),
                 "--compare", str(tmp_path / "shifted.pt")]) == 0  # fmt: skip
    assert "mean: max |diff| 2.500e-01" in capsys.readouterr().out
    # errors: one line, exit 2 (transformers' "Loading weights" bar would add a stderr line of its own)
    monkeypatch.setattr("transformers.utils.logging._tqdm_active", False)
    torch.save({"mean": torch.zeros(3, 4, 4), "var": torch.ones(3, 4, 4)}, tmp_path / "other.pt")
    one_line_error(capsys, ["compute-stats", "-c", cfg_path, "--compare", str(tmp_path / "other.pt")],
                   "(3, 4, 4)", "(32, 2, 2)")  # fmt: skip
    one_line_error(capsys, ["compute-stats", "-c", cfg_path, "--compare", str(tmp_path / "none.pt")],
                   "stats file not found", "none.pt")  # fmt: skip
    one_line_error(capsys, ["compute-stats", "-c", cfg_path, "--num", "0"], "--num: must be at least 1")
    one_line_error(capsys, ["extract-latents", "-c", cfg_path], "stage-1 config", "stage-2 config")


def test_compute_stats_on_a_stage2_vae_config(tmp_path, tiny_vae, small_data):
    from nanogen.build import build_tokenizer

    out = tmp_path / "vae-stats.pt"
    # --num-images: the spelling of --num that survives torchrun's own option parser
    assert main(["compute-stats", *vae_args(tiny_vae, tmp_path), "--num-images", "40", "--out", str(out)]) == 0
    saved = torch.load(out)
    from nanogen.latents.extract import subset

    idx = subset(N_IMAGES, 40, seed=42)  # dataset.seed of the nano preset
    assert len(idx) == 40 and torch.equal(idx, idx.sort().values)
    z = build_tokenizer(vae_cfg(tiny_vae, tmp_path)).encode(to_unit(small_data[0][idx])).double()
    torch.testing.assert_close(saved["mean"].double(), z.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(saved["var"].double(), z.var(0, unbiased=False), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------- latent shards


def test_extract_latents_match_encode_and_resume(tmp_path, tiny_vae, small_data, capsys):
    from safetensors.torch import load_file

    from nanogen.build import build_tokenizer

    images, labels = small_data
    d = tmp_path / "lat"
    args = [*vae_args(tiny_vae, tmp_path), "--out", str(d), "--flip", "--shard-size", "24", "--batch-size", "8"]
    assert main(["extract-latents", *args]) == 0
    assert f"dataset.latents_dir={d}" in capsys.readouterr().out
    meta = json.loads((d / "meta.json").read_text())
    assert (meta["count"], meta["num_shards"], meta["flip"], meta["dtype"]) == (N_IMAGES, 3, True, "float32")
    assert meta["config"]["stage_1.params"]["vae_type"] == "sdvae-ema" and meta["config"]["misc.latent_size"] == [4, 16, 16]
    shards = [load_file(d / f"shard-{i:05d}.safetensors") for i in range(3)]
    assert [len(s["index"]) for s in shards] == [24, 24, 16]
    data = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    assert torch.equal(data["index"], torch.arange(N_IMAGES)) and torch.equal(data["labels"], labels)

    tok = build_tokenizer(vae_cfg(tiny_vae, tmp_path)).eval()
    for i in range(0, N_IMAGES, 8):  # the same batches as the extraction: bit-identical
        x = to_unit(images[i : i + 8])
        assert torch.equal(data["latents"][i : i + 8], tok.encode(x)), i
        assert torch.equal(data["latents_flip"][i : i + 8], tok.encode(x.flip(-1))), i
    assert not torch.allclose(data["latents"], data["latents_flip"])

    # rerun: complete shards are skipped, a missing one is redone identically
    mtimes = {i: (d / f"shard-{i:05d}.safetensors").stat().st_mtime_ns for i in range(3)}
    (d / "shard-00001.safetensors").unlink()
    assert main(["extract-latents", *args]) == 0
    assert "(40 already there)" in capsys.readouterr().out
    assert all((d / f"shard-{i:05d}.safetensors").stat().st_mtime_ns == mtimes[i] for i in (0, 2))
    redone = load_file(d / "shard-00001.safetensors")
    assert torch.equal(redone["latents"], shards[1]["latents"]) and torch.equal(redone["index"], shards[1]["index"])
    one_line_error(capsys, ["extract-latents", *args[:-4], "--shard-size", "32"], "other settings", "shard_size")
    assert not list(d.glob(".*tmp*"))


def test_flip_choice_is_resumable_and_consistent(tmp_path, tiny_vae, small_data):
    from nanogen.data.latent_shards import LatentBatches, load_shards, read_meta

    images, _ = small_data
    d = tmp_path / "lat"
    assert main(["extract-latents", *vae_args(tiny_vae, tmp_path), "--out", str(d), "--flip", "--batch-size", "4"]) == 0
    data = load_shards(d, read_meta(d))
    a = LatentBatches(data, batch_size=4, seed=42, images=images)
    it = iter(a)
    first = [next(it) for _ in range(20)]  # 16 batches per epoch: crosses an epoch boundary
    b = LatentBatches(data, batch_size=4, seed=42, images=images)
    it_b = iter(b)
    for _ in range(7):
        next(it_b)
    c = LatentBatches(data, batch_size=4, seed=42, images=images)
    c.load_state_dict(b.state_dict())
    for want, got in zip(first[7:], iter(c), strict=False):
        assert all(torch.equal(u, v) for u, v in zip(want, got, strict=True))
    flips = torch.cat([a.flip_mask(0), a.flip_mask(1)]).float().mean()
    assert 0.3 < flips < 0.7 and not torch.equal(a.flip_mask(0), a.flip_mask(1))
    # every batch: the latents are the encode of the (possibly mirrored) images that come with them
    from nanogen.build import build_tokenizer

    tok = build_tokenizer(vae_cfg(tiny_vae, tmp_path)).eval()
    plain, mirrored = 0, 0
    for z, _, x in first:
        assert torch.equal(z, tok.encode(to_unit(x)))
        plain += sum(any(torch.equal(xi, im) for im in images) for xi in x)
        mirrored += sum(any(torch.equal(xi, im.flip(-1)) for im in images) for xi in x)
    assert plain + mirrored == 80 and 20 < mirrored < 60, (plain, mirrored)


def test_same_loss_on_the_fly_and_from_shards(tmp_path, tiny_vae, small_data):
    """The objective sees bit-identical latents, so the loss is identical; `nanogen train` logs the same loss."""
    from nanogen.build import build_conditioner, build_network, build_objective, build_tokenizer
    from nanogen.data.latent_shards import LatentBatches, load_shards, read_meta

    images, _ = small_data
    d = tmp_path / "lat"
    assert main(["extract-latents", *vae_args(tiny_vae, tmp_path), "--out", str(d)]) == 0  # batch: the training 4
    cfg = vae_cfg(tiny_vae, tmp_path)
    tok, cond = build_tokenizer(cfg).eval(), build_conditioner(cfg)
    torch.manual_seed(0)
    objective = build_objective(cfg, build_network(cfg))
    null = cond.null(1, torch.device("cpu"))
    meta = read_meta(d)
    batches = iter(LatentBatches(load_shards(d, meta), 4, cfg.dataset.seed, images=images))
    for _ in range(3):
        z_shard, y, x = next(batches)
        with torch.no_grad():
            z_fly = tok.encode(to_unit(x), check=False)
        losses = []
        assert torch.equal(z_fly, z_shard)
        # the VAE's convs return channels-last latents, the shards contiguous ones: the objective's noise
        # (drawn in logical order) and so the loss must not depend on that
        assert z_fly.is_contiguous(memory_format=torch.channels_last) and z_shard.is_contiguous()
        for z in (z_fly, z_shard, z_shard + 1e-3):
            torch.manual_seed(7)
            losses.append(objective(z, cond(y), null, images=x)["loss"].detach())
        assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])

    # the whole loop: same batches, same noise, same logged loss
    assert main(["train", *vae_args(tiny_vae, tmp_path, "run.name=fly")]) == 0
    assert main(["train", *vae_args(tiny_vae, tmp_path, "run.name=shards", f"dataset.latents_dir={d}")]) == 0
    loss = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[-1])["loss"] for n in ("fly", "shards")]
    assert loss[0] == loss[1] and math.isfinite(loss[0])


def test_latents_dir_errors_are_one_line(tmp_path, tiny_vae, small_data, capsys):
    d = tmp_path / "lat"
    assert main(["extract-latents", *vae_args(tiny_vae, tmp_path), "--out", str(d), "--shard-size", "32"]) == 0
    train = ["train", *vae_args(tiny_vae, tmp_path, f"dataset.latents_dir={d}")]
    one_line_error(capsys, [*train, "stage_1.params.sample_mode=sample"],
                   "stage_1.params.sample_mode", '"mode"', '"sample"', "extract-latents")  # fmt: skip
    one_line_error(capsys, [*train, "training.image_size=64"], "training.image_size", "extract-latents")
    one_line_error(capsys, [*train[:-1], f"dataset.latents_dir={tmp_path / 'none'}"], "cannot read", "extract-latents")
    # bfloat16 storage: half the bytes, the same latents to bf16 precision, float32 batches for the objective
    from nanogen.data.latent_shards import LatentBatches, load_shards, read_meta

    b16 = tmp_path / "lat16"
    assert main(["extract-latents", *vae_args(tiny_vae, tmp_path), "--out", str(b16), "--dtype", "bfloat16"]) == 0
    full, half = load_shards(d, read_meta(d)), load_shards(b16, read_meta(b16))
    assert half["latents"].dtype == torch.bfloat16 and torch.equal(half["latents"].float(), full["latents"].bfloat16().float())
    z, _, _ = next(iter(LatentBatches(half, 4, seed=0)))
    assert z.dtype == torch.float32
    (d / "shard-00001.safetensors").unlink()
    one_line_error(capsys, train, "incomplete", "1 of 2 shards", "extract-latents")
    assert not (tmp_path / "ddt-xs-pixel-xpred-t4c8" / "checkpoints").exists()
