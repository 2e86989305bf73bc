"""CLIPScore: cosine similarity of CLIP's image and prompt embeddings (spec ``evaluation.md`` §3.4,
``reference.md`` §8.4).

Three scales are in use and the reported name says which one (``clipscore_<convention>``):

- ``rawcos`` (default; DiffusionBench's ``src/eval/clipscore.py``): the mean raw cosine, no x100, no clamp;
- ``torchmetrics``: 100 x cosine per image, and the MEAN clamped at 0 (``CLIPScore.compute``:
  max(score / n, 0); the per-image values are not clamped);
- ``hessel`` (Hessel et al. 2021): 2.5 x max(cosine, 0) per image, then the mean.

Model: HF ``CLIPModel`` + ``CLIPProcessor`` (default ``openai/clip-vit-large-patch14``, as the reference), the
PIL image through the processor's resize and crop, prompts truncated to the text model's 77 positions (the
reference's ``truncation=True``; ``max_length`` is passed so that a tokenizer without ``model_max_length``
truncates alike), fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import torch
from PIL import Image
from torch import Tensor

from nanogen.errors import UserError
from nanogen.eval.t2i.common import load_pretrained, to_pil

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


class Convention(StrEnum):
    RAWCOS = "rawcos"
    TORCHMETRICS = "torchmetrics"
    HESSEL = "hessel"


def per_image(cos: Tensor, convention: Convention) -> Tensor:
    """What one image adds to the sum."""
    if convention is Convention.TORCHMETRICS:
        return 100.0 * cos
    if convention is Convention.HESSEL:
        return 2.5 * cos.clamp(min=0.0)
    return cos


def reduce_mean(mean: float, convention: Convention) -> float:
    """The reported number from the mean of the per-image values."""
    return max(mean, 0.0) if convention is Convention.TORCHMETRICS else mean


def parse_convention(name: str) -> Convention:
    try:
        return Convention(name)
    except ValueError:
        choices = ", ".join(c.value for c in Convention)
        raise UserError(f"clipscore: unknown convention '{name}'; use clipscore@<convention> with one of {choices}") from None


class CLIPCosine:
    """Cosines between paired images and prompts under one CLIP model."""

    def __init__(self, source: str, device: torch.device):
        from transformers import CLIPModel, CLIPProcessor

        self.device = device
        self.processor = load_pretrained(CLIPProcessor.from_pretrained, source, "clipscore processor")
        model = load_pretrained(CLIPModel.from_pretrained, source, "clipscore model", dtype=torch.float32)
        self.model = model.to(device).eval()
        self.max_length = model.config.text_config.max_position_embeddings  # 77 for every CLIP

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Tensor:
        inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                                truncation=True, max_length=self.max_length)
        out = self.model(**inputs.to(self.device))  # image_embeds / text_embeds: projected and L2-normalised
        return (out.image_embeds * out.text_embeds).sum(dim=-1).float().cpu()


class CLIPScoreMetric:
    """The prompt-metric protocol (eval/metrics.py): per image {"score": value under the convention}."""

    name = "clipscore"
    keys = ("score",)

    def __init__(self, device: torch.device, convention: str = Convention.RAWCOS.value, model: str = DEFAULT_MODEL,
                 batch_size: int = 64):
        if batch_size < 1:
            raise UserError(f"clipscore: batch_size must be >= 1, got {batch_size}; fix options.clipscore.batch_size")
        self.convention = parse_convention(convention)
        self.batch_size = batch_size
        self.cosine = CLIPCosine(model, device)

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> list[dict[str, float]]:
        pil = [to_pil(x) for x in images]
        cos = torch.cat([self.cosine(pil[i : i + self.batch_size], prompts[i : i + self.batch_size])
                         for i in range(0, len(pil), self.batch_size)])
        return [{"score": float(v)} for v in per_image(cos, self.convention)]

    def summarize(self, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        total, count = sums["score"]
        mean = total / count if count else float("nan")
        return {f"clipscore_{self.convention.value}": reduce_mean(mean, self.convention)}
