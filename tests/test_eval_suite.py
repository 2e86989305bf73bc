"""Evaluation wiring: metric names and their checks, online and offline eval records, resumable offline eval,
feature-set metrics on the built-in set, the Inception Score path, and the prompt-metric adapter (issue 7)."""

import json

import numpy as np
import pytest
import torch

from conftest import TINY, one_line_error
from nanogen.cli import main
from nanogen.config import load_config
from nanogen.errors import UserError
from nanogen.eval import metrics as M
from nanogen.eval.evaluate import check_metrics
from nanogen.parallel import DistInfo


def _cfg(*ov):
    return load_config(TINY, list(ov))


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["eval.datasets.mnist.metrics=[fid,fidd]"], ["unknown metric 'fidd'", "fid@adm"]),
        (["eval.datasets.mnist.metrics=[geneval]"], ["'geneval' scores images against prompts"]),
        (["eval.datasets.mnist.metrics=[fdr6]"], ["needs published reference statistics"]),
        (["eval.datasets.mnist.metrics=[fd_nope]"], ["unknown metric 'fd_nope'"]),
        (["eval.datasets.mnist.type=hf", "eval.datasets.mnist.metrics=[fid]"], ["reference_npz", "fid@jit"]),
        (["eval.datasets.mnist.type=hf", "eval.datasets.mnist.metrics=[mind_inception]"], ["reference_images"]),
        (["eval.datasets.mnist.type=hf", "eval.datasets.mnist.metrics=[fdr_convnext]", "eval.datasets.mnist.data_dir=/nonexistent"],
         ["/nonexistent/fd-stats/convnext_in256_t224_stats.npz", "prepare --data fid-stats"]),
        (["eval.datasets.mnist.metrics=[fid@adm]", "eval.datasets.mnist.data_dir=/nonexistent"],
         ["/nonexistent/adm/VIRTUAL_imagenet256_labeled.npz", "not found"]),
        (["eval.datasets.mnist.images_per_prompt=0"], ["images_per_prompt"]),
    ],
)  # fmt: skip
def test_metric_names_and_files_are_checked_before_any_work(overrides, fragments):
    with pytest.raises(UserError) as e:
        check_metrics(_cfg(*overrides))
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_metric_name_parsing():
    assert M.split_name("fid@adm") == ("fid", "adm")
    assert M.split_name("fdr_dinov2_cls") == ("fdr", "dinov2_cls")
    assert M.split_name("vqascore_clip-flant5-xxl") == ("vqascore", "clip-flant5-xxl")
    assert M.split_name("inception_score@torch-fidelity") == ("inception_score", "torch-fidelity")
    for ok in ("fid", "fid@jit", "inception_score@adm", "mind6", "fdr6", "fd_inception", "clipscore@hessel", "precision_recall"):
        assert M.known(ok), ok
    for bad in ("fid@cleanfid", "inception_score@x", "fd_resnet", "mind6@x"):
        assert not M.known(bad), bad


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from nanogen.train import train

    d = tmp_path_factory.mktemp("run")
    res = train(load_config(TINY, [f"run.results_dir={d}", "run.name=r", "eval=null"]))
    return str(res.run_dir / "checkpoints" / "step-0000006.pt")


def test_offline_eval_records_and_resumes_from_shards(tiny_ckpt, tmp_path, capsys):
    argv = ["eval", "-c", TINY, "--ckpt", tiny_ckpt, "--out", str(tmp_path), "--json", "--step", "6",
            "eval.datasets.mnist.metrics=[fid,precision_recall,mind_inception]", "eval.datasets.mnist.num_samples=6",
            "eval.datasets.mnist.batch_size=2", "eval.shard_size=2"]  # fmt: skip
    with pytest.warns(UserWarning, match="6 samples"):
        assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["fid_mnist"] > 0 and 0 <= first["precision_mnist"] <= 1 and 0 <= first["recall_mnist"] <= 1
    assert first["mind_inception_mnist"] > 0 and first["num_samples_mnist"] == 6
    (run,) = (tmp_path / "samples" / "tiny-cpu-test").iterdir()  # one folder per checkpoint + sampler + seed
    shards = run / "mnist"
    assert sorted(p.name for p in shards.glob("shard-*.npz")) == [f"shard-{i:07d}.npz" for i in (0, 2, 4)]
    (shards / "shard-0000002.npz").unlink()  # as if the run died while writing the middle shard
    with pytest.warns(UserWarning):
        assert main(argv) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("fid_mnist", "precision_mnist", "recall_mnist", "mind_inception_mnist"):
        assert second[k] == pytest.approx(first[k], rel=1e-9), k  # regenerated samples are the same samples
    rows = (tmp_path / "tiny-cpu-test_ema.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("6,tiny-cpu-test,ema,3.0,0.0-1.0,3,")
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["config"] for r in recs] == ["tiny-cpu-test"] * 2 and recs[0]["cfg_scale"] == 3.0
    # a different checkpoint never reuses these samples: its own folder by default, an error if pointed here
    other = tmp_path / "other.pt"
    state = torch.load(tiny_ckpt, weights_only=False)
    state["ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["ema"].items()}
    torch.save(state, other)
    one_line_error(capsys, [*argv[:4], str(other), "--samples-dir", str(run), *argv[5:]], "holds samples of another run", "different weights")
    with pytest.warns(UserWarning):
        assert main([*argv[:4], str(other), *argv[5:]]) == 0
    assert len(list((tmp_path / "samples" / "tiny-cpu-test").iterdir())) == 2


def test_inception_score_needs_the_classifier_head(capsys, tiny_ckpt, monkeypatch, tmp_path):
    monkeypatch.delenv("NANOGEN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no torch-fidelity file in the hub cache
    one_line_error(capsys, ["eval", "-c", TINY, "--ckpt", tiny_ckpt, "eval.datasets.mnist.metrics=[inception_score]",
                            "eval.datasets.mnist.num_samples=20"],
                   "inception_score", "nanogen prepare --models inception")  # fmt: skip
    one_line_error(capsys, ["eval", "-c", TINY, "--ckpt", tiny_ckpt, "eval.datasets.mnist.metrics=[inception_score]"],
                   "splits the samples 10 ways")  # fmt: skip


def test_inception_score_with_a_torch_fidelity_file(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from nanogen.eval.inception import TORCH_FIDELITY_FILE, InceptionV3TF

    torch.manual_seed(0)
    path = tmp_path / TORCH_FIDELITY_FILE
    torch.save({k: v for k, v in InceptionV3TF().state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    monkeypatch.setenv("NANOGEN_INCEPTION_WEIGHTS", str(path))
    argv = ["eval", "-c", TINY, "--ckpt", tiny_ckpt, "--out", str(tmp_path), "--json", "--no-samples",
            "eval.datasets.mnist.metrics=[inception_score@torch-fidelity]", "eval.datasets.mnist.num_samples=20",
            "eval.datasets.mnist.batch_size=10"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["inception_score@torch-fidelity_mnist"] >= 1.0 - 1e-9 and res["inception_score_std@torch-fidelity_mnist"] >= 0


class _FakePromptMetric:
    name, keys = "fake", ("a", "b")

    def score(self, images, prompts, metadata):
        return [{m["k"]: float(images[i].float().mean() > -1)} for i, m in enumerate(metadata)]

    def summarize(self, sums):
        return {"fake/overall": sum(s for s, _ in sums.values()) / sum(c for _, c in sums.values()), "fake/a_count": sums["a"][1]}


def test_prompt_metric_adapter_sums_per_key_and_names_the_set():
    ds = _cfg().eval.datasets["mnist"]
    items = [("p", {"k": "a"}), ("q", {"k": "b"}), ("r", {"k": "a"})]
    ctx = M.Context("geneval", ds, 3, 32, DistInfo(), items)
    adapter = M.PromptScores(ctx, _FakePromptMetric(), "fake")
    adapter.update({}, torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [0, 2])
    adapter.update({}, torch.zeros(1, 3, 4, 4, dtype=torch.uint8), [1])
    assert adapter.result() == {"fake_geneval/overall": 1.0, "fake_geneval/a_count": 2.0}


def test_builtin_reference_is_class_balanced():
    ds = _cfg().eval.datasets["mnist"]
    from nanogen.data.nano import load_nano

    imgs = M.builtin_reference_images("mnist", ds, 32, 20)
    assert imgs.dtype == torch.uint8 and imgs.shape == (20, 3, 32, 32)
    split = load_nano(ds.split, 32)
    labels = []
    for im in imgs:  # find each image's label in the split
        j = int(np.argmin(((split.images + 1) * 127.5 - im.float()).abs().flatten(1).sum(1)))
        labels.append(int(split.labels[j]))
    assert labels == [i % 10 for i in range(20)]


class _StubSpace(torch.nn.Module):
    """A fixed random projection standing in for a timm backbone (no weights offline)."""

    def __init__(self, key, dim):
        super().__init__()
        self.extractor_id = f"stub/{key}"
        self.proj = torch.randn(3 * 8 * 8, dim, generator=torch.Generator().manual_seed(len(key)), dtype=torch.float64)

    def forward(self, images):
        x = torch.nn.functional.interpolate(images.double(), size=(8, 8), mode="area").flatten(1) / 255
        return x @ self.proj


def test_fdr6_and_mind6_through_the_registry(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from nanogen.eval import refstats, representations

    monkeypatch.setattr(representations, "build_extractor", lambda key, device="cpu", weights=None: _StubSpace(key, representations.REPRESENTATIONS[key].dim))
    for rep in representations.REPRESENTATIONS.values():
        refstats.save(tmp_path / "stats" / rep.stats_file, np.full(rep.dim, 0.1), np.eye(rep.dim), {})
    common = ["eval", "-c", TINY, "--ckpt", tiny_ckpt, "--out", str(tmp_path), "--json", "--no-samples",
              "eval.datasets.mnist.num_samples=8", "eval.datasets.mnist.batch_size=4"]  # fmt: skip
    assert main([*common, "eval.datasets.mnist.metrics=[mind6]"]) == 0
    mind = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(k for k in mind if k.startswith("mind_")) == sorted(f"mind_{k}_mnist" for k in representations.REPRESENTATIONS)
    assert "mind6_mnist" not in mind  # the reference reports the six, no aggregate
    assert all(v > 0 for k, v in mind.items() if k.startswith("mind_"))
    hf = ["eval.datasets.mnist.type=hf", f"eval.datasets.mnist.stats_dir={tmp_path / 'stats'}"]
    with pytest.warns(UserWarning):
        assert main([*common, *hf, "eval.datasets.mnist.metrics=[fdr6]"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key, rep in representations.REPRESENTATIONS.items():
        assert res[f"fdr_{key}_mnist"] == pytest.approx(res[f"fd_{key}_mnist"] / rep.norm_const, rel=1e-12)
    six = [res[f"fdr_{k}_mnist"] for k in representations.REPRESENTATIONS]
    assert res["fdr6_mnist"] == pytest.approx(sum(six) / 6, rel=1e-12)
