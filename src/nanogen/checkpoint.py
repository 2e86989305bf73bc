"""Checkpoints: save, find, resume, and load weights for sampling (spec ``reference.md`` §1.4).

A training checkpoint is one ``torch.save`` dict with the reference's keys (``step``, ``epoch``, ``model``,
``ema``, ``optimizer``, ``scheduler``) plus what an exact resume needs: the data position (``loader``),
every RNG state (``rng``) and the resolved config (``config``). Files are written to a temporary name and
renamed, so a crash mid-save never leaves a truncated checkpoint behind. Only the newest ``keep``
checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nanogen.errors import CheckpointError

CKPT_RE = re.compile(r"step-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (keep <= 0: delete none)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(ckpt_dir)[:-keep]:
        p.unlink(missing_ok=True)


def read(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: '{path}'; pass a .pt file written by nanogen or the reference")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and why, without a traceback
        raise CheckpointError(f"cannot read checkpoint '{path}': {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, expected a dict")
    return obj


def _strip(sd: dict[str, Any]) -> dict[str, Any]:
    """Drop wrapper prefixes that DDP / torch.compile add (``module.``, ``_orig_mod.``)."""
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "_orig_mod."):
            while k.startswith(pre):
                k = k[len(pre) :]
        out[k] = v
    return out


def weights_from(obj: dict[str, Any], prefer: str = "ema") -> tuple[dict[str, torch.Tensor], str]:
    """The network weights in a checkpoint: its ``ema`` (or ``model``) entry, or the dict itself if raw."""
    order = [prefer, "model" if prefer == "ema" else "ema"]
    for key in order:
        if key in obj and isinstance(obj[key], dict):
            return _strip(obj[key]), key
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _strip(obj), "state_dict"
    raise CheckpointError(f"checkpoint has no 'ema' or 'model' entry and is not a state dict (keys: {', '.join(list(obj)[:8])})")


def load_weights(net: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one clear message naming missing, unexpected and mis-shaped keys."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (checkpoint vs model)", shaped)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise CheckpointError(f"{source} does not match the model built from the config; " + "; ".join(parts))
    net.load_state_dict(sd)
