"""The nano text-to-image tier: digit scenes with GenEval captions (data/nano_scenes.py) and their exact
scorer (eval/nano_geneval.py). Layout, colours and geometry are checked from the pixels; the rules on
hand-built detections and hand-edited scenes; the whole scorer on real held-out scenes and on wrongly
captioned ones."""

import itertools
import re

import numpy as np
import pytest
import torch

from nanogen.data import nano_scenes as ns
from nanogen.data.nano import load_mnist_5k, split_indices
from nanogen.errors import UserError
from nanogen.eval import nano_geneval as ng
from nanogen.eval.nano_geneval import Detection


@pytest.fixture(scope="module", autouse=True)
def _session_cache(tmp_path_factory):
    """Module fixtures run before conftest's per-test cache fixture: point them at the same session folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOGEN_CACHE", str(tmp_path_factory.getbasetemp() / "nanogen-cache"))
        yield


@pytest.fixture(scope="module")
def classifier():
    """Trained once per test session (per xdist worker), then read from the cache."""
    return ng.load_digit_classifier("cpu")


@pytest.fixture(scope="module")
def heldout():
    return ns.make_scenes("heldout", 300, seed=0)


@pytest.fixture(scope="module")
def heldout_correct(heldout, classifier):
    return ng.score_images(heldout.images, heldout.metadata)


# --------------------------------------------------------------------------- scenes


def test_scenes_are_deterministic_prefix_stable_and_seeded():
    a, b = ns.make_scenes("train", 12, seed=3), ns.make_scenes("train", 12, seed=3)
    assert torch.equal(a.images, b.images) and a.metadata == b.metadata and a.objects == b.objects
    head = ns.make_scenes("train", 5, seed=3)
    assert torch.equal(head.images, a.images[:5]) and head.prompts == a.prompts[:5]
    assert not torch.equal(ns.make_scenes("train", 12, seed=4).images, a.images)
    assert a.images.shape == (12, 3, 32, 32) and a.images.dtype == torch.uint8
    assert [m["tag"] for m in a.metadata] == list(ns.TAGS) * 2


def test_splits_use_only_their_own_digits_of_the_captioned_classes():
    _, labels = load_mnist_5k()
    train, held = split_indices(labels, 50)
    for split, allowed in (("train", set(train)), ("heldout", set(held))):
        s = ns.make_scenes(split, 60, seed=1)
        for meta, objs in zip(s.metadata, s.objects, strict=True):
            src = [o["source"] for o in objs]
            assert set(src) <= allowed and len(set(src)) == len(src)
            want = [r["class"] for r in meta["include"] for _ in range(r["count"])]
            assert [ns.DIGITS[labels[i]] for i in src] == [o["class"] for o in objs] == want


def _expected_prompt(meta: dict) -> str:
    """The GenEval templates, written out again from the metadata alone."""
    art = lambda w: ("an " if w in ("eight",) else "a ") + w  # no palette colour starts with a vowel
    inc = meta["include"]
    if meta["tag"] == "single_object":
        return f"a photo of {art(inc[0]['class'])}"
    if meta["tag"] == "two_object":
        return f"a photo of {art(inc[0]['class'])} and {art(inc[1]['class'])}"
    if meta["tag"] == "counting":
        n = inc[0]["count"]
        assert meta["exclude"] == [{"class": inc[0]["class"], "count": n + 1}]
        word = {2: "two", 3: "three", 4: "four"}[n]
        plural = inc[0]["class"] + ("es" if inc[0]["class"] == "six" else "s")
        return f"a photo of {word} {plural}"
    if meta["tag"] == "colors":
        return f"a photo of {art(inc[0]['color'])} {inc[0]['class']}"
    if meta["tag"] == "position":
        rel, target = inc[1]["position"]
        assert target == 0 and "position" not in inc[0]
        return f"a photo of {art(inc[1]['class'])} {rel} {art(inc[0]['class'])}"
    return f"a photo of {art(inc[0]['color'])} {inc[0]['class']} and {art(inc[1]['color'])} {inc[1]['class']}"


def test_prompts_match_metadata_and_enumeration_is_complete():
    meta = ns.all_metadata()
    prompts = ns.all_prompts()
    # 10 + C(10,2) + 10*3 + 10*6 + 10*9*4 + C(10,2)*6*5
    assert len(prompts) == len(set(prompts)) == 10 + 45 + 30 + 60 + 360 + 1350
    for m in meta:
        assert m["prompt"] == _expected_prompt(m)
        colors = [r["color"] for r in m["include"] if "color" in r]
        assert set(colors) <= set(ns.PALETTE) and len(set(colors)) == len(colors)
    assert "a photo of three fives" in prompts and "a photo of two sixes" in prompts
    assert "a photo of a red seven" in prompts and "a photo of a three left of a seven" in prompts
    s = ns.make_scenes("train", 30, seed=2)
    assert all(p == m["prompt"] and p in set(prompts) for p, m in zip(s.prompts, s.metadata, strict=True))


def test_evaluation_prompts_are_balanced_and_deterministic():
    rows = ns.nano_geneval_prompts(25, seed=7)
    assert rows == ns.nano_geneval_prompts(25, seed=7) != ns.nano_geneval_prompts(25, seed=8)
    assert [r["tag"] for r in rows] == list(ns.TAGS) * 25
    single = [r["prompt"] for r in rows if r["tag"] == "single_object"]
    assert sorted(np.unique(single, return_counts=True)[1]) == [2] * 5 + [3] * 5  # 25 over 10 captions
    position = [r["prompt"] for r in rows if r["tag"] == "position"]
    assert len(set(position)) == 25


def _cell_boxes(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Per 16x16 cell holding ink: the (x0, y0, x1, y1) box of its nonzero pixels, found from the pixels."""
    ink = image.max(axis=0) > 0
    out = []
    for r, c in itertools.product(range(2), range(2)):
        ys, xs = np.nonzero(ink[16 * r : 16 * r + 16, 16 * c : 16 * c + 16])
        if len(ys):
            out.append((16 * c + xs.min(), 16 * r + ys.min(), 16 * c + xs.max() + 1, 16 * r + ys.max() + 1))
    return out


def test_layout_boxes_colours_and_relations_from_the_pixels():
    s = ns.make_scenes("train", 120, seed=5)
    for img, meta, objs in zip(s.images.numpy(), s.metadata, s.objects, strict=True):
        boxes = [o["box"] for o in objs]
        assert sorted(_cell_boxes(img)) == sorted(boxes)  # one digit per cell, its box exactly its ink
        for a, b in itertools.combinations(boxes, 2):  # >= 3 px of black between any two digits
            assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= 3
        outside = np.ones((32, 32), bool)
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            outside[y0:y1, x0:x1] = False
            assert max(x1 - x0, y1 - y0) == ns.GLYPH_SIZE == 13
            px = img[:, y0:y1, x0:x1].reshape(3, -1)
            px = px[:, px.max(axis=0) > 0]
            rgb = np.array(ns.PALETTE[o["color"]])
            assert (px[rgb == 0] == 0).all() and (px[rgb == 1] == px.max(axis=0)).all()  # intensity x colour
        assert (img[:, outside] == 0).all()
        per_object = [r for r in meta["include"] for _ in range(r["count"])]
        for r, o in zip(per_object, objs, strict=True):
            assert r.get("color", o["color"]) == o["color"]
        if meta["tag"] == "position":
            (bx0, by0, bx1, by1), (ax0, ay0, ax1, ay1) = boxes
            rel = meta["include"][1]["position"][0]
            horizontal = {"left of": ax1 <= 16 <= bx0, "right of": bx1 <= 16 <= ax0}
            vertical = {"above": ay1 <= 16 <= by0, "below": by1 <= 16 <= ay0}
            assert {**horizontal, **vertical}[rel]
            same_line = (ay0 < 16) == (by0 < 16) if rel in horizontal else (ax0 < 16) == (bx0 < 16)
            assert same_line


def test_colours_and_tags_are_spread():
    s = ns.make_scenes("train", 240, seed=6)
    free = [
        o["color"]
        for m, objs in zip(s.metadata, s.objects, strict=True)
        if m["tag"] in ("single_object", "counting")
        for o in objs
    ]
    assert set(free) == set(ns.PALETTE)  # colour is not tied to the category


def test_bad_inputs_raise_one_line_user_errors():
    for call in (
        lambda: ns.make_scenes("val", 2, 0),
        lambda: ns.make_scenes("train", 2, 0, image_size=48),
        lambda: ns.make_scenes("train", 2, 0, tags=["counting", "shapes"]),
        lambda: ns.nano_geneval_prompts(0),
        lambda: ng.score_images(np.zeros((2, 3, 32, 32), np.uint8), [{"tag": "colors"}]),
    ):
        with pytest.raises(UserError) as e:
            call()
        assert "\n" not in str(e.value)


def test_scenes_scale_to_64():
    s = ns.make_scenes("heldout", 6, seed=0, image_size=64)
    assert s.images.shape == (6, 3, 64, 64)
    for objs in s.objects:
        for a, b in itertools.combinations([o["box"] for o in objs], 2):
            assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= 6
        assert all(max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) == 26 for o in objs)


# --------------------------------------------------------------------------- GenEval's rules


def test_relative_position_hand_computed():
    rp = ng.relative_position
    a = (0, 0, 10, 10)
    assert rp(a, (20, 0, 30, 10)) == {"left of"}  # offset (-20, 0) -> revised (-18, 0), dx = -0.9
    assert rp((20, 0, 30, 10), a) == {"right of"}
    assert rp(a, (0, 20, 10, 30)) == {"above"}  # y grows downward
    assert rp((0, 20, 10, 30), a) == {"below"}
    assert rp(a, (20, 20, 30, 30)) == {"left of", "above"}  # revised (-18, -18) / 28.28 = -0.64 each
    assert rp(a, (1, 1, 11, 11)) == set()  # |offset| 1 < 0.1 * (10 + 10) on both axes: no relation
    # offset (-15, -3): revised (-13, -1), norm 15.30 -> dx = -0.85, dy = -0.07
    assert rp(a, (15, 3, 25, 13)) == {"left of"}
    # offset (-6, -6), sizes 10 and 2: revised (-4.8, -4.8) / 8.49 = -0.566 each
    assert rp(a, (10, 10, 12, 12)) == {"left of", "above"}
    # offset (-6, -6) with sizes 10 and 20: revised (-3, -3) / 8.49 = -0.35: below 0.5, no relation
    assert rp(a, (1, 1, 21, 21)) == set()


def _det(label, conf=1.0, box=(0, 0, 10, 10), color="red"):
    return Detection(label, conf, box, color)


def test_rules_on_hand_built_detections():
    ev = ng.evaluate
    one = {"tag": "single_object", "include": [{"class": "seven", "count": 1}]}
    assert ev({"seven": [_det("seven", 0.31)]}, one) and not ev({"seven": [_det("seven", 0.3)]}, one)
    assert not ev({"one": [_det("one")]}, one)
    count = {
        "tag": "counting",
        "include": [{"class": "five", "count": 2}],
        "exclude": [{"class": "five", "count": 3}],
    }
    fives = lambda *cs: {"five": [_det("five", c) for c in cs]}
    assert ev(fives(0.95, 0.99), count)
    assert not ev(fives(0.95, 0.85), count)  # the counting threshold is 0.9
    assert ev(fives(0.95, 0.99, 0.85), count)  # the third one is not confident enough to count
    assert not ev(fives(0.95, 0.99, 0.91), count)  # exclude: three fives
    # GenEval caps each class at 16 detections, so "at least 17" can never hold.
    many = {"tag": "counting", "include": [{"class": "five", "count": 16}]}
    assert ev(fives(*[0.95] * 20), many)
    assert not ev(fives(*[0.95] * 20), {**many, "include": [{"class": "five", "count": 17}]})
    # Colour is checked on the top-`count` detections only.
    red = {"tag": "colors", "include": [{"class": "seven", "count": 1, "color": "red"}]}
    assert not ev({"seven": [_det("seven", 0.5, color="red"), _det("seven", 0.9, color="blue")]}, red)
    assert ev({"seven": [_det("seven", 0.9, color="red"), _det("seven", 0.5, color="blue")]}, red)
    # Position against every object of the target group; a failed target group fails the relation.
    pos = {
        "tag": "position",
        "include": [
            {"class": "seven", "count": 1},
            {"class": "three", "count": 1, "position": ["left of", 0]},
        ],
    }
    left, right = (0, 0, 10, 10), (20, 0, 30, 10)
    assert ev({"seven": [_det("seven", box=right)], "three": [_det("three", box=left)]}, pos)
    assert not ev({"seven": [_det("seven", box=left)], "three": [_det("three", box=right)]}, pos)
    assert not ev({"three": [_det("three", box=left)]}, pos)
    two_targets = {
        "tag": "position",
        "include": [
            {"class": "seven", "count": 2},
            {"class": "three", "count": 1, "position": ["left of", 0]},
        ],
    }
    sevens = [_det("seven", box=right), _det("seven", 0.9, box=(-20, 0, -10, 10))]
    assert not ev({"seven": sevens, "three": [_det("three", box=left)]}, two_targets)
    assert ev({"seven": sevens[:1] * 2, "three": [_det("three", box=left)]}, two_targets)


def test_summary_is_the_mean_of_tag_means_and_per_image_the_mean_of_images():
    meta = [{"tag": "single_object"}] * 4 + [{"tag": "counting"}] * 2
    correct = [True, True, True, False, False, True]
    s = ng.summarize(meta, correct)
    assert s["nano_geneval/single_object"] == 0.75 and s["nano_geneval/counting"] == 0.5
    assert s["nano_geneval/overall"] == 0.625 and s["nano_geneval/per_image"] == pytest.approx(4 / 6)
    table = ng.render_table(s)
    assert re.search(r"^overall\s+0\.625$", table, re.M) and len(table.splitlines()) == 4


def test_colour_rule_is_exact_for_rendered_digits():
    rng = np.random.default_rng(0)
    for name, rgb in ns.PALETTE.items():
        intensity = rng.uniform(0.3, 1.0, 40)
        pixels = np.rint(np.outer(rgb, intensity) * 255) / 255
        assert ng.nearest_color(pixels, pixels.max(axis=0)) == name
    # A dim, slightly off red is still red: brightness is divided out.
    assert ng.nearest_color(np.array([[0.4], [0.1], [0.05]]), np.array([0.4])) == "red"


def test_components_join_broken_strokes_keep_neighbours_apart_and_drop_specks():
    img = np.zeros((3, 32, 32), np.float32)
    img[0, 2:12, 2:5] = img[0, 2:12, 6:9] = 1.0  # one red object with a 1 px break
    img[2, 2:12, 12:16] = 0.8  # a blue one 3 px to its right
    img[1, 20:22, 20:22] = 1.0  # a 4-pixel speck (< MIN_AREA)
    found = ng.components(img)
    assert [(box, color) for box, _, color in found] == [((2, 2, 9, 12), "red"), ((12, 2, 16, 12), "blue")]
    assert all(crop.shape == (16, 16) and crop.max() == 1.0 for _, crop, _ in found)


# --------------------------------------------------------------------------- classifier and the full scorer


def test_classifier_is_accurate_cached_and_reloads_identically(classifier):
    model, accuracy = classifier
    print(f"digit CNN held-out accuracy: {accuracy:.4f}")
    assert accuracy >= 0.98
    path = ng.classifier_path()
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    assert ng.load_digit_classifier("cpu")[0] is model  # loaded once per process
    again, acc2 = ng._load_or_train(path, "cpu")  # and from the file
    assert acc2 == accuracy
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )
    # The stored accuracy is what the weights give on the 500 held-out digits.
    digits, labels = load_mnist_5k()
    held = np.concatenate(ns.split_pool("heldout"))
    pred = ng._predict(again, ng._heldout_crops(digits[held]), "cpu").argmax(dim=1).numpy()
    assert (pred == labels[held]).mean() == accuracy


def test_real_heldout_scenes_score_high(heldout, heldout_correct):
    s = ng.summarize(heldout.metadata, heldout_correct)
    print("\n" + ng.render_table(s))
    assert s["nano_geneval/overall"] >= 0.95
    assert all(s[f"nano_geneval/{t}"] >= 0.85 for t in ns.TAGS)  # no category is broken


def test_float_images_score_like_their_uint8(heldout, heldout_correct):
    x = heldout.images[:36].float() / 127.5 - 1
    assert ng.score_images(x, heldout.metadata[:36]) == heldout_correct[:36]


def test_black_images_have_no_detections(classifier):
    black = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert ng.detect(black, classifier[0], "cpu") == [{}, {}]
    one = {"tag": "single_object", "include": [{"class": "one", "count": 1}]}
    assert ng.score_images(black, [one, one]) == [False, False]


def _wrong_captions(metadata: list[dict], seed: int) -> list[dict]:
    """Each scene paired with a different prompt of the same tag, drawn from the tag's other scenes."""
    rng = np.random.default_rng(seed)
    out = []
    for m in metadata:
        others = [o for o in metadata if o["tag"] == m["tag"] and o["prompt"] != m["prompt"]]
        out.append(others[rng.integers(len(others))])
    return out


def test_wrong_captions_score_low(heldout, heldout_correct, classifier):
    wrong = _wrong_captions(heldout.metadata, seed=0)
    s = ng.summarize(wrong, ng.score_images(heldout.images, wrong))
    print("\n" + ng.render_table(s))
    assert s["nano_geneval/overall"] <= 0.10


def _first_correct(heldout, correct, tag, pred=lambda m: True):
    return next(
        i
        for i, (m, c) in enumerate(zip(heldout.metadata, correct, strict=True))
        if c and m["tag"] == tag and pred(m)
    )


def _erase(img, box):
    x0, y0, x1, y1 = box
    img[:, y0:y1, x0:x1] = 0


def test_each_rule_flips_on_an_edited_scene(heldout, heldout_correct, classifier):
    model, _ = classifier
    score = lambda img, meta: ng.evaluate(ng.detect(img[None], model, "cpu")[0], meta)
    imgs = heldout.images.numpy()
    cases = []
    # A missing object (two_object): erase the second digit.
    i = _first_correct(heldout, heldout_correct, "two_object")
    img = imgs[i].copy()
    _erase(img, heldout.objects[i][1]["box"])
    cases.append((i, img))
    # A wrong colour (colors): rotate the channels, which moves every palette colour but white to another.
    i = _first_correct(heldout, heldout_correct, "colors", lambda m: m["include"][0]["color"] != "white")
    cases.append((i, np.roll(imgs[i], 1, axis=0)))
    # A swapped position: exchange the two digits' cells.
    i = _first_correct(heldout, heldout_correct, "position")
    img, (b, a) = imgs[i].copy(), heldout.objects[i]
    cells = [(o["box"][1] // 16 * 16, o["box"][0] // 16 * 16) for o in (a, b)]
    (ya, xa), (yb, xb) = cells
    img[:, ya : ya + 16, xa : xa + 16], img[:, yb : yb + 16, xb : xb + 16] = (
        imgs[i][:, yb : yb + 16, xb : xb + 16],
        imgs[i][:, ya : ya + 16, xa : xa + 16],
    )
    cases.append((i, img))
    # One extra object (counting, N < 4): copy a digit into an empty cell.
    i = _first_correct(heldout, heldout_correct, "counting", lambda m: m["include"][0]["count"] < 4)
    img = imgs[i].copy()
    used = {(o["box"][1] // 16, o["box"][0] // 16) for o in heldout.objects[i]}
    r, c = next(rc for rc in itertools.product(range(2), range(2)) if rc not in used)
    r0, c0 = next(iter(used))
    img[:, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16] = img[
        :, 16 * r0 : 16 * r0 + 16, 16 * c0 : 16 * c0 + 16
    ]
    cases.append((i, img))
    for i, edited in cases:
        assert score(imgs[i], heldout.metadata[i]) and not score(edited, heldout.metadata[i]), i
