"""Every objective of issue 4 runs through `nanogen train` / `nanogen sample` on tiny CPU models, with the
frozen networks (DINOv2, LPIPS-VGG16) loaded by the real loading code from local directories."""

import json

import pytest
import torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from nanogen.cli import main
from nanogen.models.lpips import CHANNELS, LIN_FILE, VGG_FILE, vgg16_features

NANO_DDT = "configs/stage2/training/nano/ddt-xs-pixel-xpred-t4c8.yaml"
NANO_MF = "configs/stage2/training/nano/mf-ddt-xs-pixel-vpred-t4c8-kappa0.5.yaml"
SMALL = ["stage_2.params.hidden_size=[32,32]", "stage_2.params.depth=[2,1]", "stage_2.params.num_heads=[2,2]",
         "training.max_steps=4", "training.log_interval=2", "training.checkpoint_every_steps=4", "eval=null",
         "training.batch_size=4", "sampler.num_steps=2"]  # fmt: skip


@pytest.fixture(scope="module")
def frozen_dirs(tmp_path_factory):
    torch.manual_seed(0)
    dino = tmp_path_factory.mktemp("dinov2")
    Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  patch_size=14, image_size=56, num_register_tokens=4)  # fmt: skip
    ).save_pretrained(dino)
    lp = tmp_path_factory.mktemp("lpips")
    features, _ = vgg16_features()
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, lp / VGG_FILE)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}, lp / LIN_FILE)
    return str(dino), str(lp)


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_reg_and_repa_train_and_sample(frozen_dirs, tmp_path):
    dino, _ = frozen_dirs
    # 32 px, patch 4 -> an 8 x 8 grid; DINOv2 at "resolution" 128 sees 112 px -> 8 x 8 patches of 14
    args = ["-c", NANO_DDT, *SMALL, "repa.use_reg=true", "repa.use_repa=true", "repa.repa_layer_depth=1",
            "repa.z_dim=32", "repa.target_encoder_resolution=128", f"misc.weights={{dinov2-vit-b: {dino}}}"]  # fmt: skip
    assert main(["train", *args, f"run.results_dir={tmp_path}", "run.name=reg"]) == 0
    assert len(losses(tmp_path / "reg")) >= 2
    ck = tmp_path / "reg" / "checkpoints" / "step-0000004.pt"
    assert main(["sample", *args, "--ckpt", str(ck), "--num", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()


def test_pixelgen_perceptual_losses_train(frozen_dirs, tmp_path):
    dino, lp = frozen_dirs
    args = ["-c", NANO_DDT, *SMALL, "perceptual_loss.encoders=lpips,dinov2-vit-b",
            "perceptual_loss.percep_loss_weights=[0.1,0.01]", f"misc.weights={{dinov2-vit-b: {dino}, lpips: {lp}}}"]  # fmt: skip
    assert main(["train", *args, f"run.results_dir={tmp_path}", "run.name=pg"]) == 0
    assert all(r["loss"] > 0 for r in losses(tmp_path / "pg"))


def test_missing_frozen_weights_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", "-c", NANO_DDT, *SMALL, "repa.use_reg=true", f"misc.weights={{dinov2-vit-b: {tmp_path / 'x'}}}",
                 f"run.results_dir={tmp_path}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot load representation encoder 'dinov2-vit-b'" in err


def test_meanflow_trains_resumes_and_samples_in_one_step(tmp_path):
    args = ["-c", NANO_MF, *SMALL, "sampler.num_steps=1", f"run.results_dir={tmp_path}", "run.name=mf"]
    assert main(["train", *args]) == 0
    state = torch.load(tmp_path / "mf" / "checkpoints" / "step-0000004.pt", weights_only=False)
    assert state["objective"] is not None  # the FM/MF branch schedule is part of the checkpoint
    assert main(["train", *args, "training.max_steps=6"]) == 0  # resumes at step 4
    ck = tmp_path / "mf" / "checkpoints" / "step-0000006.pt"
    assert main(["sample", *args, "--ckpt", str(ck), "--num", "3", "--out", str(tmp_path / "mf.png")]) == 0
