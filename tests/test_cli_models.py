"""model-info, convert-checkpoint and benchmark from the command line, and their one-line errors."""

import json
import math

import pytest
import torch

from conftest import one_line_error
from nanogen import checkpoint as ckpt
from nanogen.cli import main
from nanogen.config import load_config
from nanogen.modelinfo import model_info
from reference_ddt import RefCfg, reference_state_dict

NANO_DDT = "configs/stage2/training/nano/ddt-xs-pixel-xpred-t4c8.yaml"
SMALL = ["stage_2.params.hidden_size=[32,48]", "stage_2.params.depth=[2,1]", "stage_2.params.num_heads=[2,4]"]
# the reference-layout twin of NANO_DDT + SMALL: 32x32x3 pixels, patch 4, 4 time + 8 class tokens, 10 classes
REF = RefCfg(32, 3, 4, (32, 48), (2, 1), (2, 4), mlp_ratio=3.0, num_classes=10, n_t=4, n_c=8)




def test_convert_checkpoint_then_sample_through_the_python_api(tmp_path, capsys):
    import nanogen

    sd = reference_state_dict(REF, seed=0)
    src = tmp_path / "release-v0.pt"
    torch.save({"step": 3, "epoch": 0, "model": sd, "ema": sd, "optimizer": {}, "scheduler": None}, src)
    dst = tmp_path / "converted.pt"
    assert main(["convert-checkpoint", "-c", NANO_DDT, str(src), str(dst), *SMALL]) == 0
    assert "ema, model weights" in capsys.readouterr().out
    direct = nanogen.load_stage2(NANO_DDT, src, overrides=SMALL)  # the release loads directly too
    converted = nanogen.load_stage2(NANO_DDT, dst, overrides=SMALL, weights="model")
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 10])
    with torch.no_grad():
        torch.testing.assert_close(direct(x, t, y), converted(x, t, y), rtol=0, atol=0)
        assert direct(x, t, y).abs().max() > 0
    assert not direct.training
    # and the sample command runs on the released file
    assert main(["sample", "-c", NANO_DDT, "--ckpt", str(src), "--num", "4", "--out", str(tmp_path / "g.png"),
                 "sampler.num_steps=2", *SMALL]) == 0  # fmt: skip
    assert (tmp_path / "g.png").is_file()


def test_checkpoint_of_another_layout_is_one_line(tmp_path, capsys):
    sd = reference_state_dict(REF, seed=0)
    src = tmp_path / "release.pt"
    torch.save({"model": sd, "ema": sd}, src)
    one_line_error(capsys, ["convert-checkpoint", "-c", NANO_DDT, str(src), str(tmp_path / "o.pt"), *SMALL,
                            "conditioning.arch.num_c_tokens=4"], "enc_rope.freqs_", "another token layout")  # fmt: skip
    sd = {k: v for k, v in sd.items() if "rope" not in k and not k.startswith("blocks.1.")}
    torch.save({"ema": sd}, src)
    one_line_error(capsys, ["sample", "-c", NANO_DDT, "--ckpt", str(src), *SMALL], "missing: blocks.1.")
    one_line_error(capsys, ["convert-checkpoint", "-c", NANO_DDT, str(tmp_path / "nope.pt"), "o.pt"], "not found")


def test_bad_model_configs_are_one_line(capsys):
    one_line_error(capsys, ["model-info", "-c", NANO_DDT, "stage_2.params.num_heads=[3,4]"],
                   "hidden size 128 is not divisible by num_heads 3")  # fmt: skip
    one_line_error(capsys, ["model-info", "-c", NANO_DDT, "stage_2.params.patch_size=[5,5]"],
                   "input_size 32 is not divisible by patch_size 5")  # fmt: skip
    one_line_error(capsys, ["model-info", "-c", NANO_DDT, "stage_2.target=DTT"], "unknown name 'DTT'", "did you mean")
    one_line_error(capsys, ["model-info", "-c", NANO_DDT, "stage_2.params.hiden_size=3"], "hiden_size")
    one_line_error(capsys, ["benchmark", "-c", NANO_DDT, "--batch-size", "0"], "--batch-size")


def test_benchmark_times_real_optimizer_steps_and_reports_mfu(capsys):
    args = ["benchmark", "-c", NANO_DDT, *SMALL, "--batch-size", "2", "--steps", "2", "--warmup", "1", "--min-time", "0.05"]
    assert main([*args, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"img_per_s", "step_ms", "mfu", "device"} <= set(r) and r["device"].startswith("CPU")
    assert r["model"] == "DDT-XS" and r["attention_calls"] == 3 and r["unmasked_input_attention_masks"] == 0
    assert r["graphs"]["graph_breaks"] == 0 and r["steps"] == 2 and math.isfinite(r["final_loss"])
    assert r["img_per_s"] == pytest.approx(2 * 1000 / r["step_ms"])
    assert r["gflops_per_s"] == pytest.approx(r["img_per_s"] * r["train_gflops_per_image"])
    assert r["train_gflops_per_image"] == pytest.approx(3 * model_info(load_config(NANO_DDT, SMALL))["gflops"])
    # a CPU has no datasheet peak: MFU is against the matmul ceiling measured in the same run, and says so
    assert r["mfu"] == pytest.approx(r["gflops_per_s"] / r["matmul"]["gflops_per_s"]) and "measured matmul" in r["mfu_basis"]
    one_line_error(capsys, [*args[:-6], "--steps", "0"], "--steps must be >= 1")


def test_python_api_builds_without_weights_and_checks_formats(tmp_path):
    import nanogen

    net = nanogen.build_stage2(NANO_DDT, SMALL, device="meta")
    assert sum(p.numel() for p in net.parameters()) > 0
    ckpt.save(tmp_path / "x.pt", {"ema": {}})


def test_prepare_models_offline_and_unknown_are_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(capsys, ["prepare", "--models", "dinov2-vit-b"], "cannot download 'facebook/dinov2-with-registers-base'")
    one_line_error(capsys, ["prepare", "--models", "dinov9-vit-b"], "unknown model 'dinov9-vit-b'")
    one_line_error(capsys, ["prepare"], "pass --data GROUP and/or --models")
