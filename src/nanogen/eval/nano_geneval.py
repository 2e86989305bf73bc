"""Nano GenEval: GenEval's scoring rules with an exact detector, for the nano scenes (data/nano_scenes.py).

GenEval (spec ``reference.md`` §8.4, ``evaluation.md`` §3.1) detects objects with Mask2Former, names their
colours with CLIP and applies per-tag rules to prompt metadata. Here the objects are coloured digits on black,
so detection is exact up to a small digit classifier that we train ourselves:

- Detector: ink = max over channels > ``INK_THRESHOLD``; the ink is dilated by k px (k = image size / 32)
  so that broken strokes of one digit join, while the renderer's 3k px gaps still keep two digits apart;
  connected components (8-connectivity) of the dilated mask with fewer than ``MIN_AREA``·k² ink pixels are
  noise. A component's box is the box of its ink; its crop (``object_crop``) goes through the digit CNN,
  whose softmax gives (class, confidence); one class per component (the argmax).
- Colour: the component's ink pixels are averaged with weights = their intensity (max channel), the mean is
  divided by its own maximum channel (removing brightness) and named by the nearest palette entry (Euclidean).
  For a rendered digit (pixel = intensity x colour) this returns the colour exactly.
- Rules: GenEval's own, from ``eval/t2i/geneval.py`` (``evaluate`` is its ``evaluate_image``): per class keep
  detections with confidence > 0.3 (> 0.9 for the counting tag), highest first, at most 16; every ``include``
  needs its top-``count`` detections to exist, ``count`` of them in the requested colour, and each of them in
  the requested relation to every object matched for the target group (``relative_position``, threshold
  0.1); an ``exclude`` fails when that class has >= ``count`` detections. Includes are ANDed, excludes ORed.
- Summary: accuracy per tag, ``overall`` = mean of the tag accuracies (official GenEval), ``per_image`` = mean
  over images (what the reference reports, §8.4), as ``geneval.summarize_sums`` computes them.

Decisions GenEval leaves open here: a component is one detection of one class (the argmax), so a digit never
counts for two classes; detections are kept at confidence strictly above the threshold, as GenEval's
``score > threshold``; the counting threshold applies to every class of a counting image, as in GenEval.

The digit CNN is trained on the 4,500 train digits rendered and cropped by the same functions as the scenes
and the detector (with random rotations of up to 10 degrees and glyph sizes 11-14 px), seeded, and cached
under ``$NANOGEN_CACHE/nano-geneval/`` keyed by a hash of its recipe. It reaches 98.4% on the 500
held-out digits (a 13 px MNIST digit is near the limit of what 4,500 training digits teach); the number is
stored with the weights. Seeded training is reproducible on one machine and thread count; other CPUs may
round differently and land a few tenths of a point away.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import Tensor, nn

from nanogen.checkpoint import save
from nanogen.data import nano_scenes as scenes
from nanogen.errors import UserError
from nanogen.eval.evaluate import cache_dir
from nanogen.eval.images import to_uint8
from nanogen.eval.t2i import geneval

# GenEval's rules and constants, under the names this module has always offered
from nanogen.eval.t2i.geneval import COUNTING_THRESHOLD as COUNTING_THRESHOLD
from nanogen.eval.t2i.geneval import MAX_OBJECTS as MAX_OBJECTS
from nanogen.eval.t2i.geneval import POSITION_THRESHOLD as POSITION_THRESHOLD
from nanogen.eval.t2i.geneval import THRESHOLD as THRESHOLD
from nanogen.eval.t2i.geneval import Detection as Detection
from nanogen.eval.t2i.geneval import evaluate_image as evaluate
from nanogen.eval.t2i.geneval import relative_position as relative_position
from nanogen.eval.t2i.geneval import render_table as render_table

INK_THRESHOLD = 0.25  # on the max-channel intensity in [0, 1]
MIN_AREA = 5  # ink pixels at 32x32; smaller components are noise
CROP, CROP_MAX = 16, 14  # classifier input: 16x16, objects at the 32x32 scale, at most 14 px
_PALETTE_NAMES = list(scenes.PALETTE)
_PALETTE_RGB = np.array([scenes.PALETTE[c] for c in _PALETTE_NAMES], np.float32)


# --------------------------------------------------------------------------- crops (training and detection)


def object_crop(intensity: np.ndarray, ink: np.ndarray, region: np.ndarray, k: int) -> np.ndarray:
    """The classifier's input for one object: the box of ``ink`` cut from ``intensity`` with everything
    outside ``region`` (the object's dilated ink) zeroed, divided by its maximum, brought to the 32x32
    canvas scale (divided by ``k``; a longer side above ``CROP_MAX`` is fitted to it) and centred in a
    CROP x CROP frame.
    At k = 1 a scene digit (13 px) is copied pixel for pixel: no resampling blur on so small a digit."""
    ys, xs = np.nonzero(ink)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    patch = np.where(region[y0:y1, x0:x1], intensity[y0:y1, x0:x1], 0.0).astype(np.float32)
    patch /= max(float(patch.max()), 1e-6)  # brightness does not change a digit
    h, w = patch.shape
    scale = min(1.0 / k, CROP_MAX / max(h, w))
    if scale < 1.0:  # antialiased bilinear (PIL widens the filter when shrinking)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        patch = np.clip(np.asarray(Image.fromarray(patch, mode="F").resize(size, Image.BILINEAR)), 0.0, 1.0)
        h, w = patch.shape
    out = np.zeros((CROP, CROP), np.float32)
    oy, ox = (CROP - h) // 2, (CROP - w) // 2
    out[oy : oy + h, ox : ox + w] = patch
    return out


def _grow(ink: np.ndarray, k: int) -> np.ndarray:
    return ndimage.binary_dilation(ink, structure=np.ones((3, 3), bool), iterations=k)


def components(rgb: np.ndarray) -> list[tuple[tuple[float, float, float, float], np.ndarray, str]]:
    """float (3, H, W) in [0, 1] -> per object: (box, crop, colour), in raster order of the components."""
    k = scenes.scale_of(rgb.shape[-1])
    intensity = rgb.max(axis=0)
    ink = intensity > INK_THRESHOLD
    labels, n = ndimage.label(_grow(ink, k), structure=np.ones((3, 3), int))
    out = []
    for region in (labels == i for i in range(1, n + 1)):
        own = ink & region
        if own.sum() < MIN_AREA * k * k:
            continue
        ys, xs = np.nonzero(own)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        out.append((box, object_crop(intensity, own, region, k), nearest_color(rgb[:, own], intensity[own])))
    return out


def nearest_color(pixels: np.ndarray, weights: np.ndarray) -> str:
    """(3, P) colours, (P,) weights -> the palette name nearest to their brightness-normalised mean."""
    mean = (pixels * weights).sum(axis=1) / max(float(weights.sum()), 1e-12)
    mean = mean / max(float(mean.max()), 1e-12)
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE_RGB - mean) ** 2).sum(axis=1)))]


# --------------------------------------------------------------------------- the digit classifier

RECIPE = {
    "version": 1,
    "crop": [CROP, CROP_MAX],
    "ink_threshold": INK_THRESHOLD,
    "heldout_glyph_size": scenes.GLYPH_SIZE,  # the accuracy is measured on digits drawn as in the scenes
    "glyph_sizes": [11, 12, 13, 14],  # around the scenes' 13 px, for generated digits
    "max_rotation_deg": 10.0,
    "copies": 4,  # augmented renderings per train digit
    "epochs": 4,
    "batch": 128,
    "lr": 5e-3,
    "weight_decay": 5e-4,
    "widths": [16, 32, 64],
    "seed": 0,
}


class DigitCNN(nn.Module):
    """Two 3x3 conv blocks at the full 16x16 (a 13 px digit has no detail to spare for an early pooling), then
    one at 8x8, pooled to 4x4, and a linear head (34k parameters)."""

    def __init__(self, widths: list[int]):
        super().__init__()
        c1, c2, c3 = widths

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.net = nn.Sequential(
            *block(1, c1), *block(c1, c2), nn.MaxPool2d(2),
            *block(c2, c3), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(c3 * (CROP // 4) ** 2, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, CROP, CROP) -> (B, 10) logits
        return self.net(x)


def _single_crop(glyph: np.ndarray) -> np.ndarray:
    """A glyph alone on black, quantised like a scene, through the detector's crop (all of its ink as one
    object, so a digit that the detector would split still trains as one)."""
    canvas = np.zeros((glyph.shape[0] + 4, glyph.shape[1] + 4), np.float32)
    canvas[2:-2, 2:-2] = np.rint(glyph * 255.0) / 255.0
    ink = canvas > INK_THRESHOLD
    return object_crop(canvas, ink, _grow(ink, 1), 1)


def _rotate(digit: np.ndarray, degrees: float) -> np.ndarray:
    img = Image.fromarray(digit.astype(np.float32), mode="F").rotate(degrees, resample=Image.BILINEAR)
    return np.rint(np.clip(np.asarray(img), 0, 255)).astype(np.uint8)


def _train_crops(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sizes, rot = RECIPE["glyph_sizes"], RECIPE["max_rotation_deg"]
    return np.stack(
        [
            _single_crop(scenes.render_glyph(_rotate(d, rng.uniform(-rot, rot)), int(rng.choice(sizes))))
            for d in digits
        ]
    )


def _heldout_crops(digits: np.ndarray) -> np.ndarray:
    """Held-out digits as the scenes draw them: no rotation, the scenes' glyph size."""
    return np.stack([_single_crop(scenes.render_glyph(d, scenes.GLYPH_SIZE)) for d in digits])


def _predict(model: nn.Module, crops: np.ndarray, device: torch.device | str, batch: int = 2048) -> Tensor:
    """float (N, CROP, CROP) -> (N, 10) softmax probabilities on the CPU."""
    out = []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            x = torch.from_numpy(crops[i : i + batch])[:, None].to(device)
            out.append(model(x).float().softmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 10)


def train_digit_classifier() -> tuple[DigitCNN, float]:
    """Train on the CPU from RECIPE; returns the model (eval mode) and its held-out accuracy."""
    digits, labels = scenes._digits()
    train, held = (np.concatenate(scenes.split_pool(s)) for s in ("train", "heldout"))
    rng = np.random.default_rng(RECIPE["seed"])
    x = np.concatenate([_train_crops(digits[train], rng) for _ in range(RECIPE["copies"])])
    y = torch.from_numpy(np.tile(labels[train], RECIPE["copies"]))
    x = torch.from_numpy(x)[:, None].contiguous(memory_format=torch.channels_last)  # ~25% faster convs on CPU
    # seeded init and dropout without touching the caller's RNG; grad on even when called from evaluation
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(RECIPE["seed"])
        model = DigitCNN(RECIPE["widths"]).to(memory_format=torch.channels_last)
        steps = RECIPE["epochs"] * (len(x) // RECIPE["batch"])
        opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=RECIPE["lr"], total_steps=steps)
        model.train()
        for _ in range(RECIPE["epochs"]):
            order = torch.from_numpy(rng.permutation(len(x)))
            for i in range(len(x) // RECIPE["batch"]):
                idx = order[i * RECIPE["batch"] : (i + 1) * RECIPE["batch"]]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    pred = _predict(model, _heldout_crops(digits[held]), "cpu").argmax(dim=1).numpy()
    return model, float((pred == labels[held]).mean())


def classifier_path() -> Path:
    key = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "nano-geneval" / f"digit-cnn-{key}.pt"


_loaded: dict[
    tuple[Path, str], tuple[DigitCNN, float]
] = {}  # per cache file and device, for repeated scoring


def load_digit_classifier(device: torch.device | str = "cpu") -> tuple[DigitCNN, float]:
    """The cached digit CNN and its held-out accuracy. Trained on first use: ~45 s on one busy CPU core
    (7 s of rendering, the rest 2,250 AdamW steps), once per machine and recipe."""
    path = classifier_path()
    key = (path, str(torch.device(device)))
    if key not in _loaded or not path.is_file():
        _loaded[key] = _load_or_train(path, device)
    return _loaded[key]


def _load_or_train(path: Path, device: torch.device | str) -> tuple[DigitCNN, float]:
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitCNN(RECIPE["widths"])
        model.load_state_dict(state["state_dict"])
        accuracy = float(state["heldout_accuracy"])
    else:
        model, accuracy = train_digit_classifier()
        # atomic (tmp + rename): a reader, or a second process training at the same time, never sees a partial file
        save(path, {"recipe": RECIPE, "state_dict": model.state_dict(), "heldout_accuracy": accuracy})
    return model.eval().to(device), accuracy


# --------------------------------------------------------------------------- detection


def _as_unit_rgb(images: Tensor | np.ndarray) -> np.ndarray:
    """uint8 images, or float images in [-1, 1] (quantised like every generated image), -> float [0, 1]."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] != 3:
        raise UserError(f"nano GenEval: images must be (N, 3, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = to_uint8(x)
    return x.cpu().numpy().astype(np.float32) / 255.0


def detect(
    images: Tensor | np.ndarray, model: nn.Module, device: torch.device | str
) -> list[dict[str, list[Detection]]]:
    """Per image, class name -> all its detections, most confident first (the rules apply the thresholds).
    A detection's label is a digit name, its score the classifier's softmax, its box ends exclusive and its
    colour the nearest palette entry."""
    per_image = [components(rgb) for rgb in _as_unit_rgb(images)]
    crops = [c for objs in per_image for _, c, _ in objs]
    probs = _predict(model, np.stack(crops) if crops else np.zeros((0, CROP, CROP), np.float32), device)
    conf, cls = probs.max(dim=1)
    out, j = [], 0
    for objs in per_image:
        found: dict[str, list[Detection]] = {}
        for box, _, color in objs:
            label = scenes.DIGITS[int(cls[j])]
            found.setdefault(label, []).append(Detection(label, float(conf[j]), box, color))
            j += 1
        out.append({c: sorted(d, key=lambda o: -o.score) for c, d in found.items()})
    return out


# --------------------------------------------------------------------------- scoring


def score_images(
    images: Tensor | np.ndarray, metadata: list[dict], device: torch.device | str = "cpu"
) -> list[bool]:
    """GenEval ``correct`` per image; images uint8 (N, 3, H, W) or float in [-1, 1], H a multiple of 32."""
    if len(images) != len(metadata):
        raise UserError(
            f"nano GenEval: {len(images)} images but {len(metadata)} metadata rows; pass one row per image"
        )
    model, _ = load_digit_classifier(device)
    return [evaluate(d, m) for d, m in zip(detect(images, model, device), metadata, strict=True)]


def summarize(metadata: list[dict], correct: list[bool]) -> dict[str, float]:
    """Accuracy per tag (``nano_geneval/<tag>``), ``overall`` = mean of the tags present (GenEval's number)
    and ``per_image`` = mean over all images (the reference's number)."""
    return geneval.summarize_sums(geneval.tag_sums(metadata, correct), "nano_geneval")


class NanoGenEvalMetric:
    """Nano GenEval under the text-to-image metric protocol (as ``geneval.GenEvalMetric``): each image adds
    1.0 / 0.0 under its tag; the prompts are not needed, the metadata rows say everything."""

    name = "nano_geneval"
    keys = scenes.TAGS

    def __init__(self, device: torch.device | str):
        self.device = device
        load_digit_classifier(device)  # train or load now, not inside the first scored batch

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> list[dict[str, float]]:
        return [
            {m["tag"]: float(ok)}
            for m, ok in zip(metadata, score_images(images, metadata, self.device), strict=True)
        ]

    def summarize(self, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        return geneval.summarize_sums(sums, self.name)
