"""Never losing work: checkpoint retention, a damaged newest checkpoint, SIGTERM (issue 8 item 2)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY
from nanogen import checkpoint as ckpt
from nanogen.config import load_config
from nanogen.errors import CheckpointError
from nanogen.train import train


def test_retention_keeps_the_newest_and_every_nth(tmp_path):
    for step in range(100, 1100, 100):
        ckpt.save(tmp_path / f"step-{step:07d}.pt", {"step": step})
    ckpt.prune(tmp_path, keep=2, keep_every=400)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [400, 800, 900, 1000]
    ckpt.prune(tmp_path, keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1000]


def _losses(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = load_config(TINY, [f"run.results_dir={tmp_path}", "run.name=a", "eval=null", "training.keep_checkpoints=0"])
    train(cfg)
    first = _losses(tmp_path / "a")
    newest = tmp_path / "a" / "checkpoints" / "step-0000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a crash mid-write on a filesystem without atomic rename
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint step-0000006.pt"):
        res = train(cfg)
    assert res.step == 6 and res.steps_this_run == 3  # resumed at step 3, trained 4..6 again
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    again = [r["loss"] for r in recs if "loss" in r][-1]  # mean over steps 5-6 of the resumed part
    assert again == first[6]  # the same trajectory: resume is exact
    state = torch.load(newest, weights_only=False)  # and the damaged file was replaced by a good one
    assert state["step"] == 6
    for p in (tmp_path / "a" / "checkpoints").iterdir():
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="all damaged"), pytest.warns(UserWarning):
        train(cfg)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOGEN_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "nanogen", "train", "-c", TINY, f"run.results_dir={tmp_path}", "run.name=t", "eval=null",
           "training.max_steps=100000", "training.checkpoint_every_steps=100000", "training.log_interval=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training runs
        if line.startswith("step 3/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "saving a checkpoint" in out and "Traceback" not in err
    saved = ckpt.list_checkpoints(tmp_path / "t" / "checkpoints")
    assert len(saved) == 1 and saved[0][0] >= 3
    res = train(load_config(TINY, [f"run.results_dir={tmp_path}", "run.name=t", "eval=null", f"training.max_steps={saved[0][0] + 2}"]))
    assert res.step == saved[0][0] + 2 and res.steps_this_run == 2


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint_exactly(tmp_path):
    """kill -9 (the OOM killer, a lost node): no handler runs. The rerun resumes from the newest checkpoint on
    disk and continues the uninterrupted run's trajectory exactly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOGEN_NO_PROGRESS": "1"}
    common = [f"run.results_dir={tmp_path}", "eval=null", "training.checkpoint_every_steps=2", "training.log_interval=1",
              "training.sample_every=0"]  # fmt: skip
    cmd = [sys.executable, "-m", "nanogen", "train", "-c", TINY, *common, "run.name=k", "training.max_steps=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step 5/") or time.time() > deadline:
            break
    proc.kill()
    proc.communicate(timeout=60)
    newest = ckpt.list_checkpoints(tmp_path / "k" / "checkpoints")[-1][0]
    assert newest >= 4
    res = train(load_config(TINY, [*common, "run.name=k", f"training.max_steps={newest + 2}"]))
    assert res.steps_this_run == 2
    train(load_config(TINY, [*common, "run.name=ref", f"training.max_steps={newest + 2}"]))
    assert _losses(tmp_path / "k")[newest + 2] == _losses(tmp_path / "ref")[newest + 2]


def test_a_run_dir_of_another_config_is_refused_naming_the_fields(tmp_path, capsys):
    from conftest import one_line_error
    from nanogen.cli import main

    base = ["train", "-c", TINY, f"run.results_dir={tmp_path}", "run.name=r", "eval=null", "training.max_steps=3"]
    assert main(base) == 0
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    one_line_error(capsys, [*base, "stage_2.params.hidden_size=48", "transport.t_eps=0.1"],
                   "holds a run of another config", "stage_2.params.hidden_size: 32 -> 48", "--resume", "--overwrite")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before  # nothing touched
    # what may change on resume: the step budget, logging, eval, paths
    assert main([*base[:-1], "training.max_steps=4", "training.log_interval=1"]) == 0
    # --resume: a deliberate change (here the loss's t floor) continues the run, with a warning naming it
    with pytest.warns(UserWarning, match=r"changed config \(transport.t_eps: 0.05 -> 0.1\)"):
        assert main([*base[:-1], "training.max_steps=5", "transport.t_eps=0.1", "--resume"]) == 0
    one_line_error(capsys, [*base, "--resume", "--overwrite"], "pass one of them")
    assert main([*base, "stage_2.params.hidden_size=48", "--overwrite"]) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(moved) == 1 and (moved[0] / "checkpoints" / "step-0000005.pt").is_file()  # the old run is kept
    assert torch.load(tmp_path / "r" / "checkpoints" / "step-0000003.pt", weights_only=False)["step"] == 3


def _poison_step(monkeypatch, bad_steps):
    """Make the data of the given optimizer steps (1-based) NaN: a stand-in for a diverging model."""
    from nanogen import train as train_mod

    original = train_mod.OptimizerStep.__call__

    def call(self, step, next_batch):
        if step + 1 in bad_steps:
            return original(self, step, lambda: tuple(t * float("nan") if torch.is_tensor(t) and t.is_floating_point() else t for t in next_batch()))
        return original(self, step, next_batch)

    monkeypatch.setattr(train_mod.OptimizerStep, "__call__", call)


def test_nonfinite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    from nanogen.errors import UserError

    _poison_step(monkeypatch, {5})
    cfg = load_config(TINY, [f"run.results_dir={tmp_path}", "run.name=n", "eval=null", "training.checkpoint_every_steps=2",
                             "training.log_interval=3", "training.keep_checkpoints=0"])  # fmt: skip
    with pytest.raises(UserError, match=r"non-finite loss at step 5; last good checkpoint: .*step-0000004\.pt"):
        train(cfg)  # found at the log line of step 6, which comes before step 6's checkpoint
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "n" / "checkpoints")] == [2, 4]  # nothing poisoned saved


def test_nonfinite_steps_are_skipped_and_counted_by_config(tmp_path, monkeypatch):
    from nanogen.errors import UserError

    _poison_step(monkeypatch, {3, 4})
    base = [f"run.results_dir={tmp_path}", "eval=null", "training.nonfinite=skip", "training.log_interval=6"]
    res = train(load_config(TINY, [*base, "run.name=s"]))
    assert res.step == 6 and math.isfinite(res.final_loss)
    state = torch.load(tmp_path / "s" / "checkpoints" / "step-0000006.pt", weights_only=False)
    assert state["skipped_steps"] == 2 and state["scheduler"]["last_epoch"] == 4  # 4 updates made
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    rec = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["skipped_nonfinite_steps"] == 2 and math.isfinite(rec["loss"])
    with pytest.raises(UserError, match="2 non-finite steps in a row up to step 4"):
        train(load_config(TINY, [*base, "run.name=s2", "training.max_skipped_steps=1"]))


def test_log_lines_carry_throughput_flops_and_memory(tmp_path):
    train(load_config(TINY, [f"run.results_dir={tmp_path}", "run.name=l", "eval=null", "training.log_interval=3"]))
    recs = [json.loads(x) for x in (tmp_path / "l" / "metrics.jsonl").read_text().splitlines()]
    from nanogen.modelinfo import train_flops_per_image

    per_image = train_flops_per_image(load_config(TINY, []))
    for r in recs:
        assert r["images_per_s"] > 0 and r["peak_mem_gb"] > 0.01
        assert r["gflops_per_s"] == pytest.approx(r["images_per_s"] * per_image / 1e9, rel=0.02)  # CPU: achieved FLOP/s
        assert "mfu" not in r  # no datasheet peak for a CPU


def test_stage1_falls_back_past_a_damaged_checkpoint_and_resumes_exactly(tmp_path):
    from nanogen.config import load_stage1_config
    from nanogen.stage1.train import train_stage1
    from test_stage1 import NANO
    from test_stage1 import TINY as TINY_VAE

    cfg = load_stage1_config(NANO, [*TINY_VAE, f"run.results_dir={tmp_path}", "run.name=v", "eval=null", "training.max_steps=4",
                             "training.checkpoint_every_steps=2", "training.keep_checkpoints=0"])  # fmt: skip
    train_stage1(cfg)
    first = _losses(tmp_path / "v")
    newest = tmp_path / "v" / "checkpoints" / "step-0000004.pt"
    newest.write_bytes(newest.read_bytes()[:500])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint step-0000004.pt"):
        res = train_stage1(cfg)
    assert res.steps_this_run == 2
    recs = [json.loads(x) for x in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 3, 4] and recs[-1]["loss"] == first[4]  # the same trajectory


def test_a_global_batch_that_does_not_split_is_one_line_before_anything_is_written(tmp_path, capsys):
    from conftest import one_line_error

    one_line_error(capsys, ["train", "-c", TINY, f"run.results_dir={tmp_path}", "training.global_batch_size=10",
                            "training.grad_accum_steps=4"], "global_batch_size: 10 is not divisible", "1 x 4")  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_weights_and_biases_offline_mirrors_the_log(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(load_config(TINY, [f"run.results_dir={tmp_path}", "run.name=w", "eval=null", "run.wandb=true", "training.log_interval=3"]))
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record,) = runs[0].glob("*.wandb")  # protobuf records: the logged keys and JSON values appear verbatim
    data = record.read_bytes()
    assert all(json.dumps(loss).encode() in data for loss in _losses(tmp_path / "w").values())
    assert b"images_per_s" in data and b"peak_mem_gb" in data


def test_data_position_converts_between_process_splits():
    from nanogen.errors import UserError
    from nanogen.train import data_position

    state = {"loader": {"epoch": 2, "batch": 6}, "data_layout": {"processes": 1, "micro_batch": 4}}  # 24 samples in
    assert data_position(state, 2, 4, object()) == {"epoch": 2, "batch": 3}
    assert data_position(state, 3, 2, object()) == {"epoch": 2, "batch": 4}
    assert data_position({"loader": {"epoch": 0, "batch": 5}}, 8, 16, object()) == {"epoch": 0, "batch": 5}  # no layout
    with pytest.raises(UserError, match="24 samples .* not a whole number of batches for 2 processes x micro batch 8"):
        data_position(state, 2, 8, object())
