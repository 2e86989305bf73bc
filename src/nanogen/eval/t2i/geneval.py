"""GenEval: its official per-image rules, metadata schema and summary, and the reference's detector and
colour backends behind the text-to-image metric protocol (spec ``evaluation.md`` §3.1, ``reference.md`` §8.4).

The rules are pure functions on plain data, shared with the nano tier (``eval/nano_geneval.py``):

- Per class, keep detections with score > 0.3 (> 0.9 on a ``counting`` image, for every class), highest
  first, at most 16. No NMS (GenEval's ``max_overlap`` is 1.0).
- ``include`` clauses are ANDed: the top-``count`` kept detections of the class must exist; with ``color``,
  at least ``count`` of them must have that colour; with ``position: [relation, target]``, each of them must
  stand in ``relation`` (``relative_position``, threshold 0.1, y grows downward) to every object matched by
  include ``target``, and a target group that failed fails the clause. ``exclude`` clauses are ORed: >=
  ``count`` kept detections of the class fail the image. Counting is include N (at 0.9) AND exclude N+1.
- Colour is computed lazily: a detector may leave ``Detection.color`` empty, and the rules ask a colour
  function for the chosen top-``count`` objects only, as GenEval classifies only those.
- Summary: accuracy per tag; ``overall`` = mean of the tag accuracies (GenEval's number); ``per_image`` =
  mean over images (what the reference logs, §8.4); ``correct_prompts`` = share of prompts with at least one
  correct image, grouped by the rows' ``prompt`` (GenEval groups by the whole row, which holds the prompt).

Backends, as the DiffusionBench port runs them (transformers only, no mmdet):

- ``Mask2FormerDetector``: HF ``Mask2FormerForUniversalSegmentation`` (default
  ``facebook/mask2former-swin-small-coco-instance``) at shortest edge 800 / longest 1333. Post-processing
  (``instances``): class softmax without the no-object column; the best Q (query, class) pairs (Q queries,
  so one query may name two classes); binary mask = mask logit > 0 at the processed size; score = class
  probability x mean mask probability inside the binary mask; masks resized (nearest) to the image and kept
  when non-empty with score >= 0.3. The score is stored rounded to 6 decimals and the box is the mask's
  extent with its last pixel included, as the port stores them. HF label names map to GenEval's
  (``HF_LABEL_NAMES``). The checkpoint's own ``id2label`` could not be checked offline, so the map covers
  both spellings seen for COCO: PASCAL-style motorbike / aeroplane / sofa / pottedplant / diningtable /
  tvmonitor, and COCO's mouse / remote / keyboard. Labels that map to no GenEval class are dropped, as in
  the port.
- ``ClipColorClassifier``: HF ``CLIPModel`` (default ``openai/clip-vit-large-patch14``) zero-shot over the
  10 colours. Per class, a colour's text embedding is the normalised mean of the normalised embeddings of
  "a photo of a {c} {cls}", "a photo of a {c}-colored {cls}" and "a photo of a {c} object". An object's
  image is its mask composited on #999999 grey, cropped (PIL, end exclusive) to its box.

``GenEvalMetric`` is the ``PromptMetric`` (``name``, ``keys``, ``score``, ``summarize``): one accumulator
key per tag, each image adding 1.0 or 0.0 to its tag. Both backends need only ``transformers`` (a core
dependency).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from nanogen.errors import UserError
from nanogen.eval.t2i.common import load_pretrained

THRESHOLD = 0.3  # GenEval's detection threshold
COUNTING_THRESHOLD = 0.9  # ... on images of the counting tag
MAX_OBJECTS = 16  # per class
POSITION_THRESHOLD = 0.1
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# GenEval's object_names.txt: the 80 COCO classes in COCO order, three renamed to read well in a prompt
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
HF_LABEL_NAMES = {
    "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "pottedplant": "potted plant",
    "diningtable": "dining table", "tvmonitor": "tv", "mouse": "computer mouse", "remote": "tv remote",
    "keyboard": "computer keyboard", "hair dryer": "hair drier",
}  # fmt: skip
DEFAULT_DETECTOR_MODEL = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DETECTOR_RESIZE = (800, 1333)  # shortest, longest edge
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
GREY = (153, 153, 153)  # #999999, the background of a colour crop
DETECTOR_BATCH = 16  # images per Mask2Former forward: bounds memory at 800 px, whatever the caller's batch

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    label: str  # GenEval class name
    score: float  # detector confidence
    box: Box  # (x0, y0, x1, y1) in pixels, y down
    color: str | None = None  # None: ask the colour function when a rule needs it
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # bool (H, W), for colour crops


ColorFn = Callable[[str, list[Detection]], list[str]]  # (class name, chosen objects) -> their colour names


# --------------------------------------------------------------------------- metadata


_CLAUSE_KEYS = ("class", "count", "color", "position")


def parse_metadata(
    meta: Any,
    where: str,
    classes: Sequence[str] | None = COCO_CLASSES,
    colors: Sequence[str] | None = COLORS,
) -> dict:
    """A checked copy of one metadata row (``tag``, ``include``, ``exclude``); a malformed row raises one
    line naming ``where`` and the key. Optional keys holding None are dropped (Arrow structs fill absent
    fields with None). ``classes`` / ``colors``: the allowed names (None: any string)."""
    if not isinstance(meta, Mapping):
        raise UserError(
            f"{where}: a GenEval metadata row is an object with tag and include, got {type(meta).__name__}"
        )
    if meta.get("tag") not in TAGS:
        raise UserError(f"{where}: tag is {meta.get('tag')!r}; use one of {', '.join(TAGS)}")
    include = _clauses(meta, "include", where, classes, colors)
    if not include:
        raise UserError(f"{where}: include is empty; a GenEval row names at least one object to find")
    return {**meta, "include": include, "exclude": _clauses(meta, "exclude", where, classes, colors)}


def _clauses(
    meta: Mapping, key: str, where: str, classes: Sequence[str] | None, colors: Sequence[str] | None
) -> list:
    raw = meta.get(key)
    if raw is None:
        return []
    if not isinstance(raw, list | tuple):
        raise UserError(
            f"{where}: {key} must be a list of {{class, count, ...}} objects, got {type(raw).__name__}"
        )
    return [
        _clause(c, f"{where}: {key}[{i}]", i, key == "exclude", classes, colors) for i, c in enumerate(raw)
    ]


def _clause(
    raw: Any,
    where: str,
    index: int,
    exclude: bool,
    classes: Sequence[str] | None,
    colors: Sequence[str] | None,
) -> dict:
    if not isinstance(raw, Mapping):
        raise UserError(
            f"{where} must be an object {{class, count, color?, position?}}, got {type(raw).__name__}"
        )
    clause = {k: v for k, v in raw.items() if v is not None}
    unknown = [k for k in clause if k not in (_CLAUSE_KEYS[:2] if exclude else _CLAUSE_KEYS)]
    if unknown:
        allowed = "class and count" if exclude else "class, count, color and position"
        raise UserError(f"{where}: unknown key {unknown[0]!r}; this clause takes {allowed}")
    name = clause.get("class")
    if not isinstance(name, str) or (classes is not None and name not in classes):
        known = f"one of the {len(classes)} class names (e.g. {classes[0]!r})" if classes else "a class name"
        raise UserError(f"{where}.class is {name!r}; use {known}")
    count = clause.get("count")
    if not _is_int(count) or count < 1:
        raise UserError(f"{where}.count is {count!r}; use a whole number >= 1")
    color = clause.get("color")
    if "color" in clause and (not isinstance(color, str) or not color or (colors and color not in colors)):
        known = f"one of {', '.join(colors)}" if colors else "a colour name"
        raise UserError(f"{where}.color is {color!r}; use {known}")
    if "position" in clause:
        pos = clause["position"]
        ok = isinstance(pos, list | tuple) and len(pos) == 2 and pos[0] in RELATIONS
        if not ok or not _is_int(pos[1]) or not 0 <= pos[1] < index:
            raise UserError(
                f"{where}.position is {pos!r}; use [relation, i] with relation one of {', '.join(RELATIONS)} "
                f"and i the index of an earlier include"
            )
        clause["position"] = (pos[0], int(pos[1]))
    return {**clause, "count": int(count)}


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


# --------------------------------------------------------------------------- the rules


def relative_position(a: Sequence[float], b: Sequence[float]) -> set[str]:
    """Relations of box ``a`` to box ``b`` (x0, y0, x1, y1; y grows downward), as GenEval: the centre offset,
    shrunk towards 0 by 0.1 x (sum of the two boxes' sizes) per axis, then direction components beyond 0.5 of
    the unshrunk offset's length name the relations; a fully absorbed offset means no relation."""
    boxes = np.array([a, b], np.float64).reshape(2, 2, 2)  # (object, corner, xy)
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def confident(detections: Mapping[str, Sequence[Detection]], tag: str) -> dict[str, list[Detection]]:
    """Per class: detections above the tag's threshold, most confident first, at most ``MAX_OBJECTS``."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {
        c: [d for d in sorted(ds, key=lambda d: -d.score) if d.score > threshold][:MAX_OBJECTS]
        for c, ds in detections.items()
    }
    return {c: ds for c, ds in kept.items() if ds}


def _colors_of(name: str, found: list[Detection], colors: ColorFn | None) -> list[str]:
    if all(d.color is not None for d in found):
        return [d.color for d in found]
    if colors is None:
        raise ValueError(
            f"GenEval: the detections of '{name}' carry no colour and no colour function was given"
        )
    return list(colors(name, found))


def judge(
    detections: Mapping[str, Sequence[Detection]], meta: Mapping, colors: ColorFn | None = None
) -> tuple[bool, str]:
    """GenEval's verdict on one image and its reason (one line per failed clause, empty when correct), given
    every detection of the image per class and its metadata row. ``colors`` names the colours of chosen
    objects whose ``color`` is None."""
    objects = confident(detections, meta["tag"])
    correct, reasons = True, []
    matched: list[list[Detection] | None] = []  # per include: its objects, or None when the clause failed
    for req in meta["include"]:
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and req.get("color") is not None:
            named = _colors_of(name, found, colors)
            ok = named.count(req["color"]) >= count
            if not ok:
                reasons.append(f"expected {req['color']} {name}>={count}, found {', '.join(named)}")
        if ok and req.get("position") is not None:
            relation, target = req["position"]
            group = matched[target]
            ok = group is not None and all(
                relation in relative_position(d.box, t.box) for d in found for t in group
            )
            if not ok:
                reasons.append(
                    f"expected {name} {relation} target" + (", target missing" if group is None else "")
                )
        correct &= ok
        matched.append(found if ok else None)
    for req in meta.get("exclude") or []:
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reasons)


def evaluate_image(
    detections: Mapping[str, Sequence[Detection]], meta: Mapping, colors: ColorFn | None = None
) -> bool:
    """GenEval's ``correct`` for one image (``judge`` without the reason)."""
    return judge(detections, meta, colors)[0]


# --------------------------------------------------------------------------- summary


def tag_sums(metadata: Sequence[Mapping], correct: Sequence[bool]) -> dict[str, tuple[float, float]]:
    """Per tag: (correct images, images), the accumulator the metric protocol all-reduces."""
    sums: dict[str, tuple[float, float]] = {}
    for m, c in zip(metadata, correct, strict=True):
        s, n = sums.get(m["tag"], (0.0, 0.0))
        sums[m["tag"]] = (s + float(c), n + 1.0)
    return sums


def summarize_sums(sums: Mapping[str, tuple[float, float]], prefix: str = "geneval") -> dict[str, float]:
    """(correct, images) per tag -> accuracy per tag present (GenEval's tag order first), ``overall`` = the
    mean of the tag accuracies (official GenEval) and ``per_image`` = correct / images over all tags (the
    reference's number); both NaN without images."""
    present = sorted(
        (t for t, (_, n) in sums.items() if n > 0), key=lambda t: TAGS.index(t) if t in TAGS else len(TAGS)
    )
    out = {f"{prefix}/{t}": sums[t][0] / sums[t][1] for t in present}
    total = sum(n for _, n in sums.values())
    out[f"{prefix}/overall"] = float(np.mean(list(out.values()))) if out else float("nan")
    out[f"{prefix}/per_image"] = sum(s for s, _ in sums.values()) / total if total else float("nan")
    return out


def summarize(
    metadata: Sequence[Mapping], correct: Sequence[bool], prefix: str = "geneval"
) -> dict[str, float]:
    """``summarize_sums`` over per-image verdicts, plus ``correct_prompts`` (prompts with at least one correct
    image / prompts) when every row carries its ``prompt``."""
    out = summarize_sums(tag_sums(metadata, correct), prefix)
    if metadata and all("prompt" in m for m in metadata):
        any_correct: dict[str, bool] = {}
        for m, c in zip(metadata, correct, strict=True):
            any_correct[m["prompt"]] = any_correct.get(m["prompt"], False) or bool(c)
        out[f"{prefix}/correct_prompts"] = float(np.mean(list(any_correct.values())))
    return out


def render_table(summary: Mapping[str, float]) -> str:
    """One ``name  value`` line per entry, names without their prefix."""
    rows = [(k.rsplit("/", 1)[-1], v) for k, v in summary.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {v:6.3f}" for name, v in rows)


# --------------------------------------------------------------------------- backends


class Detector(Protocol):
    def __call__(self, images: Tensor) -> list[dict[str, list[Detection]]]:
        """uint8 (B, 3, H, W) -> per image, GenEval class name -> detections (with boxes, and masks when the
        colour classifier needs them). The rules apply the thresholds; colours may be left None."""
        ...


class ColorClassifier(Protocol):
    def __call__(self, image: np.ndarray, class_name: str, objects: Sequence[Detection]) -> list[str]:
        """uint8 (H, W, 3) image, the class, its chosen objects -> one colour name per object."""
        ...


def coco_labels(id2label: Mapping[int, str], source: str) -> list[str | None]:
    """A detector's label ids -> GenEval class names (None: not a GenEval class, dropped)."""
    names = [HF_LABEL_NAMES.get(id2label[i], id2label[i]) for i in range(len(id2label))]
    labels = [n if n in COCO_CLASSES else None for n in names]
    if not any(labels):
        raise UserError(
            f"GenEval: the detector '{source}' has no COCO class among its labels ({', '.join(names[:4])}...);"
            f" use a COCO instance-segmentation checkpoint such as {DEFAULT_DETECTOR_MODEL}"
        )
    return labels


def mask_box(mask: np.ndarray) -> Box:
    """The extent of a non-empty bool mask: (first x, first y, last x, last y), last pixels included."""
    xs, ys = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return float(xs[0]), float(ys[0]), float(xs[-1]), float(ys[-1])


def instances(
    class_logits: Tensor,
    mask_logits: Tensor,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    labels: Sequence[str | None],
    min_score: float = THRESHOLD,
) -> dict[str, list[Detection]]:
    """One image's Mask2Former outputs -> detections per GenEval class, most confident first. ``class_logits``
    (Q, C+1), the last column no-object; ``mask_logits`` (Q, h, w); ``input_size`` the processed image's
    (H, W) and ``image_size`` the original's."""
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    probs = class_logits.float().softmax(-1)[:, :-1]
    top, flat = probs.flatten().topk(num_queries)
    # a score is a class probability times a mean mask probability <= 1: pairs below min_score cannot pass,
    # so their masks are never resized
    keep = top >= min_score
    if not keep.any():
        return {}
    top, query, label = top[keep], flat[keep] // num_classes, flat[keep] % num_classes
    logits = torch.nn.functional.interpolate(
        mask_logits[query][None].float(), size=tuple(input_size), mode="bilinear", align_corners=False
    )[0]
    binary = logits > 0
    mask_score = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    masks = (
        torch.nn.functional.interpolate(binary[None].float(), size=tuple(image_size), mode="nearest")[0] > 0
    )
    found: dict[str, list[Detection]] = {}
    for score, lab, mask in zip(
        (top * mask_score).tolist(), label.tolist(), masks.cpu().numpy(), strict=True
    ):
        name = labels[lab]
        if name is None or score < min_score or not mask.any():
            continue
        found.setdefault(name, []).append(Detection(name, round(score, 6), mask_box(mask), mask=mask))
    return {c: sorted(ds, key=lambda d: -d.score) for c, ds in found.items()}


class Mask2FormerDetector:
    """HF Mask2Former instance segmentation as the reference runs it (see the module docstring)."""

    def __init__(
        self,
        source: str = DEFAULT_DETECTOR_MODEL,
        device: torch.device | str = "cpu",
        resize: tuple[int, int] = DETECTOR_RESIZE,
        min_score: float = THRESHOLD,
    ):
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        local = "detector=/local/copy"
        model = load_pretrained(Mask2FormerForUniversalSegmentation.from_pretrained, source, "GenEval detector", local=local)
        self.processor = load_pretrained(Mask2FormerImageProcessor.from_pretrained, source, "GenEval detector", local=local)
        self.labels = coco_labels(model.config.id2label, source)
        self.device, self.min_score = torch.device(device), min_score
        self.size = {"shortest_edge": resize[0], "longest_edge": resize[1]}
        self.model = model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[dict[str, list[Detection]]]:
        out = []
        for chunk in images.split(DETECTOR_BATCH):
            arrays = list(chunk.permute(0, 2, 3, 1).cpu().numpy())
            inputs = self.processor(
                images=arrays, size=self.size, return_tensors="pt", input_data_format="channels_last"
            ).to(self.device)
            pred = self.model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
            input_size = tuple(inputs["pixel_values"].shape[-2:])  # one image size per batch: never padded
            out += [
                instances(c, m, input_size, tuple(chunk.shape[-2:]), self.labels, self.min_score)
                for c, m in zip(pred.class_queries_logits, pred.masks_queries_logits, strict=True)
            ]
        return out


def object_crop(image: np.ndarray, obj: Detection):
    """The colour classifier's view of an object: its mask composited on #999999 grey (the whole image when
    it has no mask), cropped to its box by PIL (end exclusive, as the reference hands its boxes to PIL)."""
    from PIL import Image

    rgb = Image.fromarray(image)
    if obj.mask is not None:
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size, GREY), Image.fromarray(obj.mask))
    return rgb.crop(obj.box)


class ClipColorClassifier:
    """CLIP zero-shot colour naming, as the reference (see the module docstring)."""

    def __init__(
        self,
        source: str = DEFAULT_CLIP_MODEL,
        device: torch.device | str = "cpu",
        colors: Sequence[str] = COLORS,
    ):
        from transformers import CLIPModel, CLIPProcessor

        local = "color_classifier=/local/copy"
        model = load_pretrained(CLIPModel.from_pretrained, source, "GenEval colour classifier", local=local)
        # the reference's slow (PIL) processor
        self.processor = load_pretrained(CLIPProcessor.from_pretrained, source, "GenEval colour classifier", local=local, backend="pil")
        self.device, self.colors = torch.device(device), tuple(colors)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._weights: dict[str, Tensor] = {}  # class name -> (D, colours), built on first use

    @torch.no_grad()
    def text_weights(self, class_name: str) -> Tensor:
        """(D, colours): per colour, the normalised mean of its normalised template embeddings."""
        if class_name not in self._weights:
            columns = []
            for c in self.colors:
                texts = [t.format(c=c, cls=class_name) for t in COLOR_TEMPLATES]
                tokens = self.processor(text=texts, return_tensors="pt", padding=True).to(self.device)
                emb = _unit(self.model.get_text_features(**tokens).pooler_output)
                columns.append(_unit(emb.mean(dim=0)))
            self._weights[class_name] = torch.stack(columns, dim=1)
        return self._weights[class_name]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, class_name: str, objects: Sequence[Detection]) -> list[str]:
        crops = [object_crop(image, o) for o in objects]
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        feats = _unit(self.model.get_image_features(pixel_values=pixels).pooler_output)
        # CLIP's logit scale multiplies every logit alike: the argmax does not need it
        return [self.colors[i] for i in (feats @ self.text_weights(class_name)).argmax(dim=1).tolist()]


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# --------------------------------------------------------------------------- the metric


class GenEvalMetric:
    """GenEval under the text-to-image metric protocol: ``score`` gives each image 1.0 / 0.0 under its tag,
    ``summarize`` turns the all-reduced (sum, count) per tag into the reported numbers."""

    name = "geneval"
    keys = TAGS

    def __init__(
        self,
        device: torch.device | str,
        detector: Detector | str = DEFAULT_DETECTOR_MODEL,
        color_classifier: ColorClassifier | str = DEFAULT_CLIP_MODEL,
        metadata: str | None = None,
    ):
        """``detector`` / ``color_classifier``: a hub id or local directory of the HF model, or a backend.
        ``metadata``: GenEval's ``evaluation_metadata.jsonl``, for prompt sets whose rows carry only the prompt
        (the reference looks metadata up by exact prompt string, as this does)."""
        self.by_prompt = _metadata_by_prompt(metadata) if metadata else {}
        self.detector = Mask2FormerDetector(detector, device) if isinstance(detector, str) else detector
        self.colors = (
            ClipColorClassifier(color_classifier, device)
            if isinstance(color_classifier, str)
            else color_classifier
        )

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> list[dict[str, float]]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise UserError(
                f"GenEval: images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if not len(images) == len(prompts) == len(metadata):
            raise UserError(
                f"GenEval: {len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata rows; "
                f"pass one prompt and one row per image"
            )
        rows = [
            parse_metadata(self._row(p, m), f"GenEval metadata of prompt {p!r}")
            for p, m in zip(prompts, metadata, strict=True)
        ]
        found = self.detector(images)
        pixels = images.permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for image, dets, row in zip(pixels, found, rows, strict=True):
            ok = evaluate_image(dets, row, lambda name, objs, image=image: self.colors(image, name, objs))
            out.append({row["tag"]: float(ok)})
        return out

    def _row(self, prompt: str, meta: dict) -> dict:
        if "tag" in meta and "include" in meta:
            return meta
        if prompt in self.by_prompt:
            return self.by_prompt[prompt]
        raise UserError(
            f"GenEval: prompt {prompt!r} has no GenEval metadata (tag, include); point "
            f"eval.datasets.<set>.options.geneval.metadata at GenEval's evaluation_metadata.jsonl"
        )

    def summarize(self, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        return summarize_sums(sums, self.name)


def _metadata_by_prompt(path: str) -> dict[str, dict]:
    """prompt -> metadata row of a GenEval ``evaluation_metadata.jsonl`` (553 rows, unique prompts)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"GenEval metadata '{path}' not found; fetch GenEval's prompts/evaluation_metadata.jsonl")
    rows: dict[str, dict] = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"GenEval metadata '{path}' line {i}: not JSON ({e.msg})") from None
            rows[row.get("prompt", "")] = row
    return rows
