"""``nano-mix``: the images of both nano tiers in one set, for stage 1 (tokenizers and representation encoders).

A tokenizer trained on the white MNIST digits alone has never seen a colour, so it cannot serve the text tier's
coloured scenes; one trained on this mix serves both axes. The set is images only (stage 1 reads no
conditions), which is why stage 2 refuses it (``data.check_kind``).

    split     digits (data/nano.py)               scenes (data/nano_scenes.py)
    train     the 4,500 training digits           the first 4,500 of make_scenes("train", ., seed): the
                                                  opening of the nano-scenes stage-2 training set (same seed)
    heldout   the 500 held-out digits             make_scenes("heldout", 500, HELDOUT_SCENE_SEED)

The two tiers alternate (digit 0, scene 0, digit 1, scene 1, ...), so every prefix, e.g. the first
``num_samples`` images an evaluation takes, holds both tiers equally. Scenes use only digits of their own split,
so held-out images share no MNIST digit with the training images. Deterministic: the same (split, seed) gives
the same tensor.
"""

from __future__ import annotations

import torch

from nanogen.data.nano import NanoSplit, load_nano

HELDOUT_SCENE_SEED = 0  # fixed forever, like nano.SPLIT_SEED: changing it changes every held-out nano-mix number
NO_LABEL = -1  # the label slot of a scene (stage 1 reads no labels)


def load_nano_mix(split: str, image_size: int = 32, seed: int = 42) -> NanoSplit:
    """Images (2N, 3, S, S) in [-1, 1], digits and scenes alternating; labels: the digit's class, ``NO_LABEL``
    for scenes. ``seed`` picks the training scenes (``dataset.seed``); held-out scenes always use
    ``HELDOUT_SCENE_SEED``."""
    from nanogen.data.nano_scenes import make_scenes

    digits = load_nano(split, image_size)  # also rejects unknown splits in one line
    n = len(digits)  # same count of each tier: the digits are the scarcer (4,500 / 500)
    scenes = make_scenes(split, n, seed if split == "train" else HELDOUT_SCENE_SEED, image_size=image_size)
    scene_images = scenes.images.float().div(127.5).sub(1)  # uint8 -> [-1, 1], as the digits
    images = torch.stack([digits.images, scene_images], dim=1).flatten(0, 1)  # (2N, 3, S, S), interleaved
    labels = torch.stack([digits.labels, torch.full_like(digits.labels, NO_LABEL)], dim=1).flatten()
    return NanoSplit(images, labels, f"nano-mix-{split}")
