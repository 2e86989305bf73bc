"""The nano text-to-image tier: scenes of coloured real MNIST digits with GenEval-style captions.

An offline analogue of GenEval (spec ``reference.md`` §8.4, ``evaluation.md`` §3.1 and §5.3): the six
GenEval tags, its prompt templates and its metadata schema (``tag``,
``include[{class, count, color?, position?}]``, ``exclude``, ``prompt``), with the ten digits as the object
classes and a six-colour palette.

Rendering (all lengths for a 32x32 canvas; a canvas of ``32k`` pixels scales them by ``k``):
- the canvas is black and split into a 2x2 grid of 16x16 cells; every object gets its own cell;
- a digit is cropped to its ink box in the 28x28 MNIST image and resized (antialiased bilinear) so that its
  longer side is 13 px; it is placed inside its cell with a random jitter, redrawn until every pair of digits
  has at least ``GAP`` = 3 px of black between their ink boxes (centring always satisfies it);
- colour: pixel = intensity * colour, so the maximum over channels is the grey digit for every palette entry.

Scenes are deterministic: scene ``i`` of ``make_scenes(split, n, seed)`` depends only on (split, seed, i),
and uses only digits of that split of ``nano.split_indices``.
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nanogen.data.nano import load_mnist_5k, split_indices
from nanogen.errors import UserError

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS = ("zeros", "ones", "twos", "threes", "fours", "fives", "sixes", "sevens", "eights", "nines")
NUMBERS = {2: "two", 3: "three", 4: "four"}  # GenEval counts 2..4
RELATIONS = ("left of", "right of", "above", "below")
# Six well-separated colours, each with a maximum channel of 1 (so intensity survives colouring exactly).
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
HELDOUT_PER_CLASS = 50  # the nano tier's split: 4,500 train / 500 held-out digits
BASE_SIZE = 32  # all lengths below are for this canvas size
# Longer side of a digit's ink box: the largest that leaves GAP px between digits centred in 16 px cells. The
# digit classifier is ~0.5 points more accurate on 13 px than on 12 px digits (MNIST at this size is near the
# limit of what 4,500 training digits can teach).
GLYPH_SIZE = 13
GAP = 3  # minimum black between two digits' ink boxes
PLACEMENT_TRIES = 50
# The nano T2I training set: make_scenes("train", NANO_TRAIN_SCENES, seed), ~0.5 ms a scene to draw; 10,000
# scenes are 3 epochs of a 1,500-step, batch-32 run, and each train digit appears in about four of them.
NANO_TRAIN_SCENES = 10_000


@dataclass
class SceneSet:
    images: Tensor  # (N, 3, S, S) uint8
    prompts: list[str]
    metadata: list[dict]  # GenEval format, one row per image
    # Per image, the ground truth of every digit in include order:
    # {"class", "color", "box": (x0, y0, x1, y1) of its ink, ends exclusive, "source": index into MNIST-5k}.
    objects: list[list[dict]]

    def __len__(self) -> int:
        return len(self.prompts)


# --------------------------------------------------------------------------- prompts and metadata


def with_article(word: str) -> str:
    """GenEval's rule ("an" before a vowel), except "one", which is spoken with a consonant: "a one"."""
    return f"an {word}" if word[0] in "aeiou" and word != "one" else f"a {word}"


def _single(a: int) -> dict:
    return {
        "tag": "single_object",
        "include": [{"class": DIGITS[a], "count": 1}],
        "prompt": f"a photo of {with_article(DIGITS[a])}",
    }


def _two(a: int, b: int) -> dict:
    return {
        "tag": "two_object",
        "include": [{"class": DIGITS[a], "count": 1}, {"class": DIGITS[b], "count": 1}],
        "prompt": f"a photo of {with_article(DIGITS[a])} and {with_article(DIGITS[b])}",
    }


def _counting(a: int, n: int) -> dict:
    # Exactly n: at least n (include) and not n + 1 (exclude), as GenEval writes it.
    return {
        "tag": "counting",
        "include": [{"class": DIGITS[a], "count": n}],
        "exclude": [{"class": DIGITS[a], "count": n + 1}],
        "prompt": f"a photo of {NUMBERS[n]} {PLURALS[a]}",
    }


def _colors(a: int, color: str) -> dict:
    return {
        "tag": "colors",
        "include": [{"class": DIGITS[a], "count": 1, "color": color}],
        "prompt": f"a photo of {with_article(color)} {DIGITS[a]}",
    }


def _position(a: int, relation: str, b: int) -> dict:
    # GenEval's order: the reference object B first, then A with position [relation, index of B's group].
    return {
        "tag": "position",
        "include": [
            {"class": DIGITS[b], "count": 1},
            {"class": DIGITS[a], "count": 1, "position": [relation, 0]},
        ],
        "prompt": f"a photo of {with_article(DIGITS[a])} {relation} {with_article(DIGITS[b])}",
    }


def _color_attr(a: int, ca: str, b: int, cb: str) -> dict:
    return {
        "tag": "color_attr",
        "include": [
            {"class": DIGITS[a], "count": 1, "color": ca},
            {"class": DIGITS[b], "count": 1, "color": cb},
        ],
        "prompt": f"a photo of {with_article(ca)} {DIGITS[a]} and {with_article(cb)} {DIGITS[b]}",
    }


@functools.cache
def _metadata_by_tag() -> dict[str, tuple[dict, ...]]:
    """Every caption the generator can produce, per tag. Unordered pairs (two_object, color_attr) are written
    once, digits ascending, so two distinct prompts never describe the same scene content."""
    d, colors = range(10), list(PALETTE)
    pairs = list(itertools.combinations(d, 2))
    return {
        "single_object": tuple(_single(a) for a in d),
        "two_object": tuple(_two(a, b) for a, b in pairs),
        "counting": tuple(_counting(a, n) for a in d for n in NUMBERS),
        "colors": tuple(_colors(a, c) for a in d for c in colors),
        "position": tuple(_position(a, r, b) for a, b in itertools.permutations(d, 2) for r in RELATIONS),
        "color_attr": tuple(
            _color_attr(a, ca, b, cb) for a, b in pairs for ca, cb in itertools.permutations(colors, 2)
        ),
    }


def all_metadata() -> list[dict]:
    """Every distinct caption's metadata (1,855 rows), in a fixed order."""
    return [copy.deepcopy(m) for tag in TAGS for m in _metadata_by_tag()[tag]]


def all_prompts() -> list[str]:
    """Every distinct prompt the generator can produce, so text embeddings can be computed once."""
    return [m["prompt"] for m in all_metadata()]


def _check_tags(tags: tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    tags = TAGS if tags is None else tuple(tags)
    bad = [t for t in tags if t not in TAGS]
    if bad or not tags:
        raise UserError(f"nano scenes: unknown tags {bad or '(empty)'}; choose from {', '.join(TAGS)}")
    return tags


def nano_geneval_prompts(n_per_tag: int, seed: int = 0, tags: tuple[str, ...] | None = None) -> list[dict]:
    """The evaluation set: ``n_per_tag`` metadata rows per tag, interleaved tag by tag, deterministic.

    Each tag's captions are shuffled once with ``seed`` and taken in order, cycling when ``n_per_tag`` exceeds
    the tag's caption count (single_object has 10), so every caption is used equally often."""
    if n_per_tag < 1:
        raise UserError(f"nano_geneval_prompts: n_per_tag must be >= 1, got {n_per_tag}")
    rows = []
    by_tag = _metadata_by_tag()
    for t, tag in enumerate(_check_tags(tags)):
        pool = by_tag[tag]
        order = np.random.default_rng([seed, t]).permutation(len(pool))
        rows.append([copy.deepcopy(pool[order[i % len(pool)]]) for i in range(n_per_tag)])
    return [r for group in zip(*rows, strict=True) for r in group]


# --------------------------------------------------------------------------- rendering


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist_5k()


@functools.cache
def split_pool(split: str) -> tuple[np.ndarray, ...]:
    """Per class, the MNIST-5k indices of ``split`` ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise UserError(f"nano scenes: split must be 'train' or 'heldout', got '{split}'")
    labels = _digits()[1]
    tr, ho = split_indices(labels, HELDOUT_PER_CLASS)
    idx = tr if split == "train" else ho
    return tuple(idx[labels[idx] == c] for c in range(10))


def scale_of(image_size: int) -> int:
    """Canvas sizes are multiples of 32, so every length scales by an integer (no rounding choices)."""
    if image_size < BASE_SIZE or image_size % BASE_SIZE:
        raise UserError(
            f"nano scenes: image_size must be a multiple of {BASE_SIZE} (32, 64, ...), got {image_size}"
        )
    return image_size // BASE_SIZE


def render_glyph(digit: np.ndarray, size: int) -> np.ndarray:
    """uint8 (28, 28) MNIST digit -> float32 (h, w) in [0, 1], cropped to its ink, longer side ``size``; the
    faint antialiasing border that rounds to 0 in uint8 is trimmed, so the array is exactly the ink box."""
    ys, xs = np.nonzero(digit)
    crop = digit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32) / 255.0
    h, w = crop.shape
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL's (width, height)
    # PIL's bilinear filter widens its support when downscaling: antialiased.
    out = np.clip(np.asarray(Image.fromarray(crop, mode="F").resize(new, Image.BILINEAR)), 0.0, 1.0)
    ys, xs = np.nonzero(out >= 0.5 / 255.0)
    return out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _separation(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Black pixels between boxes (y0, x0, y1, x1), ends exclusive: the wider of the row and column gaps."""
    gy = max(b[0] - a[2], a[0] - b[2])
    gx = max(b[1] - a[3], a[1] - b[3])
    return max(gy, gx)


def _place(
    shapes: list[tuple[int, int]], cells: list[tuple[int, int]], k: int, rng: np.random.Generator
) -> list[tuple[int, int, int, int]]:
    """Boxes (y0, x0, y1, x1) for glyphs of ``shapes`` in grid ``cells``, jittered inside each cell."""
    cell, gap = BASE_SIZE // 2 * k, GAP * k

    def box(shape: tuple[int, int], rc: tuple[int, int], oy: int, ox: int) -> tuple[int, int, int, int]:
        y0, x0 = rc[0] * cell + oy, rc[1] * cell + ox
        return (y0, x0, y0 + shape[0], x0 + shape[1])

    for _ in range(PLACEMENT_TRIES):
        boxes = [
            box(s, rc, rng.integers(0, cell - s[0] + 1), rng.integers(0, cell - s[1] + 1))
            for s, rc in zip(shapes, cells, strict=True)
        ]
        if all(_separation(a, b) >= gap for a, b in itertools.combinations(boxes, 2)):
            return boxes
    # Centred glyphs are cell - longer side >= 3k apart, which always satisfies the gap.
    return [box(s, rc, (cell - s[0]) // 2, (cell - s[1]) // 2) for s, rc in zip(shapes, cells, strict=True)]


def _objects(meta: dict, rng: np.random.Generator) -> tuple[list[tuple[int, str]], list[tuple[int, int]]]:
    """(digit, colour) per object in include order, and each object's grid cell (row, col)."""
    colors = list(PALETTE)
    objs = [
        (DIGITS.index(req["class"]), req.get("color") or colors[rng.integers(len(colors))])
        for req in meta["include"]
        for _ in range(req["count"])
    ]
    if meta["tag"] == "position":
        # Same row (left/right) or same column (above/below), so the scene shows exactly one relation.
        relation = meta["include"][1]["position"][0]
        line = int(rng.integers(2))
        first = 0 if relation in ("left of", "above") else 1  # the grid index of object A
        a, b = (line, first), (line, 1 - first)
        if relation in ("above", "below"):
            a, b = a[::-1], b[::-1]
        return objs, [b, a]
    order = rng.permutation(4)[: len(objs)]
    return objs, [(int(c) // 2, int(c) % 2) for c in order]


def render_scene(
    meta: dict, pool: tuple[np.ndarray, ...], rng: np.random.Generator, image_size: int = BASE_SIZE
) -> tuple[np.ndarray, list[dict]]:
    """One scene for ``meta``: uint8 (3, S, S) and its objects (see ``SceneSet.objects``)."""
    k = scale_of(image_size)
    digits = _digits()[0]
    objs, cells = _objects(meta, rng)
    sources: list[int] = []
    for d, _ in objs:  # distinct digit images within a scene (counting draws several of one class)
        src = int(pool[d][rng.integers(len(pool[d]))])
        while src in sources:
            src = int(pool[d][rng.integers(len(pool[d]))])
        sources.append(src)
    glyphs = [render_glyph(digits[s], GLYPH_SIZE * k) for s in sources]
    boxes = _place([g.shape for g in glyphs], cells, k, rng)
    canvas = np.zeros((image_size, image_size, 3), np.float32)
    for g, (y0, x0, y1, x1), (_, color) in zip(glyphs, boxes, objs, strict=True):
        canvas[y0:y1, x0:x1] = g[..., None] * np.asarray(PALETTE[color], np.float32)
    image = np.rint(canvas * 255.0).astype(np.uint8).transpose(2, 0, 1)
    return image, [
        {"class": DIGITS[d], "color": c, "box": (int(b[1]), int(b[0]), int(b[3]), int(b[2])), "source": s}
        for (d, c), b, s in zip(objs, boxes, sources, strict=True)
    ]


def make_scenes(
    split: str,
    n: int,
    seed: int,
    image_size: int = BASE_SIZE,
    tags: tuple[str, ...] | list[str] | None = None,
) -> SceneSet:
    """``n`` scenes of ``split``'s digits; scene ``i`` has tag ``tags[i % len(tags)]`` and a caption drawn
    uniformly from that tag's captions. Scene ``i`` depends only on (split, seed, i)."""
    tags = _check_tags(tags)
    pool, by_tag = split_pool(split), _metadata_by_tag()
    split_id = ("train", "heldout").index(split)
    images, metadata, objects = np.zeros((n, 3, image_size, image_size), np.uint8), [], []
    for i in range(n):
        rng = np.random.default_rng([seed, split_id, i])
        captions = by_tag[tags[i % len(tags)]]
        meta = copy.deepcopy(captions[rng.integers(len(captions))])
        images[i], objs = render_scene(meta, pool, rng, image_size)
        metadata.append(meta)
        objects.append(objs)
    return SceneSet(torch.from_numpy(images), [m["prompt"] for m in metadata], metadata, objects)
