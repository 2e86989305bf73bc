"""GenEval (spec evaluation.md §3.1, §7.4 items 22-23): the official rules on hand-built detections, the
metadata schema, the summary conventions, Mask2Former post-processing on synthetic outputs, tiny random HF
backends saved to a temp folder, and the metric protocol end-to-end with fake backends."""

import json
import math
import string

import numpy as np
import pytest
import torch

from nanogen.errors import UserError
from nanogen.eval.t2i import geneval as G
from nanogen.eval.t2i.geneval import Detection


def det(label="dog", score=1.0, box=(0, 0, 10, 10), color=None, mask=None):
    return Detection(label, score, box, color, mask)


def clause(name="dog", count=1, **extra):
    return {"class": name, "count": count, **extra}


def row(tag, *include, exclude=(), prompt=None):
    out = {"tag": tag, "include": list(include), "exclude": list(exclude)}
    return out if prompt is None else {**out, "prompt": prompt}


# --------------------------------------------------------------------------- constants


def test_class_and_colour_lists_and_hf_label_map():
    assert len(G.COCO_CLASSES) == len(set(G.COCO_CLASSES)) == 80 and len(G.COLORS) == 10
    assert {"tv remote", "computer mouse", "computer keyboard", "hair drier"} <= set(G.COCO_CLASSES)
    assert set(G.HF_LABEL_NAMES.values()) <= set(G.COCO_CLASSES)
    hf = {0: "person", 1: "motorbike", 2: "tvmonitor", 3: "mouse", 4: "remote", 5: "banner", 6: "couch"}
    mapped = ["person", "motorcycle", "tv", "computer mouse", "tv remote", None, "couch"]
    assert G.coco_labels(hf, "x") == mapped
    with pytest.raises(UserError, match="no COCO class"):
        G.coco_labels({0: "LABEL_0", 1: "LABEL_1"}, "some/model")


# --------------------------------------------------------------------------- relative_position


def test_relative_position_every_relation_and_the_dead_zones():
    rp = G.relative_position
    a = (0, 0, 10, 10)
    assert rp(a, (20, 0, 30, 10)) == {"left of"}  # offset (-20, 0) -> revised (-18, 0): dx = -0.9
    assert rp((20, 0, 30, 10), a) == {"right of"}
    assert rp(a, (0, 20, 10, 30)) == {"above"}  # y grows downward
    assert rp((0, 20, 10, 30), a) == {"below"}
    assert rp(a, (20, 20, 30, 30)) == {"left of", "above"}  # revised (-18, -18) / 28.28 = -0.64 each
    # offset (-20, -5): revised (-18, -3) / 20.62 -> dx = -0.87, dy = -0.15: only "left of"
    assert rp(a, (20, 5, 30, 15)) == {"left of"}
    # first dead zone: |offset| 1.9 < 0.1 x (10 + 10) on x, 0 on y: the offset is fully absorbed
    assert rp(a, (1.9, 0, 11.9, 10)) == set()
    # second dead zone: offset (-4, -4) -> revised (-2, -2), over |offset| 5.66 = -0.35 each: above -0.5
    assert rp(a, (4, 4, 14, 14)) == set()
    # the same offset with small boxes (sizes 1): revised (-3.8, -3.8) / 5.66 = -0.67: both relations
    assert rp((0, 0, 1, 1), (4, 4, 5, 5)) == {"left of", "above"}


# --------------------------------------------------------------------------- the rules


def test_each_clause_type():
    ev = G.evaluate_image
    single = row("single_object", clause())
    assert ev({"dog": [det()]}, single) and not ev({"cat": [det("cat")]}, single) and not ev({}, single)
    two = row("two_object", clause(), clause("cat"))
    assert ev({"dog": [det()], "cat": [det("cat")]}, two) and not ev({"dog": [det()]}, two)
    colors = row("colors", clause(color="red"))
    assert ev({"dog": [det(color="red")]}, colors) and not ev({"dog": [det(color="blue")]}, colors)
    attr = row("color_attr", clause(color="red"), clause("cat", color="blue"))
    assert ev({"dog": [det(color="red")], "cat": [det("cat", color="blue")]}, attr)
    assert not ev({"dog": [det(color="red")], "cat": [det("cat", color="red")]}, attr)
    counting = row("counting", clause(count=2), exclude=[clause(count=3)])
    assert ev({"dog": [det(), det()]}, counting)
    assert not ev({"dog": [det()]}, counting) and not ev({"dog": [det()] * 3}, counting)


def test_thresholds_are_strict_and_counting_images_use_0_9_for_every_class():
    ev = G.evaluate_image
    one = row("single_object", clause())
    assert not ev({"dog": [det(score=0.3)]}, one) and ev({"dog": [det(score=0.300001)]}, one)
    counting = row("counting", clause(count=2), exclude=[clause(count=3)])
    assert not ev({"dog": [det(score=0.95), det(score=0.9)]}, counting)  # 0.9 is not above 0.9
    assert ev({"dog": [det(score=0.95), det(score=0.91)]}, counting)
    assert ev({"dog": [det(score=0.95), det(score=0.91), det(score=0.89)]}, counting)  # third: not confident
    # the same two dogs at 0.5 count for a two_object image, not for a counting one
    assert ev({"dog": [det(score=0.5), det(score=0.5)]}, row("two_object", clause(count=2)))
    assert not ev({"dog": [det(score=0.5), det(score=0.5)]}, row("counting", clause(count=2)))
    # on a counting image 0.9 also applies to an excluded class other than the counted one
    other = row("counting", clause(), exclude=[clause("cat")])
    assert ev({"dog": [det()], "cat": [det("cat", 0.85)]}, other)
    assert not ev({"dog": [det()], "cat": [det("cat", 0.95)]}, other)


def test_max_objects_caps_each_class_at_16():
    ev = G.evaluate_image
    dogs = {"dog": [det(score=0.95)] * 20}
    assert ev(dogs, row("counting", clause(count=16)))
    assert not ev(dogs, row("counting", clause(count=17)))
    # an exclude at 17 never fires: only 16 of the 20 dogs are kept
    assert ev(dogs, row("counting", clause(count=16), exclude=[clause(count=17)]))
    assert len(G.confident(dogs, "counting")["dog"]) == G.MAX_OBJECTS == 16


def test_top_count_selection_decides_colour_and_position():
    ev = G.evaluate_image
    red = row("colors", clause(color="red"))
    # detections arrive in any order; the rules look at the most confident one only
    assert not ev({"dog": [det(score=0.5, color="red"), det(score=0.9, color="blue")]}, red)
    assert ev({"dog": [det(score=0.5, color="blue"), det(score=0.9, color="red")]}, red)
    pos = row("position", clause("cat"), clause(position=["left of", 0]))
    left, right = (0, 0, 10, 10), (20, 0, 30, 10)
    # a less confident dog on the wrong side does not matter, nor does a less confident cat
    found = {
        "cat": [det("cat", 0.9, right), det("cat", 0.4, left)],
        "dog": [det("dog", 0.9, left), det("dog", 0.5, right)],
    }
    assert ev(found, pos)
    swapped = {"cat": [det("cat", 0.4, right), det("cat", 0.9, left)], "dog": found["dog"]}
    assert not ev(swapped, pos)


def test_colour_count_rule():
    ev = G.evaluate_image
    two_red = row("colors", clause(count=2, color="red"))
    assert ev({"dog": [det(color="red"), det(color="red")]}, two_red)
    assert not ev({"dog": [det(color="red"), det(color="blue")]}, two_red)
    # a third red dog below the top two does not make up for the blue one
    assert not ev(
        {"dog": [det(score=0.9, color="red"), det(score=0.8, color="blue"), det(score=0.7, color="red")]},
        two_red,
    )


def test_every_relation_through_the_rules():
    ev = G.evaluate_image
    target = (40, 40, 60, 60)
    places = {"left of": (0, 40, 20, 60), "right of": (80, 40, 100, 60), "above": (40, 0, 60, 20)}
    places["below"] = (40, 80, 60, 100)
    for relation in places:
        meta = row("position", clause("cat"), clause(position=[relation, 0]))
        for other, other_box in places.items():
            found = {"cat": [det("cat", box=target)], "dog": [det("dog", box=other_box)]}
            assert ev(found, meta) == (other == relation), (relation, other)
        close = {"cat": [det("cat", box=target)], "dog": [det("dog", box=(41, 41, 61, 61))]}  # dead zone
        assert not ev(close, meta)


def test_every_found_object_relates_to_every_target_object():
    ev = G.evaluate_image
    meta = row("position", clause("cat", 2), clause(position=["left of", 0]))
    dog = det("dog", box=(0, 0, 10, 10))
    assert ev({"cat": [det("cat", box=(20, 0, 30, 10))] * 2, "dog": [dog]}, meta)
    # the dog is left of one cat only
    assert not ev(
        {"cat": [det("cat", box=(20, 0, 30, 10)), det("cat", 0.9, box=(-20, 0, -10, 10))], "dog": [dog]}, meta
    )


def test_a_failed_target_group_fails_the_relation():
    ev, judge = G.evaluate_image, G.judge
    left, right = (0, 0, 10, 10), (20, 0, 30, 10)
    meta = row(
        "position",
        clause("cat", color="red"),
        clause(position=["left of", 0]),
        clause("bird", position=["left of", 1]),
    )
    good = {
        "cat": [det("cat", box=right, color="red")],
        "dog": [det("dog", box=left)],
        "bird": [det("bird", box=(-20, 0, -10, 10))],
    }
    assert ev(good, meta)
    # the cat is the wrong colour: clause 0 fails, so the dog has no target, so the bird has none either
    ok, reason = judge({**good, "cat": [det("cat", box=right, color="blue")]}, meta)
    assert not ok and reason.splitlines() == [
        "expected red cat>=1, found blue",
        "expected dog left of target, target missing",
        "expected bird left of target, target missing",
    ]
    # the dog is on the wrong side: clause 1 fails on its relation and clause 2 on its missing target
    ok, reason = judge({**good, "dog": [det("dog", box=(40, 0, 50, 10))]}, meta)
    assert not ok and reason.splitlines() == [
        "expected dog left of target",
        "expected bird left of target, target missing",
    ]
    assert not ev({k: v for k, v in good.items() if k != "cat"}, meta)  # missing target object


def test_excludes_are_ored_and_independent_of_includes():
    ev, judge = G.evaluate_image, G.judge
    meta = row("counting", clause(), exclude=[clause(count=2), clause("cat")])
    assert ev({"dog": [det()]}, meta)
    assert not ev({"dog": [det()] * 2}, meta) and not ev({"dog": [det()], "cat": [det("cat")]}, meta)
    ok, reason = judge({"cat": [det("cat")]}, meta)  # include and exclude both fail: both reasons
    assert not ok and reason.splitlines() == ["expected dog>=1, found 0", "expected cat<1, found 1"]
    assert judge({"dog": [det()]}, meta) == (True, "")


def test_colours_are_asked_lazily_for_the_chosen_objects_only():
    calls = []

    def colors(name, objs):
        calls.append((name, [o.score for o in objs]))
        return ["red"] * len(objs)

    ev = G.evaluate_image
    dogs = {"dog": [det(score=s) for s in (0.5, 0.9, 0.7, 0.2)], "cat": [det("cat")]}
    assert ev(dogs, row("two_object", clause(), clause("cat")), colors)
    assert calls == []  # no colour clause: nothing classified
    assert ev(dogs, row("colors", clause(count=2, color="red")), colors)
    assert calls == [("dog", [0.9, 0.7])]  # the top two only, most confident first
    assert not ev(dogs, row("colors", clause(count=4, color="red")), colors)
    assert len(calls) == 1  # only three dogs pass 0.3: the count fails before any colour is needed
    # colours a detector already named are used as they are; missing ones without a function are a bug
    assert ev({"dog": [det(color="red")]}, row("colors", clause(color="red")))
    with pytest.raises(ValueError, match="no colour"):
        ev({"dog": [det()]}, row("colors", clause(color="red")))


# --------------------------------------------------------------------------- metadata


def test_parse_metadata_accepts_geneval_rows_and_drops_none_fields():
    raw = {
        "tag": "position", "prompt": "a photo of a dog left of a cat",
        "include": [{"class": "cat", "count": 1, "color": None, "position": None},
                    {"class": "dog", "count": np.int64(1), "color": None, "position": ["left of", 0]}],
        "exclude": None,
    }  # fmt: skip
    meta = G.parse_metadata(raw, "rows.jsonl:3")
    assert meta["include"] == [
        {"class": "cat", "count": 1},
        {"class": "dog", "count": 1, "position": ("left of", 0)},
    ]
    assert meta["exclude"] == [] and meta["prompt"] == raw["prompt"]
    assert G.evaluate_image({"cat": [det("cat", box=(20, 0, 30, 10))], "dog": [det()]}, meta)
    # a vocabulary of None accepts any names (the nano tier's digits and palette)
    G.parse_metadata(row("colors", clause("seven", color="cyan")), "x", classes=None, colors=None)


@pytest.mark.parametrize(
    "meta, fragment",
    [
        ([1, 2], "is an object with tag and include, got list"),
        ({"include": []}, "tag is None; use one of single_object"),
        ({"tag": "color", "include": []}, "tag is 'color'"),
        ({"tag": "colors"}, "include is empty"),
        ({"tag": "colors", "include": {"class": "dog"}}, "include must be a list"),
        ({"tag": "colors", "include": ["dog"]}, "include[0] must be an object"),
        (row("colors", clause(colour="red")), "include[0]: unknown key 'colour'"),
        (row("colors", clause("doggo")), "include[0].class is 'doggo'; use one of the 80"),
        (row("colors", {"count": 1}), "include[0].class is None"),
        (row("counting", clause(count=0)), "include[0].count is 0"),
        (row("counting", clause(count=True)), "include[0].count is True"),
        (row("counting", clause(count="2")), "include[0].count is '2'"),
        (row("colors", clause(color="teal")), "include[0].color is 'teal'; use one of red"),
        (row("colors", clause(color="")), "include[0].color is ''; use one of red"),
        (row("position", clause(position=["left of", 0])), "include[0].position is"),
        (
            row("position", clause(), clause("cat", position=["near", 0])),
            "include[1].position is ['near', 0]",
        ),
        (row("position", clause(), clause("cat", position="left of")), "include[1].position is 'left of'"),
        (
            row("counting", clause(), exclude=[clause(count=2, color="red")]),
            "exclude[0]: unknown key 'color'; this clause takes class and count",
        ),
    ],
)
def test_malformed_metadata_is_one_line_naming_row_and_key(meta, fragment):
    with pytest.raises(UserError) as e:
        G.parse_metadata(meta, "evaluation_metadata.jsonl row 7")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("evaluation_metadata.jsonl row 7") and fragment in msg, msg


# --------------------------------------------------------------------------- summary


def test_summary_task_mean_vs_image_mean_sd15():
    """GenEval's SD-1.5 row: official overall 0.427 (mean of the six tags) vs 0.406 (mean over 553 images)."""
    acc = dict(zip(G.TAGS, (0.97, 0.38, 0.35, 0.76, 0.04, 0.06), strict=True))
    n = dict(zip(G.TAGS, (80, 99, 80, 94, 100, 100), strict=True))
    s = G.summarize_sums({t: (acc[t] * n[t], float(n[t])) for t in reversed(G.TAGS)})
    assert list(s) == [f"geneval/{t}" for t in G.TAGS] + ["geneval/overall", "geneval/per_image"]
    assert s["geneval/overall"] == pytest.approx(2.56 / 6) and round(s["geneval/overall"], 3) == 0.427
    assert s["geneval/per_image"] == pytest.approx(224.66 / 553) and round(s["geneval/per_image"], 3) == 0.406
    assert all(s[f"geneval/{t}"] == pytest.approx(acc[t]) for t in G.TAGS)


def test_summary_from_verdicts_with_correct_prompts():
    meta = [{"tag": "single_object", "prompt": p} for p in "aabb"] + [{"tag": "counting", "prompt": "c"}] * 2
    correct = [False, True, False, False, True, True]
    s = G.summarize(meta, correct)
    assert s["geneval/single_object"] == 0.25 and s["geneval/counting"] == 1.0
    assert s["geneval/overall"] == 0.625 and s["geneval/per_image"] == pytest.approx(3 / 6)
    assert s["geneval/correct_prompts"] == pytest.approx(2 / 3)  # a and c have a correct image, b none
    assert "geneval/correct_prompts" not in G.summarize([{"tag": "colors"}], [True])
    empty = G.summarize_sums({})
    assert math.isnan(empty["geneval/overall"]) and math.isnan(empty["geneval/per_image"])
    lines = [line.split() for line in G.render_table(s).splitlines()]
    assert len(lines) == 5 and lines[2] == ["overall", "0.625"]


# --------------------------------------------------------------------------- Mask2Former post-processing


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_instances_from_synthetic_mask2former_outputs():
    labels = ["person", "motorcycle", None, "tv"]
    logits = torch.tensor(
        [[0, 4, 0, 0, 0],  # query 0: motorcycle
         [3, 0, 0, 2.5, 0],  # query 1: person and, 4th best pair, tv
         [0, 0, 5, 0, 0],  # query 2: a label GenEval does not know
         [0, 0, 0, 0, 6.0]],  # query 3: no object
    )  # fmt: skip
    masks = torch.full((4, 8, 8), -3.0)
    masks[0, 1:3, 2:5] = 2.0
    masks[1, 5:7, 0:2] = 4.0
    masks[2, 0:2, 0:2] = 4.0
    found = G.instances(logits, masks, (8, 8), (16, 16), labels)  # same-size bilinear: the identity
    p = np.exp(logits.double().numpy())
    p /= p.sum(axis=1, keepdims=True)
    assert sorted(found) == ["motorcycle", "person", "tv"]
    (moto,), (person,), (tv,) = found["motorcycle"], found["person"], found["tv"]
    assert moto.score == pytest.approx(p[0, 1] * _sigmoid(2.0), abs=2e-6)
    assert person.score == pytest.approx(p[1, 0] * _sigmoid(4.0), abs=2e-6)
    assert tv.score == pytest.approx(p[1, 3] * _sigmoid(4.0), abs=2e-6) and tv.score > 0.3
    assert moto.score == round(moto.score, 6)
    assert moto.box == (4.0, 2.0, 9.0, 5.0)  # nearest x2 of rows 1-2, columns 2-4; last pixel included
    assert person.box == tv.box == (0.0, 10.0, 3.0, 13.0)
    expected = np.zeros((16, 16), bool)
    expected[2:6, 4:10] = True
    assert moto.mask.dtype == bool and np.array_equal(moto.mask, expected)
    assert moto.color is None
    # the best Q = 4 pairs only: with query 3 gone, query 1's tv pair is the 4th of 3 and drops out
    assert "tv" not in G.instances(logits[:3], masks[:3], (8, 8), (16, 16), labels)
    assert sorted(G.instances(logits, masks, (8, 8), (16, 16), labels, min_score=0.5)) == [
        "motorcycle",
        "person",
    ]
    assert G.instances(logits[3:], masks[3:], (8, 8), (16, 16), labels) == {}


# --------------------------------------------------------------------------- HF backends at tiny random size


@pytest.fixture(scope="module")
def tiny_mask2former(tmp_path_factory):
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    path = tmp_path_factory.mktemp("m2f")
    backbone = SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    id2label = {0: "person", 1: "motorbike", 2: "tvmonitor", 3: "banner"}
    cfg = Mask2FormerConfig(
        backbone_config=backbone, hidden_dim=32, feature_size=32, mask_feature_size=32, encoder_layers=1,
        decoder_layers=2, num_queries=6, encoder_feedforward_dim=32, dim_feedforward=32,
        num_attention_heads=2, num_labels=4, id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )  # fmt: skip
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        model.class_predictor.bias[1] = 8.0  # every query says motorbike: detections to look at
    model.save_pretrained(path)
    Mask2FormerImageProcessor().save_pretrained(path)
    return path


def test_mask2former_detector_tiny_random(tiny_mask2former, monkeypatch):
    seen = []
    real = G.instances
    monkeypatch.setattr(G, "instances", lambda *a: seen.append(a[2:4]) or real(*a))
    detector = G.Mask2FormerDetector(str(tiny_mask2former), resize=(64, 96), min_score=0.0)
    assert detector.labels == ["person", "motorcycle", "tv", None]
    images = torch.randint(
        0, 256, (2, 3, 40, 60), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    found = detector(images)
    # shortest edge 40 -> 64, longest 60 -> 96, both multiples of 32: no padding; masks back at 40 x 60
    assert seen == [((64, 96), (40, 60))] * 2
    assert len(found) == 2 and set(found[0]) == {"motorcycle"}
    for dets in found:
        for d in dets["motorcycle"]:
            assert d.mask.shape == (40, 60) and d.box == G.mask_box(d.mask) and 0 <= d.score <= 1
        scores = [d.score for d in dets["motorcycle"]]
        assert scores == sorted(scores, reverse=True)


def test_missing_or_wrong_models_are_one_line_errors(tmp_path):
    for make, option in (
        (G.Mask2FormerDetector, "pass detector="),
        (G.ClipColorClassifier, "pass color_classifier="),
    ):
        with pytest.raises(UserError) as e:
            make(str(tmp_path / "nowhere"))
        msg = str(e.value)
        assert "\n" not in msg and "nanogen prepare --models" in msg and option in msg, msg


def test_object_crop_is_the_mask_on_grey_cut_to_the_box():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    mask = np.zeros((9, 12), bool)
    mask[2:7, 3:10] = rng.random((5, 7)) > 0.3
    mask[2, 3] = mask[6, 9] = True
    box = G.mask_box(mask)
    assert box == (3.0, 2.0, 9.0, 6.0)
    crop = np.asarray(G.object_crop(image, det(box=box, mask=mask)))
    # PIL's crop ends are exclusive: the box's last row and column (inclusive in the box) are left out
    expected = np.where(mask[..., None], image, np.uint8(153))[2:6, 3:9]
    assert crop.shape == (4, 6, 3) and np.array_equal(crop, expected)
    assert np.array_equal(np.asarray(G.object_crop(image, det(box=box))), image[2:6, 3:9])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + "-":  # one token per character: no merges needed
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=CLIPTokenizer(vocab=vocab, merges=[])).save_pretrained(
        path
    )
    return path


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_clip_colour_classifier_tiny_random(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    clf = G.ClipColorClassifier(str(tiny_clip))
    model, proc = (
        CLIPModel.from_pretrained(tiny_clip).eval(),
        CLIPProcessor.from_pretrained(tiny_clip, backend="pil"),
    )
    with torch.no_grad():
        # text side, one template at a time (no padding): normalised, averaged, normalised again
        columns = []
        for c in G.COLORS:
            texts = [
                f"a photo of a {c} fire hydrant",
                f"a photo of a {c}-colored fire hydrant",
                f"a photo of a {c} object",
            ]
            emb = torch.cat(
                [model.get_text_features(**proc(text=[t], return_tensors="pt")).pooler_output for t in texts]
            )
            columns.append(_unit(_unit(emb).mean(dim=0)))
        weights = clf.text_weights("fire hydrant")
        assert weights.shape == (8, 10) and torch.allclose(weights, torch.stack(columns, dim=1), atol=1e-5)
        assert clf.text_weights("fire hydrant") is weights  # built once per class
        # image side: crops built here with numpy, classified by argmax
        rng = np.random.default_rng(1)
        image = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
        objs = []
        for y0, x0 in ((0, 0), (10, 6), (4, 12)):
            mask = np.zeros((24, 20), bool)
            mask[y0 : y0 + 9, x0 : x0 + 7] = rng.random((9, 7)) > 0.2
            objs.append(det("fire hydrant", box=G.mask_box(mask), mask=mask))
        crops = []
        for o in objs:
            x0, y0, x1, y1 = (int(v) for v in o.box)
            crops.append(np.where(o.mask[..., None], image, np.uint8(153))[y0:y1, x0:x1])
        pixels = proc(images=crops, return_tensors="pt")["pixel_values"]
        feats = _unit(model.get_image_features(pixel_values=pixels).pooler_output)
        expected = [G.COLORS[i] for i in (feats @ torch.stack(columns, dim=1)).argmax(dim=1).tolist()]
    assert clf(image, "fire hydrant", objs) == expected


# --------------------------------------------------------------------------- the metric protocol


class FakeDetector:
    """Image i (its pixel [0, 0, 0]) -> a fixed table of detections."""

    def __init__(self, table):
        self.table = table

    def __call__(self, images):
        return [self.table[int(img[0, 0, 0])] for img in images]


class FakeColors:
    def __init__(self):
        self.calls = []

    def __call__(self, image, class_name, objects):
        self.calls.append((int(image[0, 0, 0]), class_name, len(objects)))
        return ["red"] * len(objects)


def _scenes():
    """(detections, metadata, expected verdict) per image."""
    left, right = (0, 0, 10, 10), (20, 0, 30, 10)
    pos = row("position", clause("cat"), clause(position=["left of", 0]))
    counting = row("counting", clause(count=3), exclude=[clause(count=4)])
    return [
        ({"dog": [det()]}, row("single_object", clause()), True),
        ({"cat": [det("cat")]}, row("single_object", clause()), False),
        ({"dog": [det()] * 3}, counting, True),
        ({"dog": [det()] * 4}, counting, False),
        ({"dog": [det(score=0.9), det(score=0.5)]}, row("colors", clause(color="red")), True),
        ({"cat": [det("cat", box=right)], "dog": [det(box=left)]}, pos, True),
        ({"cat": [det("cat", box=left)], "dog": [det(box=right)]}, pos, False),
        (
            {"dog": [det()], "cat": [det("cat")]},
            row("color_attr", clause(color="red"), clause("cat", color="red")),
            True,
        ),
        ({"dog": [det()]}, row("two_object", clause(), clause("cat")), False),
    ]


def test_metric_end_to_end_with_fake_backends_and_two_ranks():
    scenes = _scenes()
    colors = FakeColors()
    metric = G.GenEvalMetric("cpu", detector=FakeDetector([s[0] for s in scenes]), color_classifier=colors)
    assert metric.name == "geneval" and metric.keys == G.TAGS
    images = torch.zeros(len(scenes), 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(scenes), dtype=torch.uint8)
    meta = [s[1] for s in scenes]
    prompts = [f"prompt {i}" for i in range(len(scenes))]
    out = metric.score(images, prompts, meta)
    assert out == [{m["tag"]: float(s[2])} for m, s in zip(meta, scenes, strict=True)]
    # colour asked for the colour images only, for the top-1 object of each clause
    assert colors.calls == [(4, "dog", 1), (7, "dog", 1), (7, "cat", 1)]

    def sums_of(contribs):  # what the caller accumulates per key: (sum of values, count)
        acc = {k: [0.0, 0.0] for k in metric.keys}
        for c in contribs:
            for k, v in c.items():
                acc[k][0] += v
                acc[k][1] += 1
        return acc

    one = sums_of(out)
    ranks = [sums_of(metric.score(images[r::2], prompts[r::2], meta[r::2])) for r in range(2)]
    added = {k: (ranks[0][k][0] + ranks[1][k][0], ranks[0][k][1] + ranks[1][k][1]) for k in metric.keys}
    assert added == {k: tuple(v) for k, v in one.items()}
    summary = metric.summarize(added)
    assert summary == G.summarize(meta, [s[2] for s in scenes])
    assert summary["geneval/counting"] == 0.5 and summary["geneval/overall"] == pytest.approx(
        (0.5 + 0 + 0.5 + 1 + 0.5 + 1) / 6
    )
    assert summary["geneval/per_image"] == pytest.approx(5 / 9)


def test_metric_rejects_bad_batches_in_one_line():
    metric = G.GenEvalMetric("cpu", detector=FakeDetector([{}]), color_classifier=FakeColors())
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    bad = row("colors", clause(color="teal"))
    with pytest.raises(
        UserError, match=r"^GenEval metadata of prompt 'a teal dog': include\[0\]\.color is 'teal'"
    ):
        metric.score(images, ["a teal dog"], [bad])
    with pytest.raises(UserError, match="1 images, 2 prompts and 1 metadata rows"):
        metric.score(images, ["a", "b"], [bad])
    with pytest.raises(UserError, match="must be uint8"):
        metric.score(images.float(), ["a"], [bad])


def test_nano_geneval_metric_shares_the_protocol_and_the_summary(monkeypatch):
    from nanogen.eval import nano_geneval as ng

    loaded = []
    monkeypatch.setattr(ng, "load_digit_classifier", lambda device: loaded.append(device))
    monkeypatch.setattr(
        ng, "score_images", lambda images, meta, device: [i % 2 == 0 for i in range(len(meta))]
    )
    metric = ng.NanoGenEvalMetric("cpu")
    assert loaded == ["cpu"] and metric.keys == G.TAGS and metric.name == "nano_geneval"
    meta = [{"tag": "colors"}, {"tag": "colors"}, {"tag": "position"}]
    out = metric.score(torch.zeros(3, 3, 32, 32, dtype=torch.uint8), ["p"] * 3, meta)
    assert out == [{"colors": 1.0}, {"colors": 0.0}, {"position": 1.0}]
    s = metric.summarize({"colors": (1.0, 2.0), "position": (1.0, 1.0)})
    assert s == ng.summarize(meta, [True, False, True]) == {
        "nano_geneval/colors": 0.5, "nano_geneval/position": 1.0, "nano_geneval/overall": 0.75,
        "nano_geneval/per_image": pytest.approx(2 / 3),
    }  # fmt: skip


def test_metadata_looked_up_by_prompt_when_rows_carry_only_text(tmp_path):
    """The reference's prompt sets (Arrow, column text) carry no GenEval metadata: it is looked up by prompt."""
    meta = row("single_object", clause())
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text(json.dumps({**meta, "prompt": "a photo of a dog"}) + "\n")
    metric = G.GenEvalMetric("cpu", detector=FakeDetector([{}, {}]), color_classifier=FakeColors(), metadata=str(path))
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    assert metric.score(images[:1], ["a photo of a dog"], [{}]) == [{"single_object": 0.0}]  # no detections
    with pytest.raises(UserError, match="has no GenEval metadata.*options.geneval.metadata"):
        metric.score(images[:1], ["a photo of a cat"], [{}])
    with pytest.raises(UserError, match="not found"):
        G.GenEvalMetric("cpu", detector=FakeDetector([]), color_classifier=FakeColors(), metadata=str(tmp_path / "x"))
