"""VQAScore on GenAI-Bench: how likely a VQA model answers "Yes" to a question about the prompt (spec
``evaluation.md`` §3.3, ``reference.md`` §8.4).

- Question ``Does this figure show "{prompt}"? Please answer yes or no.``, answer ``Yes`` (the strings of
  t2v_metrics' CLIP-FlanT5 model, byte for byte).
- Score of one image = exp(-mean cross-entropy) of the teacher-forced answer tokens, i.e. the geometric mean of
  their probabilities. The answer tokens are what the tokenizer makes of "Yes", with the EOS when it appends
  one: for CLIP-FlanT5 that is "▁Yes" and "</s>", so the number is not the bare P(Yes). For a chat model whose
  tokenizer appends nothing and keeps "Yes" one token (Qwen) it is P(Yes | question), which is what
  t2v_metrics' Qwen backends read off the first generated token.
- Reported: ``vqascore_<model>`` = mean over images (the reference's number; ``<model>`` names the scorer, since
  scores of different VQA models are not comparable).

Backends (``backend`` option; by default a hub id ``owner/name`` or a local directory means ``hf``, any other
name ``t2v_metrics``):

- ``t2v_metrics``: the reference's package (its fork in End2End-Diffusion/diffusionbench-evals), models
  ``clip-flant5-xl`` (the default, as the reference's bare ``vqascore``) and ``clip-flant5-xxl`` (the paper's
  ``vqascore_clip-flant5-xxl``), and its Qwen names. Needs ``pip install`` of that package (one-line error).
- ``hf``: ours, for any ``AutoModelForImageTextToText`` with a chat template (Qwen2.5-VL, Qwen3-VL ...): one
  user turn holding the image and the question, the generation prompt, then the answer tokens appended and
  scored as above. Its numbers match t2v_metrics' for the same Qwen checkpoint only up to image preprocessing.

The helpers at the end (optional packages, pretrained loading, uint8 -> PIL) are shared by the other wrappers
(dpg.py, clipscore.py).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from nanogen.errors import UserError
from nanogen.eval.t2i.common import load_pretrained, require, to_pil

QUESTION_TEMPLATE = 'Does this figure show "{}"? Please answer yes or no.'
ANSWER = "Yes"
DEFAULT_MODEL = "clip-flant5-xl"
BACKENDS = ("t2v_metrics", "hf")
T2V_INSTALL = "git+https://github.com/End2End-Diffusion/diffusionbench-evals.git#subdirectory=t2v_metrics"


def vqa_question(prompt: str) -> str:
    return QUESTION_TEMPLATE.format(prompt)


class VQAScorer(Protocol):
    """P(answer | image, question) for paired images and prompts: a float tensor (N,)."""

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Tensor: ...


# --------------------------------------------------------------------------- the reduction


def answer_score(logits: Tensor, labels: Tensor) -> Tensor:
    """exp(-mean CE) per row. ``logits`` (B, n, V): the predictions for the n answer tokens ``labels`` (B, n)."""
    ce = F.cross_entropy(logits.double().transpose(1, 2), labels, reduction="none")  # (B, n); n is a few tokens
    return torch.exp(-ce.mean(dim=1))


def answer_token_ids(tokenizer, answer: str = ANSWER) -> list[int]:
    """The answer's tokens as the tokenizer encodes it, without what it prepends (BOS) but with what it appends
    (EOS): the tokens a teacher-forced decoder has to produce."""
    plain = tokenizer(answer, add_special_tokens=False)["input_ids"]
    full = tokenizer(answer)["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    if not plain or not starts:
        raise UserError(f"the tokenizer of the VQA model cannot encode the answer {answer!r} on its own; use another model")
    return full[starts[0] :]


# --------------------------------------------------------------------------- backends


class HFVQAScorer:
    """Any Hugging Face image-text-to-text model with a chat template, scored by teacher forcing."""

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = device
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)  # t2v_metrics runs bf16
        self.processor = load_pretrained(AutoProcessor.from_pretrained, source, "vqascore processor")
        self.processor.tokenizer.padding_side = "left"  # answers go on the right, so every row ends with them
        model = load_pretrained(AutoModelForImageTextToText.from_pretrained, source, "vqascore model", dtype=dtype)
        self.model = model.to(device).eval()
        self.answer = torch.tensor(answer_token_ids(self.processor.tokenizer))

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]):
        """The processed chat prompts with the answer tokens appended (teacher forcing)."""
        chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vqa_question(p)}]}]
                 for p in prompts]
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        inputs = self.processor(text=texts, images=list(images), padding=True, return_tensors="pt")
        ids = inputs["input_ids"]
        answer = self.answer.to(ids.dtype).expand(len(ids), -1)
        for key, value in list(inputs.items()):  # every per-token tensor grows by the answer: mask 1, type ids 0 (text)
            if key != "input_ids" and value.shape == ids.shape:
                inputs[key] = torch.cat([value, torch.full_like(answer, int(key == "attention_mask"))], dim=1)
        inputs["input_ids"] = torch.cat([ids, answer], dim=1)
        return inputs

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Tensor:
        inputs = self.inputs(images, prompts).to(self.device, dtype=self.model.dtype)  # dtype: float tensors only
        n = len(self.answer)
        logits = self.model(**inputs).logits[:, -n - 1 : -1]  # position t predicts token t + 1
        return answer_score(logits, inputs["input_ids"][:, -n:]).cpu()


def t2v_metrics_scorer(model: str, device: torch.device) -> VQAScorer:
    """The reference's scorer. t2v_metrics reads images from files, so each batch goes through lossless PNGs."""
    t2v_metrics = require("t2v_metrics", f"vqascore model '{model}'", T2V_INSTALL)
    # ASSUMED CALL (the package is not installed here): VQAScore(model=..., device=...) wraps the model as
    # `.model`, whose forward(paths, texts, question_template, answer_template) scores paths[i] with texts[i]
    # (VQAScore.__call__ itself scores every image against every text).
    scorer = t2v_metrics.VQAScore(model=model, device=str(device))

    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> Tensor:
        with tempfile.TemporaryDirectory() as tmp:
            paths = [str(Path(tmp) / f"{i}.png") for i in range(len(images))]
            for image, path in zip(images, paths, strict=True):
                image.save(path)
            out = scorer.model.forward(paths, list(prompts), question_template=QUESTION_TEMPLATE, answer_template=ANSWER)
        return out.detach().float().cpu().reshape(len(images))

    return score


def backend_for(model: str) -> str:
    return "hf" if "/" in model or Path(model).expanduser().is_dir() else "t2v_metrics"


def make_scorer(model: str, backend: str, device: torch.device) -> VQAScorer:
    if backend == "hf":
        return HFVQAScorer(model, device)
    return t2v_metrics_scorer(model, device)


# --------------------------------------------------------------------------- the metric


class VQAScoreMetric:
    """The prompt-metric protocol (eval/metrics.py): per image {"score": P}; reported ``vqascore_<model>``."""

    name = "vqascore"
    keys = ("score",)

    def __init__(self, device: torch.device, model: str = DEFAULT_MODEL, backend: str | None = None,
                 batch_size: int = 8):
        backend = backend or backend_for(model)
        if backend not in BACKENDS:
            raise UserError(f"vqascore: unknown backend '{backend}'; options.vqascore.backend is one of {', '.join(BACKENDS)}")
        if batch_size < 1:
            raise UserError(f"vqascore: batch_size must be >= 1, got {batch_size}; fix options.vqascore.batch_size")
        # hub ids and directories become their last part: 'Qwen/Qwen2.5-VL-3B-Instruct' -> qwen2.5-vl-3b-instruct
        self.label = f"vqascore_{Path(model).name.lower() if backend == 'hf' else model}"
        self.batch_size = batch_size
        self.scorer = make_scorer(model, backend, device)

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> list[dict[str, float]]:
        pil = [to_pil(x) for x in images]
        out = []
        for i in range(0, len(pil), self.batch_size):
            out += self.scorer(pil[i : i + self.batch_size], prompts[i : i + self.batch_size]).tolist()
        return [{"score": float(s)} for s in out]

    def summarize(self, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        total, count = sums["score"]
        return {self.label: total / count if count else float("nan")}
