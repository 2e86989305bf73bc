"""``nanogen prepare``'s hub downloads (nanogen.prepare): the §7.5 table, local layout, completion markers, resume
after a crash, skip-when-complete, and the one-line error when the hub cannot be reached. No network: a fake
``download`` writes the files, and the real one runs under HF_HUB_OFFLINE=1."""

import errno
import json
from pathlib import Path

import httpx2
import numpy as np
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from nanogen.errors import NotAvailableError, UserError
from nanogen.prepare import (
    DATA_GROUPS,
    DATA_ITEMS,
    MARKER,
    RELEASE,
    hub_id,
    prepare_data,
    prepare_models,
    prepare_release,
)

# spec reference.md §7.5, written out independently of the module's table
SPEC_ITEMS = {
    "imagenet": ("diffusion-bench/imagenet", "imagenet"),
    "blip3o-256": ("diffusion-bench/blip3o-256", "blip3o-256"),
    "coco-30k": ("diffusion-bench/coco-30k", "mscoco"),
    "mjhq-30k": ("diffusion-bench/mjhq-30k", "mjhq"),
    "geneval": ("diffusion-bench/geneval", "geneval"),
    "dpgbench": ("diffusion-bench/dpgbench", "dpgbench"),
    "genaibench": ("diffusion-bench/genaibench", "genaibench"),
    "blip3o-original-lc": ("BLIP3o/BLIP3o-Pretrain-Long-Caption", "blip3o/long-caption"),
    "blip3o-original-sc": ("BLIP3o/BLIP3o-Pretrain-Short-Caption", "blip3o/short-caption"),
    "blip3o-original-jdb": ("BLIP3o/BLIP3o-Pretrain-JourneyDB", "blip3o/journeydb"),
}
SPEC_GROUPS = {
    "imagenet": {"imagenet"},
    "t2i": {"blip3o-256"},
    "eval": {"coco-30k", "mjhq-30k", "geneval", "dpgbench", "genaibench"},
    "t2i-res512": {"blip3o-original-lc", "blip3o-original-sc", "blip3o-original-jdb"},
    "all": set(SPEC_ITEMS),
}


def npz_bytes(tmp_path: Path, **arrays) -> bytes:
    path = tmp_path / "tmp.npz"
    np.savez(path, **arrays)
    return path.read_bytes()


class FakeHub:
    """Stands in for the hub: writes each repo's files into local_dir, keeping files already there (as
    huggingface_hub resumes), and returns a commit. ``fail`` maps a repo to an exception raised once, after the
    repo's first file is written (a crash mid-way) or before anything when ``at_start``."""

    def __init__(self, repos: dict[str, dict[str, bytes]], fail=None, at_start=False):
        self.repos, self.fail, self.at_start = repos, dict(fail or {}), at_start
        self.calls: list[str] = []
        self.written: list[str] = []

    def __call__(self, repo_id: str, repo_type: str, local_dir: Path) -> str:
        self.calls.append(repo_id)
        for i, (name, data) in enumerate(self.repos.get(repo_id, {"README.md": b"# card\n"}).items()):
            if repo_id in self.fail and (i == 1 or self.at_start):
                raise self.fail.pop(repo_id)
            path = local_dir / name
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self.written.append(f"{repo_id}:{name}")
        return "c0ffee" + repo_id.replace("/", "-")


def imagenet_repo(tmp_path: Path) -> dict[str, bytes]:
    return {
        "imagenet-latents-images/data-00000-of-00001.arrow": b"arrow-train",
        "imagenet-latents-images/val/data-00000-of-00001.arrow": b"arrow-val",
        "jit_in256_stats.npz": npz_bytes(tmp_path, mu=np.arange(4.0), sigma=np.eye(4)),
        "imagenet-256-val.npz": npz_bytes(tmp_path, arr_0=np.full((2, 8, 8, 3), 7, np.uint8)),
    }


def test_table_and_groups_match_spec_7_5():
    assert {n: (i.repo_id, i.local) for n, i in DATA_ITEMS.items()} == SPEC_ITEMS
    assert all(i.repo_type == "dataset" for i in DATA_ITEMS.values())
    assert {g: set(names) for g, names in DATA_GROUPS.items()} == SPEC_GROUPS
    assert (RELEASE.repo_id, RELEASE.repo_type) == ("diffusion-bench/diffusion-bench", "model")


def test_imagenet_layout_marker_and_skip_when_complete(tmp_path, capsys):
    hub = FakeHub({"diffusion-bench/imagenet": imagenet_repo(tmp_path)})
    (res,) = prepare_data("imagenet", tmp_path / "data", download=hub)
    root = tmp_path / "data" / "imagenet"
    assert (res.status, res.local_dir, res.commit, res.warnings) == ("done", root, "c0ffeediffusion-bench-imagenet", [])
    assert np.array_equal(np.load(root / "jit_in256_stats.npz")["sigma"], np.eye(4))
    assert (root / "imagenet-latents-images/val/data-00000-of-00001.arrow").read_bytes() == b"arrow-val"
    marker = json.loads((root / MARKER).read_text())
    assert marker == {"repo_id": "diffusion-bench/imagenet", "repo_type": "dataset", "commit": res.commit}
    assert not (root / (MARKER + ".tmp")).exists()
    assert capsys.readouterr().out == f"imagenet: done (diffusion-bench/imagenet -> {root} @ {res.commit})\n"

    (again,) = prepare_data("imagenet", tmp_path / "data", download=FakeHub({}))
    assert (again.status, again.commit) == ("skipped", res.commit)
    assert capsys.readouterr().out == f"imagenet: skipped, already complete ({root / MARKER})\n"


def test_skip_never_calls_the_download(tmp_path):
    hub = FakeHub({})
    prepare_data("eval", tmp_path, download=hub)
    assert hub.calls == [SPEC_ITEMS[n][0] for n in DATA_GROUPS["eval"]]
    assert all((tmp_path / SPEC_ITEMS[n][1] / MARKER).is_file() for n in DATA_GROUPS["eval"])
    hub.calls.clear()
    assert [r.status for r in prepare_data("all", tmp_path, download=hub)] == ["done"] * 2 + ["skipped"] * 5 + ["done"] * 3
    assert hub.calls == [SPEC_ITEMS[n][0] for n in ("imagenet", "blip3o-256", *DATA_GROUPS["t2i-res512"])]
    assert (tmp_path / "blip3o" / "journeydb" / MARKER).is_file()  # nested local dirs


def test_crash_mid_way_resumes_and_marks_only_when_finished(tmp_path, capsys):
    repo = imagenet_repo(tmp_path)
    hub = FakeHub({"diffusion-bench/imagenet": repo}, fail={"diffusion-bench/imagenet": httpx2.ReadError("reset")})
    with pytest.raises(UserError) as e:
        prepare_data("imagenet", tmp_path, download=hub)
    root = tmp_path / "imagenet"
    assert str(e.value) == (
        f"cannot reach the Hugging Face Hub (ReadError: reset); missing: imagenet (diffusion-bench/imagenet -> {root}); "
        "rerun `nanogen prepare --data imagenet` when online (finished items are kept)"
    )
    assert not (root / MARKER).exists()
    first = next(iter(repo))
    assert hub.written == [f"diffusion-bench/imagenet:{first}"]
    assert capsys.readouterr().out == f"imagenet: failed (diffusion-bench/imagenet -> {root}: ReadError: reset)\n"

    (res,) = prepare_data("imagenet", tmp_path, download=hub)  # the rerun continues: only the rest is written
    assert res.status == "done" and (root / MARKER).is_file()
    assert hub.written == [f"diffusion-bench/imagenet:{name}" for name in repo]
    assert all((root / name).read_bytes() == data for name, data in repo.items())


def test_completed_items_survive_a_failed_run(tmp_path):
    offline = {r: OfflineModeIsEnabled("offline") for r in ("diffusion-bench/mjhq-30k", "diffusion-bench/genaibench")}
    with pytest.raises(UserError) as e:
        prepare_data("eval", tmp_path, download=FakeHub({}, fail=offline, at_start=True))
    assert str(e.value) == (
        f"cannot reach the Hugging Face Hub (HF_HUB_OFFLINE=1 is set); missing: mjhq-30k (diffusion-bench/mjhq-30k -> "
        f"{tmp_path / 'mjhq'}), genaibench (diffusion-bench/genaibench -> {tmp_path / 'genaibench'}); "
        "rerun `nanogen prepare --data eval` when online (finished items are kept)"
    )
    assert sorted(p.parent.name for p in tmp_path.glob(f"*/{MARKER}")) == ["dpgbench", "geneval", "mscoco"]

    hub = FakeHub({})
    statuses = [r.status for r in prepare_data("eval", tmp_path, download=hub)]
    assert statuses == ["skipped", "done", "skipped", "skipped", "done"]
    assert hub.calls == ["diffusion-bench/mjhq-30k", "diffusion-bench/genaibench"]


def test_real_snapshot_download_offline_is_one_line_naming_every_missing_item(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "dpgbench").mkdir()
    (tmp_path / "dpgbench" / "part.arrow").write_bytes(b"half")  # a crashed earlier run: must not count as done
    with pytest.raises(UserError) as e:
        prepare_data("all", tmp_path)
    msg = str(e.value)
    missing = ", ".join(f"{n} ({repo} -> {tmp_path / local})" for n, (repo, local) in SPEC_ITEMS.items())
    assert msg == (
        f"cannot reach the Hugging Face Hub (HF_HUB_OFFLINE=1 is set); missing: {missing}; "
        "rerun `nanogen prepare --data all` when online (finished items are kept)"
    )
    assert "\n" not in msg and "Error" not in msg and "Traceback" not in msg
    assert capsys.readouterr().out.count(": failed (") == len(SPEC_ITEMS)
    assert not list(tmp_path.rglob(MARKER))


def test_release_layout_and_offline_error(tmp_path, monkeypatch):
    files = {
        "imagenet/ckpts/ddt-xl-sdvae-ema-v0.pt": b"ckpt",
        "t2i/ckpts/t2i-ddt-v0.pt": b"ckpt",
        "stage1/decoders/dinov2-vit-b/decoder.pt": b"decoder",
        "stage1/stats/dinov2-vit-b/stats.pt": b"stats",
    }
    dest = tmp_path / "pretrained_models"
    res = prepare_release(dest, download=FakeHub({"diffusion-bench/diffusion-bench": files}))
    assert (res.status, res.local_dir, res.warnings) == ("done", dest, [])
    assert (dest / "stage1/decoders/dinov2-vit-b/decoder.pt").read_bytes() == b"decoder"
    assert json.loads((dest / MARKER).read_text())["repo_type"] == "model"
    assert prepare_release(dest, download=FakeHub({})).status == "skipped"

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"^cannot reach the Hugging Face Hub \(HF_HUB_OFFLINE=1 is set\); missing: "
                       r"release \(diffusion-bench/diffusion-bench -> .*other\); rerun `nanogen prepare --models`"):  # fmt: skip
        prepare_release(tmp_path / "other")


def test_missing_expected_imagenet_files_are_warnings(tmp_path, capsys):
    repo = {k: v for k, v in imagenet_repo(tmp_path).items() if not k.endswith(".npz")}
    (res,) = prepare_data("imagenet", tmp_path, download=FakeHub({"diffusion-bench/imagenet": repo}))
    assert res.status == "done" and len(res.warnings) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("imagenet: done")
    assert [line.split(" is missing")[0] for line in out[1:]] == [
        f"warning: imagenet: {tmp_path / 'imagenet' / name}" for name in ("jit_in256_stats.npz", "imagenet-256-val.npz")
    ]


def test_reasons_for_auth_disk_and_bugs(tmp_path):
    url = "https://huggingface.co/api/datasets/diffusion-bench/imagenet"
    unauthorized = HfHubHTTPError("401", response=httpx2.Response(401, request=httpx2.Request("GET", url)))
    with pytest.raises(UserError, match=r"^cannot reach the Hugging Face Hub \(401 unauthorized: `hf auth login`\)"):
        prepare_data("imagenet", tmp_path, download=FakeHub({}, {"diffusion-bench/imagenet": unauthorized}, True))
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(UserError, match=r"^cannot write the downloads \(OSError: \[Errno 28\] No space left on device\)"):
        prepare_data("t2i", tmp_path, download=FakeHub({}, {"diffusion-bench/blip3o-256": full}, True))
    with pytest.raises(KeyError):  # a bug in the download keeps its traceback
        prepare_data("t2i", tmp_path, download=FakeHub({}, {"diffusion-bench/blip3o-256": KeyError("x")}, True))
    with pytest.raises(UserError, match=r"^prepare --data: unknown group 'imagenet-512'; use one of imagenet, t2i, "):
        prepare_data("imagenet-512", tmp_path)


def test_prepare_models_by_name_or_hub_id_offline(monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert hub_id("dinov2-vit-b") == "facebook/dinov2-with-registers-base"
    assert hub_id("someone/some-model") == "someone/some-model"
    with pytest.raises(NotAvailableError) as e:
        prepare_models(["someone/some-model"])
    assert str(e.value) == "prepare --models: cannot download 'someone/some-model' (HF_HUB_OFFLINE=1 is set)"
    # the nano tier's own models are trained here, never fetched: the error names the command that makes them
    with pytest.raises(UserError, match=r"'nano-vit-s' is not downloaded but trained by nanogen itself: run 'nanogen train-encoder'"):
        hub_id("nano-vit-s")
    with pytest.raises(UserError, match="train-stage1 -c configs/stage1/nano/nano-vae.yaml"):
        prepare_models(["nano-vae"])


def test_fid_stats_group_fetches_the_adm_batch_by_url_and_the_fd_stats(tmp_path, monkeypatch, capsys):
    from nanogen import prepare
    from nanogen.eval import refstats

    hub = FakeHub({"nanovisionx/nanogen-evals-stats": {"convnext_in256_t224_stats.npz": b"x"}})
    got = []

    def fake_url(url, local_dir):  # the real fetch_url is the only network path; never taken in tests
        got.append(url)
        local_dir.mkdir(parents=True, exist_ok=True)
        (local_dir / "VIRTUAL_imagenet256_labeled.npz").write_bytes(b"npz")
        return "sha256:abc"

    monkeypatch.setattr(prepare, "fetch_url", fake_url)

    def download(repo_id, repo_type, local_dir):
        return fake_url(repo_id, local_dir) if repo_type == "url" else hub(repo_id, repo_type, local_dir)

    res = prepare_data("fid-stats", tmp_path, download=download)
    assert [r.status for r in res] == ["done", "done"] and got == [refstats.ADM_REF_BATCH_URL]
    assert refstats.preset_path("adm", tmp_path / "imagenet").is_file()  # where fid@adm looks
    assert (tmp_path / "imagenet" / "fd-stats" / "convnext_in256_t224_stats.npz").is_file()


def test_url_download_respects_offline_mode(tmp_path, monkeypatch):
    from nanogen.prepare import fetch_url

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1"):
        fetch_url("https://example.invalid/x.npz", tmp_path)
    assert not any(tmp_path.iterdir())
