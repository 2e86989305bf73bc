"""LPIPS v0.1, VGG16 variant (Zhang et al. 2018): the perceptual distance of PixelGen (spec ``reference.md``
§4.7) and of stage-1 training / evaluation (§6.7, §6.8; ``evaluation.md`` "LPIPS").

    lp = load_lpips()                       # or load_lpips("/w/vgg16-397923af.pth", "/w/vgg.pth")
    d = lp(x_hat, x)                        # images (B, 3, H, W) in [-1, 1], H, W >= 16 -> (B,) distances

Algorithm (per image pair):
1. scaling layer: ``(x - shift) / scale`` per RGB channel, shift (-.030, -.088, -.188), scale (.458, .448, .450)
   (float32 buffers, as in the ``lpips`` package, so a float64 model matches it bit for bit too);
2. VGG16 ``features`` (13 conv3x3 + ReLU, 4 max-pools); taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
   (``features`` indices 3, 8, 15, 22, 29; 64, 128, 256, 512, 512 channels);
3. per tap: unit-normalise every feature vector over channels, ``f / (sqrt(sum_c f^2) + 1e-10)``, take the
   squared difference of the two images' normalised features, apply the tap's 1x1 "lin" conv (one output
   channel, non-negative weights, no bias) and average over space;
4. sum over the five taps. The output is one value per sample, shape ``(B,)`` (not the ``lpips`` package's
   ``(B, 1, 1, 1)``).

The network is frozen (eval mode, ``requires_grad`` False) but differentiable with respect to its inputs, so it
works as a training loss on predicted images. No input range check: predicted images may leave [-1, 1].

Weights: two local files, nothing is downloaded.
- ``vgg16-397923af.pth``: the VGG16 backbone, torchvision format: the full ``torchvision.models.vgg16()`` state
  dict (keys ``features.0.weight`` ...; the ``classifier.*`` keys are ignored), or only its ``features`` part
  (keys ``0.weight`` ...). A full ``lpips.LPIPS`` state dict (keys ``net.slice1.0.weight`` ...) also works.
  Source: https://download.pytorch.org/models/vgg16-397923af.pth (torchvision's ImageNet weights).
- ``vgg.pth``: the five lin layers, LPIPS format (keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``,
  shapes ``[1, C, 1, 1]``). It ships in the ``lpips`` pip package as ``lpips/weights/v0.1/vgg.pth`` (md5
  d507d7349b931f0638a25a48a722f98a, the same file taming-transformers downloads).

``load_lpips(vgg_path, lin_path)`` takes a file or a directory holding the file under its usual name. A path
left as None is looked up, offline, in this order: the env var (``NANOGEN_LPIPS_VGG`` / ``NANOGEN_LPIPS_LIN``),
then the usual cache (torch hub's ``checkpoints/vgg16-397923af.pth``; the installed ``lpips`` package's
``weights/v0.1/vgg.pth``, found without importing it). Nothing found: ``NotAvailableError`` naming the file.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.errors import CheckpointError, NotAvailableError

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
# torchvision's VGG16 configuration "D": conv widths, "M" = 2x2 max-pool. The last pool (features[30]) is not
# needed: relu5_3 (features[29]) is the last tap.
VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
CHANNELS = (64, 128, 256, 512, 512)
MIN_SIZE = 16  # four 2x2 pools before relu5_3

VGG_FILE = "vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
VGG_ENV = "NANOGEN_LPIPS_VGG"
LIN_ENV = "NANOGEN_LPIPS_LIN"
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def vgg16_features() -> tuple[nn.Sequential, tuple[int, ...]]:
    """VGG16 ``features[0:30]`` with torchvision's module indices (so its state dict keys load unchanged) and
    the indices of the tapped ReLUs (the last ReLU of each block)."""
    layers: list[nn.Module] = []
    taps: list[int] = []
    c_in = 3
    for i, v in enumerate(VGG16_CFG):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        c_in = int(v)
        if i + 1 == len(VGG16_CFG) or VGG16_CFG[i + 1] == "M":
            taps.append(len(layers) - 1)
    return nn.Sequential(*layers), tuple(taps)


def normalize_channels(f: Tensor, eps: float = EPS) -> Tensor:
    """LPIPS's unit normalisation over channels (dim 1): ``f / (sqrt(sum_c f^2) + eps)``."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16; ``forward(x0, x1)`` -> ``(B,)``. Build it with random weights and fill it with
    ``load_weights`` (``load_lpips`` does both)."""

    def __init__(self) -> None:
        super().__init__()
        self.features, taps = vgg16_features()
        self.taps = taps
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def freeze(self) -> LPIPS:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> LPIPS:  # frozen: always in eval mode
        return super().train(False)

    def load_weights(
        self,
        vgg: Mapping[str, Tensor],
        lin: Mapping[str, Tensor],
        vgg_where: str = "VGG16 weights",
        lin_where: str = "LPIPS lin weights",
    ) -> LPIPS:
        """Copy a VGG16 backbone state dict (torchvision format) and an LPIPS lin state dict into this module;
        ``*_where`` name the sources in error messages."""
        self.features.load_state_dict(_vgg_state(vgg, self.features, vgg_where))
        with torch.no_grad():
            for k, w in enumerate(_lin_state(lin, lin_where)):
                self.lins[k].weight.copy_(w)
        return self.freeze()

    def tap_features(self, x: Tensor) -> list[Tensor]:
        """The five VGG16 activations (relu1_2 ... relu5_3) of images in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects RGB images (B, 3, H, W), got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(
                f"LPIPS-VGG needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(x.shape[-2:])}"
            )
        h = (x.to(self.shift.dtype) - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        if x0.shape != x1.shape:
            raise ValueError(
                f"LPIPS: the two image batches differ in shape: {tuple(x0.shape)} vs {tuple(x1.shape)}"
            )
        total = None
        for f0, f1, lin in zip(self.tap_features(x0), self.tap_features(x1), self.lins, strict=True):
            d = (normalize_channels(f0) - normalize_channels(f1)).pow(2)
            v = F.conv2d(d, lin.weight).mean(dim=(2, 3))[:, 0]
            total = v if total is None else total + v
        return total  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Weight files


def _vgg_state(sd: Mapping[str, Tensor], features: nn.Sequential, where: str) -> dict[str, Tensor]:
    """torchvision ``vgg16()`` / ``vgg16().features`` / ``lpips.LPIPS`` state dict -> ``features`` keys."""
    own = features.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith("features."):
            key = key[len("features.") :]
        elif key.startswith("net.slice"):  # lpips.LPIPS: net.slice<k>.<torchvision index>.<param>
            key = key.split(".", 2)[2]
        if key in own:
            out[key] = value
    missing = [k for k in own if k not in out]
    if missing:
        raise CheckpointError(
            f"{where}: not a torchvision VGG16 state dict (missing {len(missing)} keys, e.g. 'features.{missing[0]}')"
        )
    for k, v in out.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{where}: 'features.{k}' has shape {tuple(v.shape)}, VGG16 needs {tuple(own[k].shape)}"
            )
    return {k: v.float() for k, v in out.items()}


def _lin_state(sd: Mapping[str, Tensor], where: str) -> list[Tensor]:
    out = []
    for k, c in enumerate(CHANNELS):
        key = f"lin{k}.model.1.weight"
        if key not in sd:
            raise CheckpointError(f"{where}: not an LPIPS VGG lin state dict (no key '{key}')")
        w = sd[key]
        if tuple(w.shape) != (1, c, 1, 1):
            raise CheckpointError(
                f"{where}: '{key}' has shape {tuple(w.shape)}, LPIPS-VGG needs {(1, c, 1, 1)}"
            )
        if bool((w < 0).any()):
            raise CheckpointError(
                f"{where}: '{key}' has negative weights; LPIPS lin weights are non-negative"
            )
        out.append(w.float())
    return out


def _read(path: Path, what: str) -> Mapping[str, Tensor]:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(
            f"{what} '{path}' is not a readable PyTorch state dict ({type(e).__name__})"
        ) from None
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{what} '{path}' does not hold a state dict")
    return sd


def _lpips_package_lin() -> Path | None:
    spec = importlib.util.find_spec("lpips")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / LIN_FILE


def _in_dir(d: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (d / name).is_file():
            return d / name
    return d / names[0]


def find_vgg_weights(path: str | os.PathLike | None = None) -> Path:
    """The VGG16 backbone file: ``path`` (a file or a directory holding ``vgg16-397923af.pth``), else
    ``$NANOGEN_LPIPS_VGG``, else torch hub's ``checkpoints/vgg16-397923af.pth``."""
    how = f"download {VGG_URL} once and set {VGG_ENV}=/path/to/{VGG_FILE} (or pass the path to load_lpips)"
    if path is not None and not os.fspath(path):  # an empty config value means: not given
        path = None
    source = path if path is not None else os.environ.get(VGG_ENV) or None
    if source is not None:
        p = Path(source).expanduser()
        if p.is_dir():
            p = _in_dir(p, (VGG_FILE,))
        if not p.is_file():
            origin = "" if path is not None else f" (from {VGG_ENV})"
            raise NotAvailableError(f"LPIPS: VGG16 weight file '{p}'{origin} not found; {how}")
        return p
    p = Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE
    if p.is_file():
        return p
    raise NotAvailableError(f"LPIPS: VGG16 weight file '{VGG_FILE}' not found (looked in {p.parent}); {how}")


def find_lin_weights(path: str | os.PathLike | None = None) -> Path:
    """The LPIPS lin-layer file: ``path`` (a file, or a directory holding ``vgg.pth`` or
    ``weights/v0.1/vgg.pth``), else ``$NANOGEN_LPIPS_LIN``, else the installed ``lpips`` package's copy."""
    how = (
        f"it ships in the 'lpips' pip package as lpips/weights/v0.1/{LIN_FILE}: install lpips, or set "
        f"{LIN_ENV}=/path/to/{LIN_FILE} (or pass the path to load_lpips)"
    )
    if path is not None and not os.fspath(path):  # an empty config value means: not given
        path = None
    source = path if path is not None else os.environ.get(LIN_ENV) or None
    if source is not None:
        p = Path(source).expanduser()
        if p.is_dir():
            p = _in_dir(p, (LIN_FILE, f"weights/v0.1/{LIN_FILE}"))
        if not p.is_file():
            origin = "" if path is not None else f" (from {LIN_ENV})"
            raise NotAvailableError(f"LPIPS: lin weight file '{p}'{origin} not found; {how}")
        return p
    p = _lpips_package_lin()
    if p is not None and p.is_file():
        return p
    raise NotAvailableError(f"LPIPS: lin weight file '{LIN_FILE}' (LPIPS v0.1 VGG) not found; {how}")


def load_lpips(
    vgg_path: str | os.PathLike | None = None,
    lin_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
) -> LPIPS:
    """A frozen LPIPS-VGG16 with weights from local files (see the module docstring); never downloads."""
    vgg_file = find_vgg_weights(vgg_path)
    lin_file = find_lin_weights(lin_path)
    vgg = _read(vgg_file, "VGG16 weights")
    lin = _read(lin_file, "LPIPS lin weights")
    return (
        LPIPS()
        .load_weights(vgg, lin, f"VGG16 weights '{vgg_file}'", f"LPIPS lin weights '{lin_file}'")
        .to(device)
    )
