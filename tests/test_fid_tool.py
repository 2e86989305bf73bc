"""``nanogen fid`` / ``nanogen ref-stats``, reference statistics files and image sources (issue 7 items 2-3,
spec evaluation.md §7.4 item 7). Uses the real Inception weights on a handful of tiny images."""

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error
from nanogen.cli import main
from nanogen.eval import refstats
from nanogen.eval.fid import GaussianMoments, frechet_distance
from nanogen.eval.image_sources import ImageSource
from nanogen.eval.inception import InceptionFeatures


def _images(n, seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


def _fid_json(capsys, *argv):
    assert main(["fid", *argv, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_stats_vs_stats_is_the_closed_form(tmp_path, capsys):
    a, b = np.array([0.1, 2.0, 3.0]), np.array([0.3, 0.5, 4.0])
    m1, m2 = np.array([1.0, 0.0, -1.0]), np.array([0.0, 0.5, 1.0])
    refstats.save(tmp_path / "a.npz", m1, np.diag(a), {})
    np.savez(tmp_path / "b.npz", ref_mu=m2, ref_sigma=np.diag(b))  # the reference's alternative key names
    got = _fid_json(capsys, str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert got["fid"] == pytest.approx(expected, rel=1e-10)


def test_folder_npz_and_library_path_agree(tmp_path, capsys):
    imgs_a, imgs_b = _images(6, 0), _images(5, 1)
    np.savez(tmp_path / "a.npz", imgs_a)
    _pngs(tmp_path / "a_png", imgs_a)
    np.savez_compressed(tmp_path / "b.npz", imgs_b)  # compressed members stream too
    with pytest.warns(UserWarning, match="only 6 samples"):
        via_npz = _fid_json(capsys, str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    with pytest.warns(UserWarning):
        via_png = _fid_json(capsys, str(tmp_path / "a_png"), str(tmp_path / "b.npz"))
    assert via_npz["fid"] == pytest.approx(via_png["fid"], rel=1e-9)  # PNG is lossless: same pixels, same number
    assert via_npz["n_a"] == 6 and via_npz["n_b"] == 5
    inc = InceptionFeatures("cpu")
    moms = []
    for imgs in (imgs_a, imgs_b):
        m = GaussianMoments.empty(2048)
        m.update(inc(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()))
        moms.append(m)
    library = frechet_distance(*moms[0].mean_cov(), *moms[1].mean_cov())
    assert via_npz["fid"] == pytest.approx(library, rel=1e-9)


def test_ref_stats_writes_a_manifest_and_gives_the_same_fid(tmp_path, capsys):
    imgs_a, imgs_b = _images(5, 2), _images(5, 3)
    np.savez(tmp_path / "a.npz", imgs_a)
    np.savez(tmp_path / "b.npz", imgs_b)
    with pytest.warns(UserWarning):
        assert main(["ref-stats", str(tmp_path / "a.npz"), str(tmp_path / "a_stats.npz"), "--device", "cpu"]) == 0
    st = refstats.load(tmp_path / "a_stats.npz", dim=2048)
    assert st.manifest["num_images"] == 5 and st.manifest["extractor"].startswith("inception-v3-tf2015/pool3")
    with pytest.warns(UserWarning):
        from_images = _fid_json(capsys, str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))["fid"]
    with pytest.warns(UserWarning):
        from_stats = _fid_json(capsys, str(tmp_path / "a_stats.npz"), str(tmp_path / "b.npz"))["fid"]
    assert from_stats == pytest.approx(from_images, rel=1e-9)


def test_extractor_mismatch_is_refused(tmp_path, capsys):
    refstats.save(tmp_path / "a.npz", np.zeros(4), np.eye(4), {"extractor": "inception-v3-tf2015/pool3 (x)"})
    refstats.save(tmp_path / "b.npz", np.zeros(4), np.eye(4), {"extractor": "dinov2/cls (timm)"})
    one_line_error(capsys, ["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")], "use one extractor for both")
    ref = refstats.load(tmp_path / "b.npz")
    with pytest.raises(Exception, match="rebuild it with nanogen ref-stats"):
        ref.check_compatible("inception-v3-tf2015/pool3 (fid-helper)", "FID reference")


def test_bad_inputs_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    refstats.save(tmp_path / "s8.npz", np.zeros(8), np.eye(8), {})
    refstats.save(tmp_path / "s4.npz", np.zeros(4), np.eye(4), {})
    np.savez(tmp_path / "float.npz", np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "nchw.npz", np.zeros((2, 3, 8, 8), np.uint8))
    _pngs(tmp_path / "mixed", _images(2, 0, 8))
    Image.fromarray(_images(1, 1, 9)[0]).save(tmp_path / "mixed" / "zz.png")
    np.savez(tmp_path / "bad_stats.npz", mu=np.zeros(3), sigma=np.zeros((3, 2)))
    s8 = str(tmp_path / "s8.npz")
    one_line_error(capsys, ["fid", str(tmp_path / "missing"), s8], "not found")
    one_line_error(capsys, ["fid", str(tmp_path / "empty"), s8], "contains no images")
    one_line_error(capsys, ["fid", s8, str(tmp_path / "s4.npz")], "8-d statistics", "4-d")
    one_line_error(capsys, ["fid", str(tmp_path / "float.npz"), s8], "arr_0 is float32", "uint8")
    one_line_error(capsys, ["fid", str(tmp_path / "nchw.npz"), s8], "(N, H, W, 3)")
    one_line_error(capsys, ["fid", str(tmp_path / "mixed"), s8], "zz.png", "9x9", "one size")
    one_line_error(capsys, ["fid", str(tmp_path / "bad_stats.npz"), s8], "expected (d,) and (d, d)")
    one_line_error(capsys, ["fid", "fid@adm", s8, "--data-dir", str(tmp_path)], "VIRTUAL_imagenet256_labeled.npz", "not found")
    np.savez(tmp_path / "one.npz", _images(1, 0))
    one_line_error(capsys, ["fid", str(tmp_path / "one.npz"), s8], "needs at least 2")


def test_image_source_streams_npz_in_blocks_across_shards(tmp_path):
    imgs = _images(11, 4, 6)
    np.savez(tmp_path / "shard-0000000.npz", arr_0=imgs[:4], index=np.arange(4))
    np.savez_compressed(tmp_path / "shard-0000004.npz", arr_0=imgs[4:], index=np.arange(4, 11))
    src = ImageSource(tmp_path)
    assert len(src) == 11 and src.size == (6, 6)
    got = [b.permute(0, 2, 3, 1).numpy() for b in src.batches(3, 2, 10)]
    assert [len(b) for b in got] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(got), imgs[2:10])
    with zipfile.ZipFile(tmp_path / "shard-0000004.npz") as zf:
        assert zf.getinfo("arr_0.npy").compress_type == zipfile.ZIP_DEFLATED


def test_presets_resolve_in_the_data_dir(tmp_path, capsys):
    refstats.save(tmp_path / "jit_in256_stats.npz", np.zeros(3), np.eye(3), {})
    refstats.save(tmp_path / "x.npz", np.ones(3), np.eye(3), {})
    assert _fid_json(capsys, "fid@jit", str(tmp_path / "x.npz"), "--data-dir", str(tmp_path))["fid"] == pytest.approx(3.0)


def test_adm_style_file_with_images_and_stats_uses_the_stats(tmp_path, capsys):
    """ADM's VIRTUAL_imagenet256_labeled.npz holds arr_0 (10k images) *and* mu/sigma: FID reads mu/sigma."""
    np.savez(tmp_path / "adm.npz", _images(3, 5), mu=np.zeros(3), sigma=np.eye(3))
    refstats.save(tmp_path / "x.npz", np.ones(3), np.eye(3), {})
    assert _fid_json(capsys, str(tmp_path / "adm.npz"), str(tmp_path / "x.npz"))["fid"] == pytest.approx(3.0)
    assert len(ImageSource(tmp_path / "adm.npz")) == 3  # the images stay readable (precision/recall reference)
