"""The same training command under torchrun (2 processes, gloo on CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY


@pytest.mark.dist
def test_torchrun_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOGEN_NO_PROGRESS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanogen",
        "train", "-c", TINY, f"run.results_dir={tmp_path}", "run.name=ddp", "training.global_batch_size=8",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    run_dir = tmp_path / "ddp"
    final = run_dir / "checkpoints" / "step-0000006.pt"
    # gloo occasionally aborts at process exit after all work is done (offline-stack.md §6): judge by outputs
    assert final.is_file(), r.stderr[-3000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4, 6]
    assert any("eval_ema/fid_mnist" in r for r in recs)
    state = torch.load(final, weights_only=False)
    assert state["loader"]["batch"] > 0 and "done: step 6" in r.stdout
    # The same global batch on one process with 2 accumulation steps: the same samples and the same noise per
    # slot (train.slot_seed), so the same parameters after 6 steps, up to float summation order.
    one = _one_process_reference(tmp_path)
    for key in ("model", "ema"):
        for name, ref in one[key].items():
            torch.testing.assert_close(state[key][name], ref, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")


def _one_process_reference(tmp_path):
    from nanogen.config import load_config
    from nanogen.train import train

    overrides = [f"run.results_dir={tmp_path}", "run.name=one", "eval=null", "training.global_batch_size=8",
                 "training.grad_accum_steps=2"]  # fmt: skip
    train(load_config(TINY, overrides))
    return torch.load(tmp_path / "one" / "checkpoints" / "step-0000006.pt", weights_only=False)


@pytest.mark.dist
def test_fsdp2_resumes_trains_checkpoints_and_evaluates_to_the_one_process_result(tmp_path):
    """A run checkpointed at step 4 by one process (2 accumulation steps) resumes under FSDP2 (fully_shard per
    block) on 2 gloo processes, with activation checkpointing and per-block compile, trains to step 6, saves and
    evaluates: the checkpoint holds the same model, EMA and AdamW state as the one-process run to step 6. (So the
    file format is the same whole, name-keyed state under either mode, and an FSDP checkpoint resumes anywhere.)"""
    from nanogen.config import load_config
    from nanogen.train import train

    common = [f"run.results_dir={tmp_path}", "training.global_batch_size=8", "training.checkpoint_every_steps=2"]
    train(load_config(TINY, [*common, "run.name=fsdp", "eval=null", "training.grad_accum_steps=2", "training.max_steps=4"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOGEN_NO_PROGRESS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanogen", "train",
        "-c", TINY, *common, "run.name=fsdp", "training.parallel=fsdp", "training.activation_checkpointing=true",
        "training.compile=true", "training.compile_backend=aot_eager",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    final = tmp_path / "fsdp" / "checkpoints" / "step-0000006.pt"
    assert final.is_file(), r.stderr[-3000:]
    assert "FSDP over 2 processes" in r.stdout and "resumed from" in r.stdout and "step-0000004.pt" in r.stdout
    recs = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_ema/fid_mnist" in r for r in recs)  # evaluation deals uneven work: it runs on gathered copies
    state = torch.load(final, weights_only=False)
    one = _one_process_reference(tmp_path)
    assert set(state["model"]) == set(one["model"]) and set(state["optimizer"]["state"]) == set(one["optimizer"]["state"])
    for key in ("model", "ema"):
        for name, ref in one[key].items():
            torch.testing.assert_close(state[key][name], ref, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    for name, ref in one["optimizer"]["state"].items():
        torch.testing.assert_close(state["optimizer"]["state"][name]["exp_avg_sq"], ref["exp_avg_sq"], rtol=1e-3, atol=1e-9)


@pytest.mark.dist
def test_torchrun_text_to_image_sums_scores_over_processes(tmp_path):
    """nano T2I under 2 processes: captions through the text encoder on each rank, and nano GenEval's per-category
    sums added over ranks (rank 0 samples prompts 0, 2, 4 and rank 1 prompts 1, 3, 5: one per category each)."""
    from nanogen.eval.nano_geneval import load_digit_classifier

    load_digit_classifier()  # train the scorer's classifier once here (cached), not once per rank
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOGEN_NO_PROGRESS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanogen",
        "train", "-c", TINY, "task=nano-t2i", f"run.results_dir={tmp_path}", "run.name=t2i", "training.global_batch_size=8",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    run_dir = tmp_path / "t2i"
    assert (run_dir / "checkpoints" / "step-0000006.pt").is_file(), r.stderr[-3000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scores = next(r for r in recs if "eval_ema/nano_geneval_nano-geneval/overall" in r)
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    assert all(f"eval_ema/nano_geneval_nano-geneval/{t}" in scores for t in tags)  # all six: both ranks' prompts


@pytest.mark.dist
def test_torchrun_eval_gives_the_single_process_samples_and_scores(tmp_path):
    """`nanogen eval` under 2 processes: the same sample shards (per-sample seeds) and the same FID / precision /
    recall / MIND as one process (moments reduced exactly, feature sets gathered in index order)."""
    from nanogen.config import load_config
    from nanogen.train import train

    res = train(load_config(TINY, [f"run.results_dir={tmp_path}", "run.name=r", "eval=null"]))
    ckpt = str(res.run_dir / "checkpoints" / "step-0000006.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOGEN_NO_PROGRESS": "1"}
    common = ["-m", "nanogen", "eval", "-c", TINY, "--ckpt", ckpt, "--json"]
    ov = ["eval.datasets.mnist.metrics=[fid,precision_recall,mind_inception]", "eval.datasets.mnist.num_samples=10",
          "eval.datasets.mnist.batch_size=3", "eval.shard_size=3"]  # fmt: skip
    out = {}
    for n in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        cmd = [*(launcher if n > 1 else [sys.executable]), *common, "--out", str(tmp_path / f"w{n}"), *ov]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert (tmp_path / f"w{n}" / "results.jsonl").is_file(), r.stderr[-3000:]
        out[n] = json.loads((tmp_path / f"w{n}" / "results.jsonl").read_text().splitlines()[-1])
    for k in ("fid_mnist", "precision_mnist", "recall_mnist", "mind_inception_mnist"):
        assert out[2][k] == pytest.approx(out[1][k], rel=1e-6), k
    import numpy as np

    (d1,) = (tmp_path / "w1" / "samples" / "tiny-cpu-test").iterdir()
    (d2,) = (tmp_path / "w2" / "samples" / "tiny-cpu-test").iterdir()
    assert d1.name == d2.name  # the same weights, sampler and seed, whatever the process count
    for i in (0, 3, 6, 9):
        a = np.load(d1 / "mnist" / f"shard-{i:07d}.npz")["arr_0"]
        b = np.load(d2 / "mnist" / f"shard-{i:07d}.npz")["arr_0"]
        assert np.array_equal(a, b), i
