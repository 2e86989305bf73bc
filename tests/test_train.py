"""End-to-end tiny runs on CPU: run directory contents, exact resume, interruption, evaluation."""

import json

import pytest
import torch
import yaml

from conftest import TINY
from nanogen import checkpoint as ckpt
from nanogen.config import load_config
from nanogen.config.schema import SchedulerConfig
from nanogen.errors import CheckpointError
from nanogen.optim import lr_factor
from nanogen.train import train


def tiny(tmp_path, *ov):
    return load_config(TINY, [f"run.results_dir={tmp_path}", *ov])


def test_tiny_run_writes_everything(tmp_path):
    res = train(tiny(tmp_path, "run.name=a"))
    d = tmp_path / "a"
    assert res.step == 6 and res.run_dir == d
    for f in ["config.yaml", "metrics.jsonl", "samples.png", "loss.png"]:
        assert (d / f).is_file(), f
    assert [p.name for _, p in ckpt.list_checkpoints(d / "checkpoints")] == ["step-0000003.pt", "step-0000006.pt"]
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4, 6]
    assert any("eval_ema/fid_mnist" in r for r in recs) and res.evals[6]["fid_mnist"] > 0
    csv_rows = (d / "evals" / "a_ema.csv").read_text().splitlines()
    header = csv_rows[0].split(",")
    assert header[:6] == ["step", "config", "weights", "cfg_scale", "cfg_interval", "sampler_steps"]
    assert {"fid_mnist", "num_samples_mnist", "seconds_mnist"} <= set(header) and csv_rows[1].startswith("6,a,ema,")
    jsonl = [json.loads(x) for x in (d / "evals" / "results.jsonl").read_text().splitlines()]
    assert len(jsonl) == 1 and jsonl[0]["step"] == 6 and jsonl[0]["num_samples_mnist"] == 4
    assert not (d / "evals" / "a_model.csv").exists()  # raw weights only with eval.eval_model
    again = load_config(d / "config.yaml")  # the saved config is a valid config of the same run
    assert again.stage_2.params == yaml.safe_load((d / "config.yaml").read_text())["stage_2"]["params"]
    state = torch.load(d / "checkpoints" / "step-0000006.pt", weights_only=False)
    assert {"step", "epoch", "model", "ema", "optimizer", "scheduler", "loader", "config"} <= set(state)
    assert set(state["optimizer"]["state"]) <= set(state["model"])  # keyed by parameter name: portable across DDP / FSDP


def test_resume_is_exact(tmp_path):
    straight = train(tiny(tmp_path, "run.name=s", "eval=null"))
    train(tiny(tmp_path, "run.name=r", "eval=null", "training.max_steps=3"))
    resumed = train(tiny(tmp_path, "run.name=r", "eval=null"))  # same run dir: continues from step 3
    assert resumed.steps_this_run == 3
    a = torch.load(straight.run_dir / "checkpoints" / "step-0000006.pt", weights_only=False)
    b = torch.load(resumed.run_dir / "checkpoints" / "step-0000006.pt", weights_only=False)
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=0, atol=0, msg=f"{key}.{k}")


def test_eval_model_also_scores_raw_weights(tmp_path):
    res = train(tiny(tmp_path, "run.name=m", "eval.eval_model=true", f"eval.eval_dir={tmp_path}/csv"))
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    ema = next(r["eval_ema/fid_mnist"] for r in recs if "eval_ema/fid_mnist" in r)
    raw = next(r["eval_model/fid_mnist"] for r in recs if "eval_model/fid_mnist" in r)
    assert ema != raw  # EMA (decay 0.99 over 6 steps) and raw weights are different models
    assert (tmp_path / "csv" / "m_model.csv").is_file() and (tmp_path / "csv" / "m_ema.csv").is_file()


def test_resume_false_refuses_a_run_dir_with_checkpoints(tmp_path):
    from nanogen.errors import UserError

    train(tiny(tmp_path, "run.name=n", "eval=null", "training.max_steps=3"))
    before = sorted(p.name for p in (tmp_path / "n" / "checkpoints").iterdir())
    with pytest.raises(UserError, match="run.resume=false but .* already holds checkpoints"):
        train(tiny(tmp_path, "run.name=n", "eval=null", "run.resume=false"))
    assert sorted(p.name for p in (tmp_path / "n" / "checkpoints").iterdir()) == before


def test_rerun_of_a_finished_run_trains_nothing(tmp_path):
    train(tiny(tmp_path, "run.name=f", "eval=null"))
    res = train(tiny(tmp_path, "run.name=f", "eval=null"))
    assert res.steps_this_run == 0 and res.step == 6


def test_weights_loading_errors(tmp_path):
    from nanogen.build import build_network

    net = build_network(tiny(tmp_path))
    sd = net.state_dict()
    bad = dict(sd)
    bad.pop("final_layer.linear.bias")
    bad["extra.weight"] = torch.zeros(1)
    bad["s_embedder.proj.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_weights(net, bad, "ckpt")
    msg = str(e.value)
    assert "missing: final_layer.linear.bias" in msg and "unexpected: extra.weight" in msg and "s_embedder.proj.bias (7,)" in msg
    assert ckpt.weights_from({"model": {"module.a": torch.ones(1)}})[0] == {"a": torch.ones(1)}
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        ckpt.read(tmp_path / "junk.pt")


def test_reference_lr_schedule():
    """reference.md §1.5: stage-2 configs hold 2e-4, then decay linearly; at epoch 80 of 800 lr is about 1.905e-4."""
    sch = SchedulerConfig(type="linear", warmup_epochs=40, warmup_from_zero=False, decay_end_epoch=800, base_lr=2e-4, final_lr=2e-5)
    spe = 1251
    assert lr_factor(0, sch, spe) == 1.0 and lr_factor(40 * spe - 1, sch, spe) == 1.0
    assert 2e-4 * lr_factor(80 * spe, sch, spe) == pytest.approx(1.905e-4, rel=1e-3)
    assert lr_factor(800 * spe, sch, spe) == pytest.approx(0.1)
    cos = SchedulerConfig(type="cosine", warmup_steps=10, decay_end_steps=110, base_lr=1.0, final_lr=0.0)
    assert lr_factor(0, cos, 1) == pytest.approx(0.1) and lr_factor(60, cos, 1) == pytest.approx(0.5)


def test_mfu_peak_table_matches_gpu_names(monkeypatch):
    """MFU's denominator: datasheet dense peaks (performance.md §1), the more specific names first."""
    from nanogen import hardware

    cuda = torch.device("cuda", 0)
    expect = {"NVIDIA H100 80GB HBM3": (989.4, 494.7), "NVIDIA H100 PCIe": (756.0, 378.0), "NVIDIA H100 NVL": (835.0, 417.5),
              "NVIDIA H200": (989.4, 494.7), "NVIDIA A100-SXM4-80GB": (312.0, 156.0), "NVIDIA A10G": (70.0, 35.0),
              "NVIDIA GeForce GTX 1080": (None, None)}  # fmt: skip
    for name, (bf16, tf32) in expect.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        got = hardware.peak_flops(cuda, True), hardware.peak_flops(cuda, False)
        assert got == ((bf16 * 1e12, tf32 * 1e12) if bf16 else (None, None)), name
    assert hardware.peak_flops(torch.device("cpu"), True) is None
