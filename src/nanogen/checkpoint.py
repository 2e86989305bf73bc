"""Checkpoints: save, find, resume, and load weights for sampling (spec ``reference.md`` §1.4).

Released DiffusionBench checkpoints (``reference-params.md``) load directly: their parameter names are
nanogen's, and the only extra entries, the RoPE tables ``enc_rope.freqs_cos/sin`` / ``dec_rope.freqs_*`` that
the reference saves as buffers, are checked against the token layout and dropped, because nanogen rebuilds
them from the layout (``nanogen.models.layers.Rope2D``). ``convert`` writes such a checkpoint (or a raw state
dict, or a ``.safetensors`` file) as a nanogen checkpoint.

A training checkpoint is one ``torch.save`` dict with the reference's keys (``step``, ``epoch``, ``model``,
``ema``, ``optimizer``, ``scheduler``) plus what an exact resume needs: the data position (``loader``) and
the split it was counted in (``data_layout``), and the resolved config (``config``). No RNG state is needed:
the training noise is seeded per (step, sample slot) (``train.slot_seed``). The optimizer state is keyed by
parameter name, so the file resumes under one process, DDP or FSDP2. Files are written to a temporary name and
renamed, so a crash mid-save never leaves a truncated checkpoint behind; a damaged one (another filesystem,
a full disk) is skipped on resume. Retention keeps the newest ``keep`` plus milestones.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanogen.errors import CheckpointError

CKPT_RE = re.compile(r"step-(\d+)\.pt$")


def save(path: Path, payload: Any) -> Path:
    """torch.save, atomically (a temp file renamed into place)."""
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


def prune(ckpt_dir: Path, keep: int, keep_every: int | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints (keep <= 0: delete none), except those whose step is a
    multiple of ``keep_every`` (milestones kept for the whole run)."""
    if keep <= 0:
        return
    for step, p in list_checkpoints(ckpt_dir)[:-keep]:
        if not (keep_every and step % keep_every == 0):
            p.unlink(missing_ok=True)


def newest_readable(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, and its contents. A truncated or corrupt newer file (a crash while
    writing on a filesystem without atomic rename, a full disk, bit rot) is skipped with a warning naming it,
    and the one before is used; None when there is no checkpoint at all."""
    found = list_checkpoints(ckpt_dir)
    for _, path in reversed(found):
        try:
            state = read(path)
            if not {"step", "model", "optimizer"} <= set(state):
                raise CheckpointError(f"'{path}' lacks step / model / optimizer")
            return path, state
        except CheckpointError as e:
            warnings.warn(f"skipping unreadable checkpoint {path.name} ({e}); trying the one before", stacklevel=2)
    if found:
        raise CheckpointError(f"no readable checkpoint in '{ckpt_dir}' ({len(found)} found, all damaged); move them away to start over")
    return None


# What a run *is*: resuming a run directory with a config that differs here would silently train another model
# (or on other data) from the saved weights. Paths, worker counts, schedules, logging, eval and max_steps may change.
RUN_IDENTITY = ("task", "stage_1", "stage_2", "conditioning", "transport", "repa", "perceptual_loss", "misc.latent_size",
                "misc.num_classes", "dataset.target", "dataset.type", "dataset.condition_type")  # fmt: skip
MAY_CHANGE = ("conditioning.text_encoder.cache_dir",)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved_yaml: str, cfg: Any) -> list[str]:
    """'key: saved -> now' for every RUN_IDENTITY leaf that differs between a checkpoint's config and ``cfg``."""
    import yaml

    from nanogen.config.loader import to_dict

    old, new = _leaves(yaml.safe_load(saved_yaml) or {}), _leaves(to_dict(cfg))
    keys = sorted(
        k for k in set(old) | set(new)
        if any(k == p or k.startswith(p + ".") for p in RUN_IDENTITY) and k not in MAY_CHANGE and old.get(k) != new.get(k)
    )  # fmt: skip
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def refuse_other_config(state: dict[str, Any] | None, cfg: Any, run_dir: Path, accept: bool = False) -> None:
    """Resuming ``run_dir`` with another config would silently train another model: one line naming the fields,
    unless ``accept`` (``--resume``), which continues with the new settings after a warning that names them."""
    from nanogen.errors import UserError

    diffs = config_differences(state["config"], cfg) if state is not None and state.get("config") else []
    shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    if diffs and accept:
        warnings.warn(f"--resume: continuing '{run_dir}' with a changed config ({shown})", stacklevel=2)
    elif diffs:
        raise UserError(
            f"'{run_dir}' holds a run of another config ({shown}); use another run.name, pass --resume to continue "
            f"it with the new settings, or --overwrite to move the old run aside and start over"
        )


def resume_point(run_dir: Path, cfg: Any, accept_changes: bool = False) -> tuple[Path | None, dict[str, Any] | None]:
    """Where a training run continues (shared by the stage-1 and stage-2 loops): the newest readable checkpoint
    of ``run_dir`` and its contents, or (None, None) for a fresh run. Refuses a directory that holds checkpoints
    when ``run.resume`` is false, and one of another config unless ``accept_changes`` (``--resume``)."""
    from nanogen.errors import UserError

    ckpt_dir = run_dir / "checkpoints"
    if not cfg.run.resume:
        existing = latest(ckpt_dir)
        if existing is not None:
            raise UserError(
                f"run.resume=false but '{run_dir}' already holds checkpoints (newest: {existing.name}); choose a new "
                f"run.name, drop run.resume=false to continue that run, or pass --overwrite to move it aside"
            )
        return None, None
    found = newest_readable(ckpt_dir)  # skips a damaged newest file with a warning
    if found is None:
        return None, None
    refuse_other_config(found[1], cfg, run_dir, accept_changes)
    return found


def move_aside(run_dir: Path) -> Path:
    """--overwrite: the old run is renamed, never deleted (a mistyped run name must not cost a week)."""
    dest = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(dest)
    return dest


ROPE_KEY_RE = re.compile(r"^(?:(?P<mod>[\w.]*rope)\.)freqs_(?:cos|sin)$")


def read(path: str | Path) -> dict[str, Any]:
    """A checkpoint file as a dict: torch.save files (nanogen's or the reference's) or .safetensors state dicts."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(
            f"checkpoint not found: '{path}'; pass a .pt file written by nanogen or the reference"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and why, without a traceback
        raise CheckpointError(
            f"cannot read checkpoint '{path}': {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
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
    raise CheckpointError(
        f"checkpoint has no 'ema' or 'model' entry and is not a state dict (keys: {', '.join(list(obj)[:8])})"
    )


def drop_rope_tables(net: nn.Module, sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Remove the reference's saved RoPE tables after checking they fit the model's token layout.

    A table of another length means the checkpoint was trained with another token layout (REG token, MeanFlow
    tokens, number of class/text tokens, grid size): that is an error, named, not something to paper over.
    """
    modules = dict(net.named_modules())
    out = {}
    for k, v in sd.items():
        m = ROPE_KEY_RE.match(k)
        if m is None:
            out[k] = v
            continue
        rope = modules.get(m.group("mod"))
        if rope is None or not hasattr(rope, "cos"):
            out[k] = v  # not a RoPE of this model: leave it for the unexpected-key report
            continue
        if tuple(v.shape) != tuple(rope.cos.shape):
            raise CheckpointError(
                f"{source}: {k} is {list(v.shape)} but the model built from the config lays out {list(rope.cos.shape)} "
                f"([tokens, head_dim]); the checkpoint was trained with another token layout (REG / MeanFlow / "
                f"condition tokens, grid or heads) - use the config it was trained with"
            )
    return out


def load_weights(net: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one clear message naming missing, unexpected and mis-shaped keys."""
    sd = drop_rope_tables(net, sd, source)
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shaped:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped (checkpoint vs model)", shaped),
        ):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        ctx = "ctx_embedder.norm.weight"
        if ctx in sd and ctx in own and sd[ctx].shape != own[ctx].shape:  # the text-encoder width, in plain words
            parts.append(
                f"the checkpoint was trained with a text encoder of width {sd[ctx].shape[0]}, the config's has "
                f"{own[ctx].shape[0]} (conditioning.text_encoder / conditioning.context_dim): use the checkpoint's encoder"
            )
        raise CheckpointError(f"{source} does not match the model built from the config; " + "; ".join(parts))
    net.load_state_dict(sd)


def convert(
    src: str | Path, dst: str | Path, net: nn.Module, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read a reference (or raw / safetensors) checkpoint, check it strictly against ``net`` and write it as a
    nanogen checkpoint (``model`` and ``ema`` entries, plus step and config). A ``.safetensors`` destination
    gets the EMA weights (or the only weights) as a flat state dict. Returns a summary."""
    obj = read(src)
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key in ("model", "ema"):
        if isinstance(obj.get(key), dict):
            entries[key] = _strip(obj[key])
    if not entries:
        entries["ema"] = weights_from(obj)[0]
    for key, sd in entries.items():
        sd = drop_rope_tables(net, sd, f"checkpoint '{src}' ({key})")
        load_weights(net, sd, f"checkpoint '{src}' ({key})")  # strict: raises on any mismatch
        entries[key] = {k: v.contiguous() for k, v in sd.items()}
    dst = Path(dst).expanduser()
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file(entries.get("ema", entries.get("model")), str(dst))
    else:
        payload: dict[str, Any] = {"step": int(obj.get("step", 0) or 0), "epoch": obj.get("epoch"), **entries}
        payload["config"] = config
        payload["converted_from"] = str(src)
        save(dst, payload)
    return {"entries": sorted(entries), "tensors": len(next(iter(entries.values()))), "step": obj.get("step")}
