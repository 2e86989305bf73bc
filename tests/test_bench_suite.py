"""`nanogen bench --suite`: the job plan, the results store, resuming an interrupted suite, the budget identity.

The real nano suite takes about an hour; here a suite of the same code runs the tiny CPU config for 2 steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanogen.cli import main
from nanogen.errors import UserError
from nanogen.leaderboard import suite as S

TINY = Path(__file__).resolve().parents[1] / "configs/stage2/training/nano/tiny-cpu-test.yaml"


def tiny_suite(tmp_path: Path) -> S.Suite:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"defaults: [{TINY}]\ntraining: {{checkpoint_every_steps: 1}}\n")
    fam = S.Family("px", "pixel", str(cfg), "pixel-space", variants=S._cfg_variants("Tiny pixel"))
    return S.Suite("tiny", stage1=(), families=(fam,), steps=2)


def records(store: Path) -> list[dict]:
    return [json.loads(line) for line in store.read_text().splitlines()]


def test_suite_runs_resumes_after_interruption_and_reports(tmp_path, monkeypatch, capsys):
    suite, out = tiny_suite(tmp_path), tmp_path / "bench"
    calls = {"train": 0, "eval": 0}
    real_train, real_eval = S.run_train, S.run_eval

    def counting_train(*a, **k):
        calls["train"] += 1
        return real_train(*a, **k)

    def eval_then_crash(*a, **k):
        calls["eval"] += 1
        if calls["eval"] == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second evaluation
        return real_eval(*a, **k)

    monkeypatch.setattr(S, "run_train", counting_train)
    monkeypatch.setattr(S, "run_eval", eval_then_crash)
    with pytest.raises(KeyboardInterrupt):
        S.run_suite(suite, out, axes="imagenet")
    assert calls == {"train": 1, "eval": 2}
    assert [r["guidance"] for r in records(out / "results.jsonl")] == [True]

    # the same command again: training is not repeated, only the missing evaluation runs
    monkeypatch.setattr(S, "run_eval", real_eval)
    assert S.run_suite(suite, out, axes="imagenet") == 0
    assert calls["train"] == 1
    recs = records(out / "results.jsonl")
    assert [(r["method"], r["axis"], r["guidance"], r["seed"]) for r in recs] == [
        ("Tiny pixel", "imagenet", True, 0), ("Tiny pixel", "imagenet", False, 0)]
    for r in recs:
        assert r["category"] == "pixel-space" and r["meta"]["step"] == 2
        assert np.isfinite(r["metrics"]["fid"]) and r["metrics"]["fid"] > 0
    assert [r["meta"]["cfg_scale"] for r in recs] == [3.0, 1.0]

    # the two variants really sampled differently (CFG on / off), from the same final checkpoint
    run = out / "runs" / "imagenet" / "px-seed0"
    with_cfg = np.load(next((run / "eval-samples" / "tiny-pixel-cfg").glob("*/shard-*.npz")))["arr_0"]
    without = np.load(next((run / "eval-samples" / "tiny-pixel-nocfg").glob("*/shard-*.npz")))["arr_0"]
    assert with_cfg.shape == without.shape and not np.array_equal(with_cfg, without)

    # one row of samples per method with CFG (the tiny set has 4), at scale 2; the report of the store
    grid = Image.open(out / "samples-imagenet.png")
    assert grid.height == 2 * (32 + 2 + 2) and grid.width > 4 * 2 * 34
    board = (out / "report" / "leaderboard.md").read_text()
    assert "Tiny pixel" in board and f"{recs[0]['metrics']['fid']:.2f}" in board
    assert (out / "report" / "leaderboard.html").exists()

    # a third run has nothing left to do
    capsys.readouterr()
    assert S.run_suite(suite, out, axes="imagenet", report=False) == 0
    assert "0 to run" in capsys.readouterr().out.replace("\n", " ")
    assert len(records(out / "results.jsonl")) == 2


def test_suite_directory_keeps_one_budget(tmp_path):
    suite, out = tiny_suite(tmp_path), tmp_path / "bench"
    S.write_state(S.Layout(out), {"suite": "tiny", "steps": 2, "overrides": []}, {})
    with pytest.raises(UserError, match=r"steps 2 \(now 5\).*--out NEW_DIR"):
        S.run_suite(suite, out, steps=5, dry_run=True)
    with pytest.raises(UserError, match="overrides"):
        S.run_suite(suite, out, overrides=["training.batch_size=4"], dry_run=True)
    assert S.run_suite(suite, out, dry_run=True) == 0


def test_store_keys_skip_malformed_lines(tmp_path):
    store = tmp_path / "results.jsonl"
    good = {"method": "A", "axis": "t2i", "guidance": False, "seed": 1, "metrics": {}}
    store.write_text("not json\n" + json.dumps(good) + "\n" + json.dumps({"method": "B"}) + "\n")
    assert S.store_keys(store) == {("A", "t2i", False, 1)}


def test_nano_suite_plan_and_cli(tmp_path, capsys):
    out = tmp_path / "bench"
    # the job list of the real suite: 3 latent spaces, then per axis 6 trainings and 12 evaluations
    assert main(["bench", "--suite", "nano", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "39 jobs, 39 to run" in text.replace("\n", " ")
    layout = S.Layout(out)
    jobs = S.plan(S.NANO, layout, list(S.NANO.families), ["imagenet", "t2i"], [0], 300)
    assert [j.kind for j in jobs].count("stage1") == 3 and [j.kind for j in jobs].count("train") == 12
    assert {(j.variant.method, j.axis) for j in jobs if j.kind == "eval" and j.variant.method.startswith("MeanFlow")} == {
        ("MeanFlow (NFE=1)", "imagenet"), ("MeanFlow (NFE=2)", "imagenet"),
        ("MeanFlow (NFE=1)", "t2i"), ("MeanFlow (NFE=2)", "t2i")}
    # a finished record marks its evaluation done; a subset of methods needs only its own latent spaces
    layout.store.parent.mkdir(parents=True)
    layout.store.write_text(json.dumps({"method": "Pixel x-pred (JiT-style)", "axis": "t2i", "guidance": True,
                                        "seed": 0, "metrics": {"nano_geneval": 0.1}}) + "\n")
    assert main(["bench", "--dry-run", "--out", str(out), "--methods", "jit-xpred,nano-vae", "--axes", "t2i"]) == 0
    text = capsys.readouterr().out.replace("\n", " ")
    assert "7 jobs, 6 to run" in text and "nano-encoder" not in text
    # the one-line errors
    assert main(["bench", "--dry-run", "--out", str(out), "--methods", "dit"]) == 2
    assert "unknown method(s) dit; the nano suite has pixnerd-vpred" in capsys.readouterr().err
    assert main(["bench", "--dry-run", "--out", str(out), "--axes", "coco"]) == 2
    assert main(["bench", "--dry-run", "--out", str(out), "--seeds", "a"]) == 2
    assert main(["bench", "--dry-run", "--out", str(out), "--steps", "0"]) == 2
    assert "bench --steps: must be a positive number of optimizer steps, got 0" in capsys.readouterr().err
    assert main(["bench", "--dry-run", "--out", str(out), "training.nonsense=1"]) == 2
