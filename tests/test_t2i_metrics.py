"""DPG-Bench, VQAScore and CLIPScore (spec evaluation.md §7.4 items 24-26): scoring rules on hand-made answers and
logits, the metric protocol over simulated ranks, and the HF backends end to end on tiny random models built
offline in tmp_path (hand-written tokenizer vocabularies)."""

from __future__ import annotations

import csv
import json
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from nanogen.data.prompts import load_prompts
from nanogen.errors import UserError
from nanogen.eval.t2i import clipscore, dpg, vqascore
from nanogen.eval.t2i.clipscore import CLIPCosine, CLIPScoreMetric, Convention, per_image, reduce_mean
from nanogen.eval.t2i.dpg import DPGMetric, Question, adjusted_scores, is_yes, read_dpg_csv, tile_boxes
from nanogen.eval.t2i.vqascore import (
    HFVQAScorer,
    VQAScoreMetric,
    answer_score,
    answer_token_ids,
    vqa_question,
)

CPU = torch.device("cpu")
HEADER = ["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
          "tuple", "question_natural_language"]
# item_a: a DAG (2 <- 1, 4 <- 1,3); item_b: an L2 name equal to its L1 name ("global")
ROWS = [
    ["item_a", "a red cat on a mat", "", "1", "0", "entity", "whole", "entity - whole (cat)", "is there a cat?"],
    ["item_a", "a red cat on a mat", "", "2", "1", "attribute", "color", "attribute - color (cat, red)", "is the cat red?"],
    ["item_a", "a red cat on a mat", "", "3", "0", "entity", "whole", "entity - whole (mat)", "is there a mat?"],
    ["item_a", "a red cat on a mat", "", "4", "1,3", "relation", "spatial", "relation - spatial (cat, mat, on)",
     "is the cat on the mat?"],
    ["item_b", "a photo of a dog", "", "1", "0", "entity", "whole", "entity - whole (dog)", "is there a dog?"],
    ["item_b", "a photo of a dog", "", "2", "0", "global", "", "global (photo)", "is this a photo?"],
    ["item_b", "a photo of a dog", "", "3", "1", "other", "count", "other - count (dog, ==1)", "is there one dog?"],
]


def write_csv(path: Path, rows=ROWS) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def accumulate(metric, contributions) -> dict[str, tuple[float, float]]:
    """What the caller does per rank: (sum, count) per key in float64."""
    sums = {k: [0.0, 0.0] for k in metric.keys}
    for c in contributions:
        for k, v in c.items():
            sums[k][0] += float(v)
            sums[k][1] += 1.0
    return {k: (s, n) for k, (s, n) in sums.items()}


def two_ranks_equal_one(metric, imgs, prompts, meta):
    one = metric.summarize(accumulate(metric, metric.score(imgs, prompts, meta)))
    a, b = (accumulate(metric, metric.score(imgs[s], prompts[s], meta[s])) for s in (slice(0, 2), slice(2, None)))
    two = metric.summarize({k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in metric.keys})
    assert two.keys() == one.keys()
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-12, abs=1e-12), k
    return one


class FakeVQA:
    """Answers from a table question -> answer (default 'no'); records what it was asked."""

    def __init__(self, answers: dict[str, str] | None = None):
        self.answers, self.calls = answers or {}, []

    def __call__(self, image, questions):
        self.calls.append((image, list(questions)))
        return [self.answers.get(q, "no") for q in questions]


def dpg_metric(monkeypatch, vqa, **options) -> DPGMetric:
    monkeypatch.setattr(dpg, "make_vqa", lambda backend, model, device: vqa)
    return DPGMetric(CPU, **options)


def one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


# --------------------------------------------------------------------------- DPG-Bench (item 24)


def test_dpg_csv_parsing_and_first_row_quirk(tmp_path):
    path = write_csv(tmp_path / "dpg_bench.csv")
    items = read_dpg_csv(path)
    assert [(p, it.item_id, len(it.questions), it.skipped) for p, it in items] == [
        ("a red cat on a mat", "item_a", 4, False), ("a photo of a dog", "item_b", 3, False)]
    q4 = items[0][1].questions[3]
    assert q4 == Question(4, "is the cat on the mat?", (1, 3), "relation - spatial") and q4.l1 == "relation"
    assert items[1][1].questions[1].category == "global" and items[1][1].questions[1].l1 == "global"
    # the reference's `if i == 0: continue`: the first question of the first item goes; 2 and 4 depend on it,
    # so the reference fails on that image (KeyError) and skips it
    quirk = read_dpg_csv(path, reference_skip_first_row=True)
    assert [q.qid for q in quirk[0][1].questions] == [2, 3, 4] and quirk[0][1].skipped
    assert quirk[1][1] == items[1][1]
    # a first question nobody depends on: the item is scored with one question fewer
    rows = [ROWS[2], ROWS[0], ROWS[1]]
    only = read_dpg_csv(write_csv(tmp_path / "b.csv", rows), reference_skip_first_row=True)
    assert [q.qid for q in only[0][1].questions] == [1, 2] and not only[0][1].skipped


def test_dpg_bad_csv_is_one_line(tmp_path):
    bad = [r[:] for r in ROWS]
    bad[1][4] = "one"
    with pytest.raises(UserError) as e:
        read_dpg_csv(write_csv(tmp_path / "a.csv", bad))
    one_line_error(e, "item_a", "dependency")
    dangling = [r[:] for r in ROWS]
    dangling[1][4] = "7"
    with pytest.raises(UserError) as e:
        read_dpg_csv(write_csv(tmp_path / "b.csv", dangling))
    one_line_error(e, "[7]")


def test_dpg_yes_is_exact_after_strip():
    assert [is_yes(a) for a in ["yes", " yes\n", "Yes", "YES", "yes.", "yes yes", "no", ""]] == [1, 1, 0, 0, 0, 0, 0, 0]


def test_dpg_dependency_pass():
    q = lambda qid, *parents: Question(qid, f"q{qid}", parents or (0,), "entity - whole")  # noqa: E731
    # a chain listed parent first: the zero runs down
    assert adjusted_scores([q(1), q(2, 1), q(3, 2)], {1: 0.0, 2: 1.0, 3: 1.0}) == {1: 0.0, 2: 0.0, 3: 0.0}
    # a child listed before its parent sees the parent's raw score (the reference's single ordered pass)
    assert adjusted_scores([q(1), q(3, 2), q(2, 1)], {1: 0.0, 2: 1.0, 3: 1.0}) == {1: 0.0, 2: 0.0, 3: 1.0}
    # any parent at 0 zeroes; parent 0 means none; a child answered no stays 0
    assert adjusted_scores([q(1), q(2), q(3, 1, 2), q(4, 2)], {1: 1.0, 2: 0.0, 3: 1.0, 4: 1.0}) == {
        1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0}


def test_dpg_scores_raw_categories_and_scaling(tmp_path, monkeypatch):
    path = write_csv(tmp_path / "dpg_bench.csv")
    vqa = FakeVQA({"is the cat red?": "yes", "is there a mat?": "yes", "is the cat on the mat?": "yes",
                   "is there a dog?": "yes", "is this a photo?": "yes", "is there one dog?": "yes"})
    metric = dpg_metric(monkeypatch, vqa, csv=str(path))
    meta = [{"item_id": "item_a"}, {"item_id": "item_b"}, {}]  # the third is looked up by its prompt
    prompts = ["a red cat on a mat", "a photo of a dog", "a photo of a dog"]
    out = metric.score(images(3), prompts, meta)
    # item_a: raw (0,1,1,1) -> adjusted (0,0,1,0): 1/4; item_b all yes: 1
    assert [c["score"] for c in out] == [0.25, 1.0, 1.0]
    assert vqa.calls[0][1] == ["is there a cat?", "is the cat red?", "is there a mat?", "is the cat on the mat?"]
    summary = metric.summarize(accumulate(metric, out))
    assert summary["dpgbench"] == pytest.approx(100 * 2.25 / 3, rel=1e-15)
    # categories from RAW answers: the attribute and relation questions count as yes although zeroed above
    assert summary["dpgbench/L1/entity"] == pytest.approx(100 * 3 / 4)  # cat no, mat yes, dog yes twice
    assert summary["dpgbench/L1/attribute"] == 100.0 and summary["dpgbench/L1/relation"] == 100.0
    assert summary["dpgbench/L1/global"] == 100.0 and summary["dpgbench/L2/global"] == 100.0
    assert summary["dpgbench/L2/entity-whole"] == pytest.approx(75.0)
    assert summary["dpgbench/L2/other-count"] == 100.0
    assert "dpgbench/skipped" not in summary
    two_ranks_equal_one(metric, images(4), prompts + ["a red cat on a mat"], meta + [{"item_id": "item_a"}])


def test_dpg_metadata_rows_equal_the_csv(tmp_path, monkeypatch):
    """Prompts read by data/prompts.py carry their csv rows: scoring from them equals scoring from the csv."""
    path = write_csv(tmp_path / "dpg_bench.csv")
    items = load_prompts("dpgbench", path)
    prompts, meta = [it.prompt for it in items], [it.metadata for it in items]
    vqa = FakeVQA({"is there a cat?": "yes", "is the cat red?": "yes", "is this a photo?": "yes"})
    from_rows = dpg_metric(monkeypatch, vqa).score(images(2), prompts, meta)
    from_csv = dpg_metric(monkeypatch, vqa, csv=str(path)).score(images(2), prompts, meta)
    assert from_rows == [{k: v for k, v in c.items() if not k.startswith("L2/")} for c in from_csv]
    assert from_rows[0]["score"] == 0.5 and from_rows[1]["score"] == pytest.approx(1 / 3)


def test_dpg_first_row_quirk_skips_the_image(tmp_path, monkeypatch):
    path = write_csv(tmp_path / "dpg_bench.csv")
    metric = dpg_metric(monkeypatch, FakeVQA({"is there a dog?": "yes"}), csv=str(path), reference_skip_first_row=True)
    out = metric.score(images(2), ["a red cat on a mat", "a photo of a dog"], [{"item_id": "item_a"}, {"item_id": "item_b"}])
    assert out[0] == {"skipped": 1.0}
    summary = metric.summarize(accumulate(metric, out))
    assert summary["dpgbench"] == pytest.approx(100 / 3) and summary["dpgbench/skipped"] == 1.0
    with pytest.raises(UserError) as e:
        dpg_metric(monkeypatch, FakeVQA(), reference_skip_first_row=True)
    one_line_error(e, "options.dpgbench.csv")


def test_dpg_tiles(tmp_path, monkeypatch):
    assert tile_boxes(8) == [(0, 0, 8, 8), (8, 0, 16, 8), (0, 8, 8, 16), (8, 8, 16, 16)]
    assert tile_boxes(8, 2) == [(0, 0, 8, 8), (8, 0, 16, 8)]
    grid = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # TL, TR, BL, BR
    for (x, y), c in zip([(0, 0), (8, 0), (0, 8), (8, 8)], colours, strict=True):
        grid[0, :, y : y + 8, x : x + 8] = torch.tensor(c, dtype=torch.uint8)[:, None, None]

    class RedIsYes(FakeVQA):
        def __call__(self, image, questions):
            self.calls.append((np.asarray(image), list(questions)))
            return ["yes" if image.getpixel((0, 0)) == (255, 0, 0) else "no"] * len(questions)

    path = write_csv(tmp_path / "dpg_bench.csv")
    for tiles, expected in [(4, 0.25), (2, 0.5), (1, 1.0)]:  # only the red tile answers yes
        vqa = RedIsYes()
        out = dpg_metric(monkeypatch, vqa, csv=str(path), tiles=tiles).score(grid, ["a photo of a dog"], [{}])
        seen = [tuple(int(v) for v in a[0, 0]) for a, _ in vqa.calls]
        side = 16 if tiles == 1 else 8
        assert all(a.shape == (side, side, 3) for a, _ in vqa.calls) and seen == colours[:tiles]
        assert out[0]["score"] == expected
        assert out[0]["L1/entity/asked"] == tiles and out[0]["L1/entity/yes"] == 1.0
    with pytest.raises(UserError) as e:
        dpg_metric(monkeypatch, RedIsYes(), csv=str(path), tiles=4).score(images(1, 15), ["a photo of a dog"], [{}])
    one_line_error(e, "15x15")


def test_dpg_missing_package_and_mplug_call(monkeypatch):
    monkeypatch.setitem(sys.modules, "dpg_evaluator", None)
    with pytest.raises(UserError) as e:
        DPGMetric(CPU)
    one_line_error(e, "dpg_evaluator", "pip install", "subdirectory=dpgbench")

    class MPLUG:  # the assumed interface of dpg_evaluator.MPLUG
        made = []

        def __init__(self, model_dir, device):
            self.args, self.calls = (model_dir, device), []
            self.made.append(self)

        def batch_vqa(self, images, questions):
            self.calls.append((images, questions))
            return ["yes"] * len(questions)

    fake = types.ModuleType("dpg_evaluator")
    fake.MPLUG = MPLUG
    monkeypatch.setitem(sys.modules, "dpg_evaluator", fake)
    vqa = dpg.mplug_vqa("/weights", CPU)
    image = Image.new("RGB", (4, 4))
    assert vqa(image, ["a?", "b?"]) == ["yes", "yes"]
    (model,) = MPLUG.made
    assert model.args == ("/weights", "cpu") and model.calls == [([image, image], ["a?", "b?"])]


# --------------------------------------------------------------------------- VQAScore (item 25)


def test_vqascore_strings_are_the_reference():
    assert vqascore.QUESTION_TEMPLATE == 'Does this figure show "{}"? Please answer yes or no.'
    assert vqa_question('a "red" {cat}') == 'Does this figure show "a "red" {cat}"? Please answer yes or no.'
    assert vqascore.ANSWER == "Yes"


def test_vqascore_reduction_hand_computed():
    # token 0 at position 0: softmax([ln 2, 0, 0])[0] = 1/2; token 1 at position 1: uniform, 1/3
    logits = torch.tensor([[[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]]])
    assert answer_score(logits, torch.tensor([[0, 1]])).item() == pytest.approx(math.sqrt(1 / 6), rel=1e-6)
    assert answer_score(logits[:, :1], torch.tensor([[0]])).item() == pytest.approx(0.5, rel=1e-6)


def test_answer_tokens_keep_what_the_tokenizer_appends(tiny_clip, tiny_qwen, tiny_blip):
    from transformers import AutoTokenizer

    clip_tok, qwen_tok, bert_tok = (AutoTokenizer.from_pretrained(d) for d in (tiny_clip, tiny_qwen, tiny_blip))
    plain = clip_tok("Yes", add_special_tokens=False)["input_ids"]
    assert answer_token_ids(clip_tok) == plain + [clip_tok.eos_token_id]  # BOS dropped, EOS kept (as T5's </s>)
    assert answer_token_ids(qwen_tok) == qwen_tok("Yes")["input_ids"] == [56, 68, 82]  # appends nothing
    assert answer_token_ids(bert_tok, "yes") == [bert_tok.convert_tokens_to_ids("yes"), bert_tok.sep_token_id]


def test_hf_scorer_teacher_forcing_with_fake_logits(tiny_qwen):
    scorer = HFVQAScorer(str(tiny_qwen), CPU)
    answer = scorer.answer.tolist()
    probs = [0.6, 0.25, 0.9]
    seen = {}

    def fake_model(**inputs):
        seen.update(inputs)
        ids = inputs["input_ids"]
        logits = torch.zeros(*ids.shape, 300, dtype=torch.float64)
        for k, (tok, p) in enumerate(zip(answer, probs, strict=True)):  # exact probabilities for the answer tokens
            pos = ids.shape[1] - len(answer) - 1 + k
            logits[:, pos] = math.log((1 - p) / 299)
            logits[:, pos, tok] = math.log(p)
        return SimpleNamespace(logits=logits)

    scorer.model = fake_model
    scorer.model.dtype = torch.float32
    pil = [vqascore.to_pil(x) for x in images(2, 40)]
    out = scorer(pil, ["a cat", "a dog and a bird in the rain"])
    assert out.tolist() == pytest.approx([(0.6 * 0.25 * 0.9) ** (1 / 3)] * 2, rel=1e-12)
    assert seen["input_ids"][:, -3:].tolist() == [answer, answer]
    assert seen["attention_mask"][:, -3:].tolist() == [[1, 1, 1]] * 2
    assert seen["attention_mask"][0, 0] == 0 and seen["attention_mask"][1, 0] == 1  # left padding


def test_hf_scorer_end_to_end_matches_independent_computation(tiny_qwen):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    scorer = HFVQAScorer(str(tiny_qwen), CPU)
    prompts = ["a cat", "a dog and a bird in the rain"]
    pil = [vqascore.to_pil(x) for x in images(2, 40, seed=3)]
    batched = scorer(pil, prompts)
    processor = AutoProcessor.from_pretrained(tiny_qwen)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen).eval()
    for image, prompt, got in zip(pil, prompts, batched, strict=True):
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vqa_question(prompt)}]}]
        text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) + "Yes"
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            logp = torch.log_softmax(model(**inputs).logits[0].double(), dim=-1)
        ids = inputs["input_ids"][0]
        p = [logp[len(ids) - 4 + k, ids[len(ids) - 3 + k]] for k in range(3)]  # "Yes" = 3 byte tokens
        assert got.item() == pytest.approx(math.exp(sum(p) / 3), rel=1e-4)


def test_vqascore_metric_protocol_and_names(tiny_qwen, monkeypatch):
    metric = VQAScoreMetric(CPU, model=str(tiny_qwen), batch_size=2)  # the same batches on one and two ranks
    assert metric.label == f"vqascore_{tiny_qwen.name}"
    prompts = ["a cat", "two dogs", "a red ball", "a blue car", "the sea"]
    one = two_ranks_equal_one(metric, images(5, 40), prompts, [{}] * 5)
    direct = metric.scorer([vqascore.to_pil(x) for x in images(5, 40)], prompts)
    assert one[metric.label] == pytest.approx(direct.double().mean().item(), rel=1e-5)
    monkeypatch.setattr(vqascore, "make_scorer", lambda model, backend, device: None)
    assert VQAScoreMetric(CPU).label == "vqascore_clip-flant5-xl"
    assert VQAScoreMetric(CPU, model="Qwen/Qwen2.5-VL-3B-Instruct").label == "vqascore_qwen2.5-vl-3b-instruct"
    with pytest.raises(UserError) as e:
        VQAScoreMetric(CPU, backend="llava")
    one_line_error(e, "t2v_metrics, hf")


def test_vqascore_t2v_metrics_missing_and_call(monkeypatch):
    monkeypatch.setitem(sys.modules, "t2v_metrics", None)
    with pytest.raises(UserError) as e:
        VQAScoreMetric(CPU, model="clip-flant5-xxl")
    one_line_error(e, "t2v_metrics", "pip install", "subdirectory=t2v_metrics")
    seen = {}

    class VQAScore:  # the assumed interface of t2v_metrics.VQAScore
        def __init__(self, model, device):
            seen["init"] = (model, device)
            self.model = self

        def forward(self, paths, texts, question_template, answer_template):
            seen["images"] = [np.asarray(Image.open(p)) for p in paths]
            seen["call"] = (texts, question_template, answer_template)
            return torch.tensor([0.25, 0.75])

    fake = types.ModuleType("t2v_metrics")
    fake.VQAScore = VQAScore
    monkeypatch.setitem(sys.modules, "t2v_metrics", fake)
    metric = VQAScoreMetric(CPU, model="clip-flant5-xxl")
    imgs = images(2)
    out = metric.score(imgs, ["a", "b"], [{}, {}])
    assert out == [{"score": 0.25}, {"score": 0.75}] and seen["init"] == ("clip-flant5-xxl", "cpu")
    assert seen["call"] == (["a", "b"], vqascore.QUESTION_TEMPLATE, "Yes")
    assert all((a == x.permute(1, 2, 0).numpy()).all() for a, x in zip(seen["images"], imgs, strict=True))  # lossless
    assert metric.summarize(accumulate(metric, out)) == {"vqascore_clip-flant5-xxl": 0.5}


# --------------------------------------------------------------------------- CLIPScore (item 26)


def test_clipscore_conventions_on_fixed_cosines():
    cos = torch.tensor([0.3, -0.2, 0.25], dtype=torch.float64)
    mean = lambda c, conv: reduce_mean(per_image(c, conv).mean().item(), conv)  # noqa: E731
    assert mean(cos, Convention.RAWCOS) == pytest.approx(0.35 / 3, rel=1e-12)
    assert mean(cos, Convention.TORCHMETRICS) == pytest.approx(100 * 0.35 / 3, rel=1e-12)
    assert mean(cos, Convention.HESSEL) == pytest.approx(2.5 * 0.55 / 3, rel=1e-12)
    # torchmetrics clamps the mean, Hessel every image
    neg = torch.tensor([-0.5, 0.1], dtype=torch.float64)
    assert mean(neg, Convention.TORCHMETRICS) == 0.0 and mean(neg, Convention.RAWCOS) == pytest.approx(-0.2)
    assert mean(neg, Convention.HESSEL) == pytest.approx(0.125)


def test_clipscore_hf_path_names_and_protocol(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    prompts = ["a cat", "a dog " * 60, "red", "the sea at night"]  # the second needs truncation to 77 tokens
    imgs = images(4, 40, seed=1)
    cos = CLIPCosine(str(tiny_clip), CPU)([clipscore.to_pil(x) for x in imgs], prompts)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    tok = processor.tokenizer(prompts, truncation=True, max_length=77)
    assert len(tok["input_ids"][1]) == 77 and tok["input_ids"][1][-1] == processor.tokenizer.eos_token_id
    with torch.no_grad():
        pixels = processor.image_processor([clipscore.to_pil(x) for x in imgs], return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).double().numpy()
        txt = [model.text_projection(model.text_model(input_ids=torch.tensor([ids])).pooler_output)[0].double().numpy()
               for ids in tok["input_ids"]]
    expected = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(img, txt, strict=True)]
    assert cos.double().numpy() == pytest.approx(expected, abs=1e-5)
    for conv in Convention:
        metric = CLIPScoreMetric(CPU, convention=conv.value, model=str(tiny_clip), batch_size=2)
        one = two_ranks_equal_one(metric, imgs, prompts, [{}] * 4)
        want = reduce_mean(float(per_image(torch.tensor(expected, dtype=torch.float64), conv).mean()), conv)
        assert one == {f"clipscore_{conv.value}": pytest.approx(want, abs=1e-5)}
    with pytest.raises(UserError) as e:
        CLIPScoreMetric(CPU, convention="x100", model=str(tiny_clip))
    one_line_error(e, "rawcos, torchmetrics, hessel")


def test_missing_model_is_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        CLIPScoreMetric(CPU, model=str(tmp_path / "nowhere"))
    one_line_error(e, "nanogen prepare --models")


def test_to_pil_is_the_identity_on_pixels():
    x = images(1, 5)[0]
    assert (np.asarray(vqascore.to_pil(x)) == x.permute(1, 2, 0).numpy()).all()
    with pytest.raises(ValueError):
        vqascore.to_pil(x.float())


# --------------------------------------------------------------------------- DPG's HF backend (tiny BLIP)


def test_dpg_hf_backend_answers_as_generate(tiny_blip):
    from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

    metric = DPGMetric(CPU, backend="hf", model=str(tiny_blip))
    assert metric.label == f"dpgbench_{tiny_blip.name}"
    image = vqascore.to_pil(images(1, 40)[0])
    questions = ["is there a cat?", "is there a red dog?"]
    processor = AutoProcessor.from_pretrained(tiny_blip)
    model = AutoModelForVisualQuestionAnswering.from_pretrained(tiny_blip).eval()
    inputs = processor(images=[image, image], text=questions, padding=True, return_tensors="pt")
    expected = processor.batch_decode(model.generate(**inputs, max_new_tokens=10), skip_special_tokens=True)
    assert metric.vqa(image, questions) == [a.strip() for a in expected]


# --------------------------------------------------------------------------- tiny models, built offline


def byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable character table (the base vocabulary of byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny-clip")
    chars = byte_level_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    n = len(vocab)
    text = dict(vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipProcessor,
    )

    d = tmp_path_factory.mktemp("tiny-blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "is", "there", "a", "cat", "dog", "?", "red"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, sep_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d)
    tok = BertTokenizer(str(d / "vocab.txt"))
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    """A 2-layer Qwen2-VL with a byte-level tokenizer without merges ("Yes" = 3 tokens) and a Qwen-style chat
    template."""
    from transformers import (
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    d = tmp_path_factory.mktemp("tiny-qwen-vl")
    (d / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(byte_level_chars())}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = Qwen2Tokenizer(str(d / "vocab.json"), str(d / "merges.txt"), eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", unk_token=None, bos_token=None)
    specials = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                            temporal_patch_size=2)
    Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                     chat_template=template).save_pretrained(d)
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters=rope, bos_token_id=None, eos_token_id=tok.eos_token_id)
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(d)
    return d
