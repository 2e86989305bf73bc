"""The command line: help that explains, and one clean line + exit code 2 for every kind of bad input."""

import subprocess
import sys

import pytest

from conftest import ROOT, TINY, one_line_error
from nanogen.cli import main

SUBCOMMANDS = [
    "demo", "train", "sample", "eval", "model-info", "convert-checkpoint", "benchmark", "prepare", "train-stage1",
    "eval-stage1", "configs", "compute-stats", "extract-latents", "fid", "ref-stats", "benchmark-data", "benchmark-eval",
]  # fmt: skip


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "nanogen", *args], capture_output=True, text=True, cwd=ROOT, **kw)


def test_help_is_fast_and_lists_everything():
    r = run("--help")
    assert r.returncode == 0
    for s in SUBCOMMANDS:
        assert s in r.stdout
    assert "import torch" not in r.stderr


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_each_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 100




def test_bad_inputs_exit_2_with_one_line(capsys, tmp_path):
    one_line_error(capsys, ["frobnicate"], "invalid choice: 'frobnicate'")
    one_line_error(capsys, ["train", "--config", "nope.yaml"], "config file not found: 'nope.yaml'")
    one_line_error(capsys, ["train", "-c", TINY, "training.global_batchsize=3"], "did you mean 'training.global_batch_size'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [" + str(ROOT / TINY) + "]\ntraining:\n  lrr: 3\n")
    one_line_error(capsys, ["train", "-c", str(bad)], str(bad), "training.lrr", "unknown key")
    one_line_error(capsys, ["train", "-c", TINY, "training.max_steps=many"], "training.max_steps: expected an integer")
    one_line_error(capsys, ["train", "-c", TINY, "sampler.num_steps=0"], "sampler.num_steps: must be >= 1")
    one_line_error(capsys, ["train-stage1"], "--config")
    one_line_error(capsys, ["prepare", "--data", "imagenet", "--data-dir", str(tmp_path / "d")],
                   "cannot reach the Hugging Face Hub", "missing: imagenet (diffusion-bench/imagenet ->")
    one_line_error(capsys, ["sample", "-c", TINY, "--ckpt", str(tmp_path / "none.pt")], "checkpoint not found")
    one_line_error(capsys, ["train"], "the following arguments are required: --config")


def test_unwritable_results_dir_leaves_nothing(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(capsys, ["train", "-c", TINY, f"run.results_dir={blocker}/sub"], "is not writable", "run.results_dir=PATH")
    assert blocker.read_text() == "x"
    one_line_error(capsys, ["train", "-c", TINY, f"run.results_dir={tmp_path}/ok", f"eval.eval_dir={blocker}/e"],
                   "eval directory", "eval.eval_dir=PATH")
    assert not list((tmp_path / "ok").rglob("*.pt"))  # refused before any training


def test_subprocess_error_has_no_traceback():
    r = run("train", "-c", TINY, "training.optimizer.lr=fast")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]


def test_model_info_json(capsys):
    import json

    assert main(["model-info", "-c", TINY, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] > 0 and info["token_layout"]["blocks"]["sequence_length"] == 16 + 2 + 2
    assert info["gflops"] > 0


def test_sample_and_eval_from_a_trained_checkpoint(capsys, tmp_path):
    from PIL import Image

    assert main(["train", "-c", TINY, f"run.results_dir={tmp_path}", "run.name=t", "eval=null"]) == 0
    ck = str(tmp_path / "t" / "checkpoints" / "step-0000006.pt")
    out = tmp_path / "grid.png"
    assert main(["sample", "-c", TINY, "--ckpt", ck, "--labels", "1,2,3", "--nrow", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * (3 * 34 + 2), 2 * 34 + 2 * 2)  # 3 tiles of 32 px + 2 px gaps, scaled x2
    capsys.readouterr()
    assert main(["eval", "-c", TINY, "--ckpt", ck]) == 0
    assert capsys.readouterr().out.count("fid_mnist") == 1
    one_line_error(capsys, ["sample", "-c", TINY, "--ckpt", ck, "--labels", "1,x"], "--labels: '1,x' is not a comma-separated")
    one_line_error(capsys, ["sample", "-c", TINY, "--ckpt", ck, "--labels", "12"], "12 is not a class of this model (0..9)")
    one_line_error(capsys, ["sample", "-c", TINY, "--ckpt", ck, "--num", "0"], "--num: must be at least 1")
    one_line_error(capsys, ["sample", "-c", TINY, "--ckpt", ck, "--out", f"{out}/x.png"], "sample --out: cannot write")
    one_line_error(capsys, ["eval", "-c", TINY], "no checkpoint: pass --ckpt PATH")
