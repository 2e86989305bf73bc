"""DPG-Bench: dense prompts checked by a VQA model against DSG-style propositions (spec ``evaluation.md`` §3.2,
``reference.md`` §8.4-8.5; ELLA's ``compute_dpg_bench.py``, ported by DiffusionBench's ``dpg_evaluator``).

``dpg_bench.csv`` has one row per question: item_id, text, keywords, proposition_id, dependency,
category_broad, category_detailed, tuple, question_natural_language. An item (one prompt) has its questions in
file order; a question has a proposition id, its parents (``dependency``: "0" = none, "1,2" = propositions 1
and 2) and a category: ``tuple`` before its "(" is the L2 category ("entity - whole"), whose part before "-"
is the L1 category (entity, attribute, relation, global, other).

Scoring, as the reference:

1. a question scores 1 iff the VQA answer, stripped, is exactly ``yes`` (no lowercasing: the reference compares
   with 'yes', and mPLUG's vocabulary is lowercase);
2. one pass over the questions in file order, on the scores as they are being adjusted: a question with a
   parent (other than 0) at 0 is set to 0. A zero therefore runs down a chain listed parent first, while a
   child listed before its parent sees the parent's raw score, as in the reference;
3. image score = mean of the adjusted scores (with tiles: the mean over the tiles);
4. ``dpgbench`` = 100 x mean over images. Category scores ``dpgbench/L1/<name>``, ``dpgbench/L2/<name>``
   (``entity-whole``) = 100 x the mean of the RAW scores of all questions of the category, over all images and
   tiles (as dpg_evaluator; ELLA's script counted only the last tile).

Options (``eval.datasets.<set>.options.dpgbench``):

- ``csv``: the path of dpg_bench.csv. Without it the questions come from each prompt's metadata (data/prompts.py
  attaches an item's csv rows when it reads the prompts from dpg_bench.csv). With it, items are looked up by the
  metadata's item_id, else by exact prompt text, and the L2 categories are reported too (the accumulator keys
  must be known before scoring).
- ``reference_skip_first_row`` (default off; needs ``csv``): the reference's ``if i == 0: continue`` after pandas
  consumed the header drops the first question of the first item. A question that depends on it then makes the
  reference raise KeyError and skip the whole image ("Failed filename"); such an image counts only in
  ``dpgbench/skipped``.
- ``tiles``: 1 (DiffusionBench: every image is one sample) or 2-4: every image is ELLA's 2x2 grid of samples and
  its first ``tiles`` tiles, in ELLA's order (top-left, top-right, bottom-left, bottom-right; ``--pic-num``), are
  scored. Scoring a prompt's 4 images separately gives the same number (equal counts per prompt).
- ``backend``: ``mplug`` (the reference's mPLUG-large through ``dpg_evaluator``; ``model`` = a local copy of its
  weights, else the package downloads them) or ``hf``: a generative Hugging Face VQA model (default
  ``Salesforce/blip-vqa-base``), reported as ``dpgbench_<model>`` because its numbers are NOT comparable to the
  paper's.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor

from nanogen.errors import UserError
from nanogen.eval.t2i.common import load_pretrained, require, to_pil

L1_CATEGORIES = ("entity", "attribute", "relation", "global", "other")
QUESTION_COLUMNS = ("proposition_id", "dependency", "tuple", "question_natural_language")
BACKENDS = ("mplug", "hf")
DEFAULT_HF_VQA = "Salesforce/blip-vqa-base"
DPG_INSTALL = "git+https://github.com/End2End-Diffusion/diffusionbench-evals.git#subdirectory=dpgbench"
MAX_ANSWER_TOKENS = 10  # answers are "yes", "no", a colour, a count


class VQABackend(Protocol):
    """The answers of a VQA model to ``questions`` about one image, decoded and stripped."""

    def __call__(self, image: Image.Image, questions: list[str]) -> list[str]: ...


@dataclass(frozen=True)
class Question:
    qid: int  # proposition_id
    text: str  # question_natural_language
    parents: tuple[int, ...]  # proposition ids it depends on; 0 = none
    category: str  # L2: the `tuple` before its "(", e.g. "entity - whole"

    @property
    def l1(self) -> str:
        return self.category.split("-")[0].strip()


@dataclass(frozen=True)
class DPGItem:
    item_id: str
    questions: tuple[Question, ...]  # in file order: the dependency pass depends on it
    skipped: bool = False  # the reference fails on this item (see reference_skip_first_row) and leaves it out


# --------------------------------------------------------------------------- the csv


def parse_question(row: dict[str, Any], where: str) -> Question:
    absent = [c for c in QUESTION_COLUMNS if c not in row]
    if absent:
        raise UserError(f"{where}: no column {', '.join(absent)}; DPG-Bench rows need {', '.join(QUESTION_COLUMNS)}")
    try:
        qid = int(row["proposition_id"])
        parents = tuple(int(d) for d in str(row["dependency"]).split(","))
    except ValueError:
        raise UserError(f"{where}: proposition_id {row['proposition_id']!r} / dependency {row['dependency']!r} are not "
                        "integers ('3', '0' or '1,2'); fix the file") from None
    category = str(row["tuple"]).split("(")[0].strip()
    question = Question(qid, str(row["question_natural_language"]), parents, category)
    if question.l1 not in L1_CATEGORIES:
        raise UserError(f"{where}: category '{category}' is not under one of {', '.join(L1_CATEGORIES)}; fix its tuple")
    return question


def make_item(item_id: str, rows: Sequence[dict[str, Any]], where: str, dropped: int | None = None) -> DPGItem:
    """One item from its rows. ``dropped``: the proposition id the reference's first-row quirk removed."""
    questions = tuple(parse_question(row, f"{where} question {n}") for n, row in enumerate(rows, start=1))
    repeated = [q for q, n in Counter(q.qid for q in questions).items() if n > 1]
    if repeated:
        raise UserError(f"{where}: proposition_id {repeated[0]} appears twice; fix the file")
    known = {q.qid for q in questions}
    missing = {p for q in questions for p in q.parents if p != 0 and p not in known}
    if missing - {dropped}:
        raise UserError(f"{where}: questions depend on propositions {sorted(missing - {dropped})} the item does not have; "
                        "fix the dependency column")
    return DPGItem(item_id, questions, skipped=bool(missing))


def read_dpg_csv(path: str | Path, reference_skip_first_row: bool = False) -> list[tuple[str, DPGItem]]:
    """(prompt, item) per item_id, in file order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"dpgbench: csv '{path}' not found; run `nanogen prepare --data eval` or fix options.dpgbench.csv")
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8", errors="replace"), newline="")))
    missing = [c for c in ("item_id", "text", *QUESTION_COLUMNS) if rows and c not in rows[0]]
    if not rows or missing:
        raise UserError(f"dpgbench: '{path}' is not dpg_bench.csv (no rows, or no column {', '.join(missing)})")
    dropped = None
    if reference_skip_first_row:
        dropped = (rows[0]["item_id"], parse_question(rows[0], f"{path} row 1").qid)
        rows = rows[1:]
    groups: dict[str, tuple[str, list[dict[str, str]]]] = {}
    for row in rows:
        groups.setdefault(row["item_id"], (row["text"], []))[1].append(row)
    return [(prompt, make_item(i, group, f"{path} item {i}", dropped[1] if dropped and dropped[0] == i else None))
            for i, (prompt, group) in groups.items()]


# --------------------------------------------------------------------------- scoring


def is_yes(answer: str) -> float:
    return float(answer.strip() == "yes")


def adjusted_scores(questions: Sequence[Question], raw: dict[int, float]) -> dict[int, float]:
    """The dependency pass: in order, a question with a parent (not 0) at 0 becomes 0."""
    adjusted = dict(raw)
    for q in questions:
        if any(adjusted[p] == 0 for p in q.parents if p != 0):
            adjusted[q.qid] = 0.0
    return adjusted


def image_contribution(item: DPGItem, tile_answers: Sequence[Sequence[str]], l2: bool) -> dict[str, float]:
    """{"score": image score} plus, per category ("L1/<name>", "L2/<name>": an L2 name may equal an L1 name), the
    raw yes count and the number of questions asked."""
    out: dict[str, float] = {}
    scores = []
    for answers in tile_answers:
        raw = {q.qid: is_yes(a) for q, a in zip(item.questions, answers, strict=True)}
        adjusted = adjusted_scores(item.questions, raw)
        scores.append(sum(adjusted.values()) / len(adjusted))
        for q in item.questions:
            for group in (f"L1/{q.l1}", f"L2/{q.category}") if l2 else (f"L1/{q.l1}",):
                out[f"{group}/yes"] = out.get(f"{group}/yes", 0.0) + raw[q.qid]
                out[f"{group}/asked"] = out.get(f"{group}/asked", 0.0) + 1.0
    return {"score": sum(scores) / len(scores), **out}


def tile_boxes(resolution: int, n: int = 4) -> list[tuple[int, int, int, int]]:
    """ELLA's crop boxes (left, upper, right, lower) of a 2x2 grid of ``resolution``-pixel tiles, first ``n``."""
    r = resolution
    return [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)][:n]


def category_name(category: str) -> str:
    """'L2/entity - whole' -> 'L2/entity-whole' (reported names without spaces)."""
    return "-".join(part.strip() for part in category.split("-")).replace(" ", "_")


# --------------------------------------------------------------------------- backends


def mplug_vqa(model_dir: str | None, device: torch.device) -> VQABackend:
    """The reference's mPLUG-large (modelscope's, ported to plain transformers in dpg_evaluator)."""
    dpg_evaluator = require("dpg_evaluator", "dpgbench's mplug backend", DPG_INSTALL)
    # ASSUMED CALL (the package is not installed here): MPLUG(model_dir, device) loads the weights (downloading
    # diffusion-bench/mplug_visual-question-answering_coco_large_en when model_dir is None or absent);
    # batch_vqa(images, questions) answers the pairs (bicubic resize, CLIP mean/std, questions padded to at most
    # 35 tokens, fp16 autocast) and returns the decoded answers without [SEP]/[CLS]/[PAD], stripped.
    mplug = dpg_evaluator.MPLUG(model_dir=model_dir, device=str(device))
    return lambda image, questions: mplug.batch_vqa([image] * len(questions), questions)


class HFVQA:
    """A generative Hugging Face VQA model (BLIP: ``AutoModelForVisualQuestionAnswering`` + ``generate``)."""

    def __init__(self, source: str, device: torch.device):
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

        self.device = device
        self.processor = load_pretrained(AutoProcessor.from_pretrained, source, "dpgbench VQA processor")
        model = load_pretrained(AutoModelForVisualQuestionAnswering.from_pretrained, source, "dpgbench VQA model")
        if not model.can_generate():
            raise UserError(f"dpgbench: '{source}' classifies answers instead of generating them; use a BLIP VQA "
                            f"model such as {DEFAULT_HF_VQA}")
        self.model = model.to(device).eval()

    @torch.no_grad()
    def __call__(self, image: Image.Image, questions: list[str]) -> list[str]:
        inputs = self.processor(images=[image] * len(questions), text=questions, padding=True, return_tensors="pt")
        ids = self.model.generate(**inputs.to(self.device), max_new_tokens=MAX_ANSWER_TOKENS)
        return [a.strip() for a in self.processor.batch_decode(ids, skip_special_tokens=True)]


def make_vqa(backend: str, model: str | None, device: torch.device) -> VQABackend:
    return mplug_vqa(model, device) if backend == "mplug" else HFVQA(model or DEFAULT_HF_VQA, device)


# --------------------------------------------------------------------------- the metric


class DPGMetric:
    """The prompt-metric protocol (eval/metrics.py): image scores and per-category answer counts."""

    name = "dpgbench"

    def __init__(self, device: torch.device, backend: str = "mplug", model: str | None = None,
                 csv: str | None = None, reference_skip_first_row: bool = False, tiles: int = 1):
        if backend not in BACKENDS:
            raise UserError(f"dpgbench: unknown backend '{backend}'; options.dpgbench.backend is one of {', '.join(BACKENDS)}")
        if not isinstance(tiles, int) or not 1 <= tiles <= 4:
            raise UserError(f"dpgbench: tiles must be 1 (one sample per image) or 2-4 (tiles of a 2x2 grid), got {tiles!r}")
        if reference_skip_first_row and not csv:
            raise UserError("dpgbench: reference_skip_first_row needs the file order: set options.dpgbench.csv to dpg_bench.csv")
        self.csv, self.tiles = csv, tiles
        table = read_dpg_csv(csv, reference_skip_first_row) if csv else []
        self.by_id = {item.item_id: item for _, item in table}
        self.by_prompt = {prompt: item for prompt, item in table}
        self.l2 = sorted({q.category for _, item in table for q in item.questions})
        self.groups = [f"L1/{c}" for c in L1_CATEGORIES] + [f"L2/{c}" for c in self.l2]
        self.keys = ("score", "skipped", *(f"{g}/{k}" for g in self.groups for k in ("yes", "asked")))
        self.label = "dpgbench" if backend == "mplug" else f"dpgbench_{Path(model or DEFAULT_HF_VQA).name.lower()}"
        self.vqa = make_vqa(backend, model, device)

    def item(self, prompt: str, meta: dict[str, Any]) -> DPGItem:
        item_id = meta.get("item_id")
        if self.csv:
            item = self.by_id.get(str(item_id)) if item_id is not None else self.by_prompt.get(prompt)
            if item is None:
                raise UserError(f"dpgbench: prompt {prompt[:60]!r} (item_id {item_id}) is not in {self.csv}; "
                                "score DPG-Bench prompts with the csv they came from")
            return item
        if not meta.get("rows"):
            raise UserError(f"dpgbench: prompt {prompt[:60]!r} has no DPG-Bench questions in its metadata; read the "
                            "prompts from dpg_bench.csv or set options.dpgbench.csv")
        return make_item(str(item_id), meta["rows"], f"dpgbench item {item_id}")

    def tiles_of(self, image: Image.Image) -> list[Image.Image]:
        if self.tiles == 1:
            return [image]
        w, h = image.size
        if w != h or w % 2:
            raise UserError(f"dpgbench: tiles={self.tiles} expects square 2x2 grids with an even side, got {w}x{h}")
        return [image.crop(box) for box in tile_boxes(w // 2, self.tiles)]

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> list[dict[str, float]]:
        out = []
        for image, prompt, meta in zip(images, prompts, metadata, strict=True):
            item = self.item(prompt, meta)
            if item.skipped:
                out.append({"skipped": 1.0})
                continue
            questions = [q.text for q in item.questions]
            answers = [self.vqa(tile, questions) for tile in self.tiles_of(to_pil(image))]
            out.append(image_contribution(item, answers, l2=bool(self.l2)))
        return out

    def summarize(self, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        total, images = sums["score"]
        out = {self.label: 100.0 * total / images if images else float("nan")}
        for group in self.groups:
            yes, asked = sums[f"{group}/yes"][0], sums[f"{group}/asked"][0]
            if asked:
                out[f"{self.label}/{category_name(group)}"] = 100.0 * yes / asked
        if sums["skipped"][1]:
            out[f"{self.label}/skipped"] = sums["skipped"][1]
        return out
