"""Stage-1 training and evaluation (spec reference.md §6.7-6.8): the loss wiring against hand computations, the
epoch schedule, resume, export to a stage-2 latent space, eval-stage1, and the one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from conftest import one_line_error
from nanogen.cli import main
from nanogen.config import load_stage1_config
from nanogen.config.schema import GanLossConfig
from nanogen.stage1.disc import ViT
from nanogen.stage1.gan_losses import hinge_d_loss, quantize_8bit
from nanogen.stage1.train import discriminator_loss, generator_loss
from test_perceptual import seeded_lin, seeded_vgg

NANO = "configs/stage1/nano/nano-vae.yaml"
# a tiny KL-VAE on 16 px digits: 2 levels (/2), 8 channels
COMMON = [
    "training.image_size=16", "training.batch_size=8", "training.log_interval=1", "training.sample_every=0",
    "eval.datasets.mnist.num_samples=16", "eval.datasets.mnist.batch_size=8",
    "eval.datasets.mnist.metrics=[psnr, ssim]",
]  # fmt: skip
TINY = ["stage_1.params={resolution: 16, block_out_channels: [8, 8], layers_per_block: 1, latent_channels: 4, norm_num_groups: 4}",
        *COMMON]  # fmt: skip


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ loss wiring


class _Disc(torch.nn.Module):
    """A stand-in discriminator with the real interface: ``heads`` (trainable) and ``forward(x in [-1, 1])``."""

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.heads(x.mean((2, 3)))


def test_generator_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, 3, 1)  # the "last decoder layer"
    x01 = torch.rand(4, 3, 8, 8)
    recon = layer(torch.rand(4, 3, 8, 8))
    lpips = lambda a, b: (a - b).square().mean((1, 2, 3))  # noqa: E731  a differentiable LPIPS stand-in
    disc, ident = _Disc(), torch.nn.Identity()
    gl = GanLossConfig(perceptual_weight=0.5, disc_weight=0.75, disc_start=1, lpips_start=0)
    aux = {"kl": torch.tensor(30.0)}
    total, parts = generator_loss(recon, x01, aux, gl, epoch=1, lpips=lpips, disc=disc, augment=ident,
                                  last_layer=layer.weight, kl_weight=1e-3)  # fmt: skip
    l1 = (recon - x01).abs().mean()
    lp = ((x01 * 2 - 1) - (recon * 2 - 1)).square().mean()
    g = -disc(recon * 2 - 1).mean()  # vanilla generator loss
    l_rec = l1 + 0.5 * lp  # the adaptive weight balances L1 + LPIPS only (no KL)
    g_rec = torch.autograd.grad(l_rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g, layer.weight, retain_graph=True)[0]
    lam = g_rec.norm() / (g_gan.norm() + 1e-6)
    expected = l_rec + 1e-3 * 30.0 + 0.75 * lam * g
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["d_weight"], lam)
    assert not parts["d_weight"].requires_grad  # detached, as the reference
    assert disc.heads.weight.requires_grad  # restored for the discriminator step
    total.backward()
    assert disc.heads.weight.grad is None  # the generator step never trains the discriminator
    # before disc_start / lpips_start: no GAN, no LPIPS term
    gl.lpips_start = 2
    total0, parts0 = generator_loss(recon, x01, {}, gl, epoch=0, lpips=lpips, disc=disc, augment=ident,
                                    last_layer=layer.weight)  # fmt: skip
    assert set(parts0) == {"l1", "loss"}
    torch.testing.assert_close(total0, l1)


def test_discriminator_loss_and_quantisation():
    torch.manual_seed(1)
    disc = _Disc()
    real = torch.rand(4, 3, 8, 8) * 2 - 1
    fake = quantize_8bit(torch.randn(4, 3, 8, 8))
    assert fake.min() >= -1 and fake.max() <= 1
    torch.testing.assert_close((fake + 1) * 127.5, torch.round((fake + 1) * 127.5))  # on the 8-bit grid
    loss, acc = discriminator_loss(disc, torch.nn.Identity(), real, fake, "hinge")
    lr, lf = disc(real), disc(fake)
    torch.testing.assert_close(loss, hinge_d_loss(lr, lf))
    torch.testing.assert_close(loss, 0.5 * (torch.relu(1 - lr).mean() + torch.relu(1 + lf).mean()))
    assert float(acc) == float((lr > lf).float().mean())


# ------------------------------------------------------------------------------------------ the nano KL-VAE


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step tiny KL-VAE run through the CLI (the nano recipe at 16 px), then 2 more steps by resuming."""
    root = tmp_path_factory.mktemp("s1")
    args = ["train-stage1", "-c", NANO, *TINY, f"run.results_dir={root}", "run.name=vae"]
    assert main([*args, "training.max_steps=3"]) == 0
    first = (root / "vae" / "checkpoints" / "step-0000003.pt").read_bytes()
    assert main([*args, "training.max_steps=5"]) == 0
    return root / "vae", first


def test_run_directory_resume_and_export(trained):
    run, _ = trained
    steps = [r["step"] for r in _metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]  # the second call resumed at step 3, not from scratch
    rows = [r for r in _metrics(run) if "loss" in r]
    assert all({"l1", "kl", "loss", "lr"} <= set(r) for r in rows) and not any("gan" in r for r in rows)
    assert (run / "recon.png").is_file() and (run / "loss.png").is_file()
    evals = [r for r in _metrics(run) if "eval_mnist/psnr_mean_per_image" in r]
    assert evals and math.isfinite(evals[-1]["eval_mnist/psnr_mean_per_image"])
    export = run / "export"
    cfg = json.loads((export / "config.json").read_text())
    meta = json.loads((export / "nanogen.json").read_text())
    assert meta["step"] == 5 and meta["latent_shape"] == [4, 8, 8]
    assert cfg["shift_factor"] == pytest.approx(meta["latent_mean"]) and cfg["scaling_factor"] == pytest.approx(1 / meta["latent_std"])


def test_export_is_the_ema_and_a_stage2_latent_space(trained, tmp_path):
    """The export loads as `vae_type: nano-vae`: its latents of the training digits have mean 0, std 1 (the
    shift / scale of export), and it equals the checkpoint's EMA weights."""
    import diffusers

    from nanogen.data.nano import load_nano
    from nanogen.latents.vae import VAELatents

    run, _ = trained
    state = torch.load(run / "checkpoints" / "step-0000005.pt", map_location="cpu", weights_only=False)
    vae = diffusers.AutoencoderKL.from_pretrained(run / "export")
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(v, state["ema"]["vae." + k], msg=k)
    tok = VAELatents("nano-vae", resolution=16, source=run / "export")
    z = tok.encode((load_nano("train", 16).images + 1) / 2)
    assert z.shape[1:] == (4, 8, 8)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-3
    # a nano stage-2 run in this latent space
    args = ["train", "-c", "configs/stage2/training/nano/ddt-xs-pixel-xpred-t4c8.yaml", "stage_1.target=vae",
            "stage_1.params={vae_type: nano-vae, resolution: 16}", f"misc.weights={{nano-vae: {run / 'export'}}}",
            "training.image_size=16", "misc.latent_size=[4,8,8]", "stage_2.params.patch_size=[2,2]",
            "stage_2.params.hidden_size=[32,32]", "stage_2.params.depth=[1,1]", "stage_2.params.num_heads=[2,2]",
            "transport.prediction=velocity", "training.max_steps=1", "training.batch_size=4", "eval=null",
            "sampler.num_steps=2", f"run.results_dir={tmp_path}", "run.name=s2"]  # fmt: skip
    assert main(args) == 0


def test_eval_stage1_from_checkpoint_and_from_export(trained, tmp_path):
    run, _ = trained
    ck = run / "checkpoints" / "step-0000005.pt"
    base = ["eval-stage1", "-c", NANO, *TINY]
    assert main([*base, "--num", "16", "--ckpt", str(ck), "--out", str(tmp_path / "a")]) == 0
    a = json.loads((tmp_path / "a" / "stage1_eval.json").read_text())["results"]["mnist"]
    assert (tmp_path / "a" / "recon-mnist.png").is_file()
    # the same EMA weights through the frozen stage-2 tokenizer give the same numbers
    assert main(["eval-stage1", "-c", NANO, *COMMON, "stage_1.target=vae", "stage_1.params={vae_type: nano-vae, resolution: 16}",
                 f"misc.weights={{nano-vae: {run / 'export'}}}", "--num", "16", "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    b = json.loads((tmp_path / "b" / "stage1_eval.json").read_text())["results"]["mnist"]
    assert a["n_images"] == b["n_images"] == 16
    assert a["psnr_mean_per_image"] == pytest.approx(b["psnr_mean_per_image"], abs=1e-3)
    assert a["ssim_tm_mean_per_image"] == pytest.approx(b["ssim_tm_mean_per_image"], abs=1e-4)
    # raw weights differ from the EMA after 5 steps
    assert main([*base, "--num", "16", "--ckpt", str(ck), "--weights", "model", "--out", str(tmp_path / "c")]) == 0
    c = json.loads((tmp_path / "c" / "stage1_eval.json").read_text())["results"]["mnist"]
    assert c["psnr_mean_per_image"] != a["psnr_mean_per_image"]


# ------------------------------------------------------------------------------------------ RAE + LPIPS + GAN


@pytest.fixture(scope="module")
def rae_assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("rae_assets")
    torch.manual_seed(0)
    enc = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=14,
        image_size=28, num_register_tokens=0))  # fmt: skip
    enc.save_pretrained(d / "enc")
    (d / "dec.json").write_text(json.dumps({"decoder_hidden_size": 16, "decoder_num_hidden_layers": 1,
                                            "decoder_num_attention_heads": 2, "decoder_intermediate_size": 32}))  # fmt: skip
    torch.save(seeded_vgg(), d / "vgg16-397923af.pth")
    torch.save(seeded_lin(), d / "vgg.pth")
    vit = ViT(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, hooks=(0, 1, 2, 3))
    torch.save(vit.state_dict(), d / "dino.pth")
    return d


def test_rae_decoder_training_with_lpips_and_gan_follows_the_epoch_schedule(rae_assets, tmp_path, monkeypatch):
    """Every §6.7 branch runs: LPIPS from lpips_start, discriminator updates from disc_upd_start, the generator's
    adaptive GAN term from disc_start (epochs of 2 steps here); the encoder stays frozen."""
    d = rae_assets
    monkeypatch.setenv("NANOGEN_LPIPS_VGG", str(d / "vgg16-397923af.pth"))
    monkeypatch.setenv("NANOGEN_LPIPS_LIN", str(d / "vgg.pth"))
    args = ["train-stage1", "-c", "configs/stage1/rae-dinov2-vit-b-vitxl.yaml",
            f"stage_1.params.decoder_config_path={d / 'dec.json'}", "stage_1.params.resolution=32",
            f"misc.weights={{dinov2-vit-b: {d / 'enc'}}}", "dataset={type: builtin, target: mnist, split: train}",
            "training.image_size=32", "training.global_batch_size=null", "training.batch_size=4",
            "training.virtual_epoch_steps=2", "training.max_steps=6", "training.log_interval=1",
            "training.sample_every=0", "training.scheduler=null", "gan.scheduler=null",
            f"gan.arch={{recipe: tiny, dino_ckpt_path: {d / 'dino.pth'}}}",
            "gan.loss={disc_upd_start: 1, disc_start: 2, lpips_start: 0}", "eval=null",
            f"run.results_dir={tmp_path}", "run.name=rae"]  # fmt: skip
    assert main(args) == 0
    rows = {r["step"]: r for r in _metrics(tmp_path / "rae") if "loss" in r}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for step, r in rows.items():
        epoch = (step - 1) // 2
        assert "lpips" in r
        assert ("d_loss" in r) == (epoch >= 1) and ("d_acc" in r) == (epoch >= 1)
        assert ("gan" in r) == (epoch >= 2) and ("d_weight" in r) == (epoch >= 2)
    state = torch.load(tmp_path / "rae" / "checkpoints" / "step-0000006.pt", map_location="cpu", weights_only=False)
    assert state["disc_steps"] == 4  # epochs 1 and 2, one update per batch
    assert all(k.startswith(("decoder_", "cls_token")) for k in state["model"])  # only the decoder is trained
    dec = torch.load(tmp_path / "rae" / "export" / "decoder.pt", map_location="cpu", weights_only=False)
    for k, v in dec["model"].items():
        torch.testing.assert_close(v, state["ema"][k])


# ------------------------------------------------------------------------------------------ bad input


def test_stage1_config_errors(capsys, tmp_path):
    one_line_error(capsys, ["train-stage1", "-c", NANO, "stage_1.target=vae"], "train-stage1 trains", "eval-stage1")
    one_line_error(capsys, ["train-stage1", "-c", NANO, "gan.loss.disc_weight=-1"], "gan.loss.disc_weight")
    one_line_error(capsys, ["train-stage1", "-c", NANO, "stage_1.params.kl_wieght=1"], "kl_wieght")
    one_line_error(capsys, ["train-stage1", "-c", NANO, "training.grad_accum_steps=2"], "grad_accum_steps")
    one_line_error(capsys, ["train-stage1", "-c", NANO, "training.activation_checkpointing=true", "training.parallel=fsdp"],
                   "training.parallel=fsdp, training.activation_checkpointing=True", "drop the setting")  # fmt: skip
    one_line_error(capsys, ["train-stage1", "-c", NANO, *TINY, "gan.loss.disc_weight=0.5",
                            "gan.arch.dino_ckpt_path=/nope/dino.pth", f"run.results_dir={tmp_path}"],
                   "dino_ckpt_path", "disc_weight=0")  # fmt: skip
    one_line_error(capsys, ["train-stage1", "-c", NANO, *TINY, "eval.datasets.mnist.metrics=[fid]",
                            f"run.results_dir={tmp_path}"], "not a reconstruction metric")  # fmt: skip
    one_line_error(capsys, ["train-stage1", "-c", NANO, "dataset.type=hf", "dataset.target=imagenet",
                            f"run.results_dir={tmp_path}"], "not available")  # fmt: skip
    one_line_error(capsys, ["eval-stage1", "-c", NANO, "eval=null"], "eval.datasets")
    one_line_error(capsys, ["eval-stage1", "-c", NANO, *TINY], "needs --ckpt")
    one_line_error(capsys, ["eval-stage1", "-c", NANO, *COMMON, "stage_1.target=vae",
                            "stage_1.params={vae_type: nano-vae, resolution: 16}",
                            f"misc.weights={{nano-vae: {tmp_path / 'none'}}}"], "train-stage1 -c configs/stage1/nano/nano-vae.yaml")  # fmt: skip
    # a stage-2 config cannot use the training target
    one_line_error(capsys, ["train", "-c", "configs/stage2/training/nano/ddt-xs-pixel-xpred-t4c8.yaml",
                            "stage_1.target=kl-vae"], "stage-1 training target", "nano-vae")  # fmt: skip


def test_nano_recipe_loads():
    cfg = load_stage1_config(NANO)
    assert cfg.stage_1.target == "kl-vae" and cfg.run.name == "nano-vae"
    assert cfg.gan.loss.disc_weight == 0 and cfg.gan.loss.perceptual_weight == 0  # no offline weights: said in the file


def test_nano_latent_config_matches_the_nano_vae_recipe():
    """The stage-2 nano config in VAE latents agrees with what the stage-1 recipe exports (4 x 32/4 x 32/4)."""
    from nanogen.config import load_config

    s1 = load_stage1_config(NANO)
    s2 = load_config("configs/stage2/training/nano/ddt-xs-nanovae-vpred-t4c8.yaml")
    p = s1.stage_1.params
    down = 2 ** (len(p["block_out_channels"]) - 1)
    assert s2.misc.latent_size == [p["latent_channels"], p["resolution"] // down, p["resolution"] // down]
    assert s2.stage_1.target == "vae" and s2.stage_1.params["vae_type"] == "nano-vae"
    assert s2.stage_1.params["resolution"] == p["resolution"] == s2.training.image_size
