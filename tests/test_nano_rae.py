"""The nano RAE latent space: the nano-mix stage-1 data, the project-trained encoder nano-vit-s (shapes, export
round trip, registration), the RAE with decoder patch 4 on it, and REG with its CLS token."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import nanogen.data.nano_mix as nano_mix
from nanogen.build import build_conditioner, build_network, build_objective, load_frozen, load_train_images
from nanogen.config import builtin_configs_dir, load_config, load_stage1_config
from nanogen.data.nano import load_nano
from nanogen.data.nano_scenes import make_scenes
from nanogen.encoders import build_encoder, encoder_width
from nanogen.encoders.base import default_source
from nanogen.encoders.nano import (
    NanoEncoder,
    NanoViT,
    NanoViTConfig,
    patchify,
    train_nano_encoder,
)
from nanogen.errors import ConfigError, NotAvailableError, UserError
from nanogen.latents.rae import RAE, RAEDecoder, RAEParams, ViTDecoderConfig, from_params, unpatchify

NANO_DDT = "configs/stage2/training/nano/ddt-xs-pixel-xpred-t4c8.yaml"


REAL_LOAD_MIX = nano_mix.load_nano_mix  # before any test patches it


@pytest.fixture(scope="module")
def mix_train():
    return REAL_LOAD_MIX("train")  # 4,500 scenes to draw: the slowest step here (a few seconds), done once


@pytest.fixture(scope="module")
def mix_heldout():
    return REAL_LOAD_MIX("heldout")


def cached_mix(mix_train):
    return lambda split, *a, **k: mix_train if split == "train" else REAL_LOAD_MIX(split, *a, **k)


@pytest.fixture(scope="module")
def export(mix_train, tmp_path_factory):
    """A 2-step training run, plus the state it exported as held in memory (for the exact round trip)."""
    from nanogen.encoders import nano

    out = tmp_path_factory.mktemp("enc") / "nano-encoder"
    captured, real_write = {}, nano._write_export

    def write(o, state, meta):
        captured.update(state={k: v.clone() for k, v in state.items()}, meta=meta)
        real_write(o, state, meta)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nano_mix, "load_nano_mix", cached_mix(mix_train))
        mp.setattr(nano, "_write_export", write)
        assert train_nano_encoder(out, steps=2, batch_size=4, seed=0, progress=False) == out
    return out, captured


def random_encoder(seed=0) -> NanoEncoder:
    torch.manual_seed(seed)
    return NanoEncoder(NanoViT(NanoViTConfig()))


# --------------------------------------------------------------------------------------------- nano-mix


def test_nano_mix_alternates_both_tiers_deterministically(mix_train, mix_heldout):
    held = mix_heldout
    assert held.images.shape == (1000, 3, 32, 32) and mix_train.images.shape == (9000, 3, 32, 32)
    digits = load_nano("heldout")
    assert torch.equal(held.images[0::2], digits.images) and torch.equal(held.labels[0::2], digits.labels)
    scenes = make_scenes("heldout", 500, seed=nano_mix.HELDOUT_SCENE_SEED)
    assert torch.equal(held.images[1::2], scenes.images.float() / 127.5 - 1)
    assert (held.labels[1::2] == nano_mix.NO_LABEL).all()
    # train: all 4,500 training digits, and the opening of the nano-scenes training set (dataset.seed 42)
    assert torch.equal(mix_train.images[0::2], load_nano("train").images)
    assert torch.equal(mix_train.images[1:32:2], make_scenes("train", 16, seed=42).images.float() / 127.5 - 1)
    assert (mix_train.labels[1::2] == -1).all() and (mix_train.labels[0::2] >= 0).all()
    # (deterministic: equal to the deterministic digit split and scene renderer, test_nano_scenes.py)
    # the scenes are coloured: some pixels have unequal channels, which no digit has
    colour = lambda x: (x.amax(1) - x.amin(1)).amax((1, 2)) > 0.5  # noqa: E731
    assert not colour(held.images[0::2]).any() and colour(held.images[1::2]).sum() > 250


def test_nano_mix_is_stage1_data_only(tmp_path, mix_heldout):
    cfg = load_stage1_config("configs/stage1/nano/nano-rae.yaml", [f"run.results_dir={tmp_path}", "dataset.split=heldout"])
    images, _ = load_train_images(cfg)
    assert torch.equal(images, mix_heldout.images)
    from nanogen.stage1.evaluate import load_eval_images

    ev = load_eval_images("nano-mix", cfg.eval.datasets["nano-mix"], 32, limit=6)
    assert torch.equal(ev, (images[:6] + 1) / 2)  # the first six alternate digit / scene
    s2 = load_config(NANO_DDT, ["dataset.target=nano-mix"])
    from nanogen.data import check_kind

    with pytest.raises(UserError, match="for stage 1") as e:
        check_kind(s2)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="for stage 1"):
        load_train_images(s2)  # extract-latents / compute-stats with a stage-2 config


# ------------------------------------------------------------------------------------------------ encoder


def test_encoder_shapes_width_and_non_affine_output():
    assert encoder_width("nano-vit-s") == 48 and default_source("nano-vit-s") == "results/nano-encoder"
    enc = random_encoder()
    assert (enc.embed_dim, enc.input_size) == (48, 32) and not any(p.requires_grad for p in enc.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    f = enc(x)
    assert f.cls.shape == (2, 48) and f.patches.shape == (2, 64, 48)
    tokens = torch.cat([f.cls[:, None], f.patches], 1)
    assert tokens.mean(-1).abs().max() < 1e-5  # LayerNorm without affine: zero mean, unit variance per token
    assert (tokens.var(-1, unbiased=False) - 1).abs().max() < 1e-3
    assert enc(torch.nn.functional.interpolate(x, size=64)).patches.shape == (2, 64, 48)  # resized to 32
    # the patch order of the pixel target is the RAE decoder's
    img = torch.randn(3, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(img, 4), 4), img)
    assert torch.equal(patchify(img, 4)[1, 9], img[1, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))  # row 1, col 1


def test_export_round_trip_is_exact_and_found_by_name(export, monkeypatch, tmp_path):
    out, captured = export
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = captured["meta"]
    assert meta["arch"]["width"] == 48 and meta["training"]["steps"] == 2
    assert 0 <= meta["training"]["heldout_cls_accuracy"] <= 1 and meta["training"]["final_losses"]["mim"] > 0
    assert not any(k.startswith(("cls_head", "pix_head", "mask")) for k in captured["state"])  # encoder only
    loaded = build_encoder("nano-vit-s", str(out))
    assert loaded.model.state_dict().keys() == captured["state"].keys()
    assert all(torch.equal(v, captured["state"][k]) for k, v in loaded.model.state_dict().items())
    ref = NanoViT(NanoViTConfig())
    ref.load_state_dict(captured["state"])
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    a, b = NanoEncoder(ref)(x), loaded(x)
    assert torch.equal(a.cls, b.cls) and torch.equal(a.patches, b.patches)
    monkeypatch.setenv("NANOGEN_ENCODER_NANO_VIT_S", str(out))  # the env var, as misc.weights, names the export
    assert torch.equal(build_encoder("nano-vit-s")(x).patches, b.patches)
    monkeypatch.delenv("NANOGEN_ENCODER_NANO_VIT_S")
    with pytest.raises(NotAvailableError) as e:
        build_encoder("nano-vit-s", str(tmp_path / "missing"))
    msg = str(e.value)
    assert "\n" not in msg and "nanogen train-encoder" in msg and "misc.weights.nano-vit-s" in msg


def test_training_is_deterministic_and_never_replaces_other_files(export, mix_train, tmp_path, monkeypatch):
    out, captured = export
    monkeypatch.setattr(nano_mix, "load_nano_mix", cached_mix(mix_train))
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "model.safetensors").write_bytes(b"an older export")
    train_nano_encoder(again, steps=2, batch_size=4, seed=0, progress=False)  # replaces the previous export
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()  # same seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary directory left behind
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="holds other files") as e:
        train_nano_encoder(tmp_path / "busy", steps=1, batch_size=2, progress=False)
    assert "\n" not in str(e.value) and (tmp_path / "busy" / "notes.txt").read_text() == "keep"


def test_train_encoder_command_line(tmp_path, capsys, monkeypatch):
    import nanogen.encoders.nano as nano
    from nanogen.cli import cmd_train_encoder, main, make_parser

    p = make_parser()
    a = p.parse_args(["train-encoder", "--steps", "5", "--batch-size", "8", "--seed", "3", "--out", "x"])
    assert (a.fn, a.steps, a.batch_size, a.seed, a.out) == (cmd_train_encoder, 5, 8, 3, "x")
    d = p.parse_args(["train-encoder"])
    assert (d.out, d.steps, d.batch_size, d.seed) == (nano.DEFAULT_OUT, nano.DEFAULT_STEPS, nano.DEFAULT_BATCH, 0)
    text = p._subparsers._group_actions[0].choices["train-encoder"].format_help()
    assert "configs/stage1/nano/nano-rae.yaml" in text and "repa.target_encoder=nano-vit-s" in text
    seen = {}
    monkeypatch.setattr(nano, "train_nano_encoder", lambda out, **k: seen.update(out=out, **k))
    assert main(["train-encoder", "--steps", "7", "--out", str(tmp_path / "e")]) == 0
    assert seen == {"out": str(tmp_path / "e"), "steps": 7, "batch_size": nano.DEFAULT_BATCH, "seed": 0}


# ---------------------------------------------------------------------------------------------------- RAE


def test_rae_on_nano_encoder_with_decoder_patch_4(export):
    enc = random_encoder()
    cfg = ViTDecoderConfig(hidden_size=48, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                           decoder_num_attention_heads=4, decoder_intermediate_size=64, patch_size=4, image_size=32)  # fmt: skip
    rae = RAE(enc, RAEDecoder(cfg), resolution=32, noise_tau=0.0, decoder_patch_size=4).eval()
    assert (rae.latent_shape, rae.patch_size, rae.num_tokens) == ((48, 8, 8), 4, 64)
    x = torch.rand(2, 3, 32, 32)
    z = rae.encode(x)
    assert z.shape == (2, 48, 8, 8) and rae.decode(z).shape == (2, 3, 32, 32)
    # the latent grid is the encoder's patch tokens, row-major: token 8 * i + j at (i, j)
    patches = enc(x * 2 - 1).patches
    assert torch.equal(z[:, :, 2, 5], patches[:, 8 * 2 + 5])
    # from a config: the nano decoder JSON is built for patch 4, 32 px, the encoder's width
    params = RAEParams(encoder_name="nano-vit-s", resolution=32, decoder_config_path="configs/decoder/nano/config.json",
                       decoder_patch_size=4, noise_tau=0.8)  # fmt: skip
    params.check()
    tok = from_params(params, {"nano-vit-s": str(export[0])})
    c = tok.decoder.config
    assert (c.hidden_size, c.patch_size, c.image_size, c.grid_size) == (48, 4, 32, 8)
    assert tok.latent_shape == (48, 8, 8) and tok.decoder.decoder_pred.out_features == 4 * 4 * 3
    with pytest.raises(ConfigError, match="multiple of decoder_patch_size 5"):
        RAEParams(encoder_name="nano-vit-s", resolution=32, decoder_patch_size=5).check()


def test_latent_component_and_stage1_recipe_agree(tmp_path):
    s1 = load_stage1_config("configs/stage1/nano/nano-rae.yaml")
    assert s1.stage_1.params["encoder_name"] == "nano-vit-s" and s1.dataset.target == "nano-mix"
    assert s1.gan.loss.disc_weight == 0 and s1.gan.loss.perceptual_weight == 0 and s1.stage_1.params["noise_tau"] == 0.8
    root = builtin_configs_dir()
    dec = json.loads((root / "decoder/nano/config.json").read_text())
    sizes = [dec[f"decoder_{k}"] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")]
    assert sizes == [2, 128, 4, 512] and (dec["patch_size"], dec["image_size"], dec["hidden_size"]) == (4, 32, 48)
    yaml = tmp_path / "m.yaml"
    yaml.write_text(f"defaults: [{root / 'stage2/training/nano/ddt-xs-pixel-xpred-t4c8.yaml'}, "
                    f"{root / 'stage2/components/latents/rae-nano.yaml'}]\n")  # fmt: skip
    for task in ("nano", "nano-t2i"):
        cfg = load_config(str(yaml), [f"task={task}", "transport.prediction=velocity"])
        p = cfg.stage_1.params
        assert cfg.misc.latent_size == [48, 8, 8] and cfg.stage_2.params["in_channels"] == 48
        assert cfg.misc.time_dist_shift_dim == 48 * 8 * 8 == 3 * 32 * 32 and p["noise_tau"] == 0.0
        assert (p["resolution"], p["decoder_patch_size"]) == (s1.stage_1.params["resolution"], 4)
        assert p["decoder_config_path"] == s1.stage_1.params["decoder_config_path"]
        assert p["pretrained_decoder_path"] == f"{s1.run.results_dir}/{s1.run.name}/export/decoder.pt"
        assert p["normalization_stat_path"] == f"{s1.run.results_dir}/stats/nano-vit-s-32px-nano-mix.pt"


# ---------------------------------------------------------------------------------------------------- REG


def test_reg_with_nano_encoder_builds_and_matches_the_closed_form(export):
    cfg = load_config(NANO_DDT, ["repa.use_reg=true", "repa.target_encoder=nano-vit-s",
                                 f"misc.weights={{nano-vit-s: {export[0]}}}"])  # fmt: skip
    assert cfg.repa.z_dim == 48 and cfg.stage_2.params["enable_reg"] and cfg.transport.prediction == "x"
    net = build_network(cfg)
    frozen = load_frozen(cfg)
    assert isinstance(frozen.encoder, NanoEncoder) and net.cls_in_proj_dec.in_features == 48
    obj = build_objective(cfg, net, frozen)
    cond = build_conditioner(cfg)
    x = load_nano("heldout").images[:4]
    torch.manual_seed(0)
    t = obj.sample_t(4, "cpu")  # the objective's first draw
    torch.manual_seed(0)
    out = obj(x, cond(torch.arange(4)), cond.null(1, torch.device("cpu")), images=x)
    # the REG head is zero at init, so x-prediction gives v_cls_hat - v_cls = cls / max(t, t_eps) (§4.4)
    cls = frozen.encoder(x).cls
    expected = cfg.repa.reg_coeff * (cls / t[:, None].clamp_min(obj.t_eps)).pow(2).mean()
    torch.testing.assert_close(out["loss_reg"], expected, rtol=1e-5, atol=0)
