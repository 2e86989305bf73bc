"""Benchmark results from three sources, as one list of ``Result`` records.

1. **Results stores** (JSONL; ``nanogen bench --suite nano`` writes them). One JSON object per line::

       {"method": "pixel-xpred", "axis": "imagenet", "guidance": true, "seed": 0,
        "metrics": {"fid": 41.2, "is": 3.1}, "category": "pixel-space", "meta": {"steps": 2000}}

   - ``method`` (required): a non-empty string, the leaderboard row.
   - ``axis`` (required): ``"imagenet"`` (class-conditional generation, the nano digits included) or ``"t2i"``.
   - ``guidance``: ``true`` / ``false``, or the classifier-free guidance scale (a number: above 1 means with
     CFG, 1 or less without); ``null`` or absent: not stated (such a value fills either guidance setting, and
     tables mark it).
   - ``seed``: an integer or ``null``. Values of different seeds are averaged; for one (method, axis,
     guidance, seed) the record with the highest ``meta.step`` (else the last one read) wins.
   - ``metrics``: ``{name: number | null}``; ``null``, NaN or a missing name is a gap, never an error.
     Names: ``fid``, ``is``, ``fdr_<space>``, ``mind_<space>``, ``fdr6`` (ImageNet axis; spaces inception,
     convnext, dinov2, mae, siglip, clip) and ``geneval``, ``dpgbench``, ``genaibench``, ``nano_geneval``,
     ``vqascore``, ``clipscore`` (T2I axis, as fractions like the paper); other names are kept as given.
   - ``category`` (optional): ``latent-space``, ``pixel-space``, ``one-few-step`` or ``reference``;
     ``family`` (optional): ``improved-latent`` or ``traditional-latent``. Without them both are inferred from
     the method name (``infer_category``). ``meta`` (optional): anything else, shown in the JSON output.

2. **Eval records** of ``nanogen eval`` / online evaluation (``eval/evaluate.py``): ``<run>_<ema|model>.csv``
   and the ``results.jsonl`` beside them. Columns ``step, config, weights, cfg_scale, cfg_interval,
   sampler_steps`` and one column per ``<metric>_<set>[/<part>]``. The method is the ``config`` name
   (``[model]`` appended for raw, non-EMA weights), guidance is ``cfg_scale > 1``, the newest step counts,
   rows of one step are merged. Metric columns are renamed to the names above (``fid@jit_imagenet`` ->
   ``fid``, ``fdr_dinov2_cls_x`` -> ``fdr_dinov2``, ``geneval_geneval/overall`` -> ``geneval``); DPG-Bench
   percentages become fractions; per-category parts, standard deviations and bookkeeping are left out.

3. **The paper's own tables** (``paper_results.json``, transcribed from the DiffusionBench paper with source
   line numbers): ImageNet with and without CFG, T2I (guidance not stated), categories as the paper groups
   them. T2I rows trained for 200K iterations are named ``<method> @200K``.

A malformed line (not JSON, a missing method, an unknown axis, a metric that is not a number) warns with
``file:line`` and is skipped.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from nanogen.errors import UserError

AXES = ("imagenet", "t2i")
AXIS_LABEL = {"imagenet": "ImageNet", "t2i": "Text-to-image"}
MODES = ("with", "without")
CATEGORIES = ("latent-space", "pixel-space", "one-few-step", "reference")
FAMILIES = ("improved-latent", "traditional-latent")
CATEGORY_LABEL = {
    "latent-space": "latent",
    "pixel-space": "pixel",
    "one-few-step": "one-/few-step",
    "reference": "public model",
    None: "–",
}
PAPER_FILE = Path(__file__).with_name("paper_results.json")
SPACES = ("inception", "convnext", "dinov2", "mae", "siglip", "clip")


@dataclass(frozen=True)
class MetricInfo:
    label: str
    better: str  # "lower" | "higher"
    decimals: int | None = None  # None: 4 significant digits

    @property
    def arrow(self) -> str:
        return "↓" if self.better == "lower" else "↑"


_SPACE_LABEL = {"inception": "Inception", "convnext": "ConvNeXt", "dinov2": "DINOv2", "mae": "MAE",
                "siglip": "SigLIP", "clip": "CLIP"}  # fmt: skip
METRICS: dict[str, MetricInfo] = {
    "fid": MetricInfo("FID", "lower", 2),
    "is": MetricInfo("IS", "higher", 1),
    **{f"fdr_{s}": MetricInfo(f"FDr {lab}", "lower", 2) for s, lab in _SPACE_LABEL.items()},
    **{f"mind_{s}": MetricInfo(f"MIND {lab}", "lower", 2) for s, lab in _SPACE_LABEL.items()},
    "fdr6": MetricInfo("FDr6", "lower", 2),
    "geneval": MetricInfo("GenEval", "higher", 3),
    "dpgbench": MetricInfo("DPG-Bench", "higher", 3),
    "genaibench": MetricInfo("GenAIBench", "higher", 3),
    "nano_geneval": MetricInfo("nano GenEval", "higher", 3),
    "vqascore": MetricInfo("VQAScore", "higher", 3),
    "clipscore": MetricInfo("CLIPScore", "higher", 3),
}
_LOWER_PREFIXES = ("fid", "fd", "mind", "rfid", "lpips", "loss")


def metric_info(name: str) -> MetricInfo:
    """Label, direction and precision of a metric; unknown names: lower-better when they look like a distance."""
    if name in METRICS:
        return METRICS[name]
    return MetricInfo(name, "lower" if name.lower().startswith(_LOWER_PREFIXES) else "higher")


def metric_order(names: Iterable[str]) -> list[str]:
    """The known metrics in the paper's column order, then the others alphabetically."""
    known = list(METRICS)
    names = set(names)
    return [m for m in known if m in names] + sorted(names - set(known))


@dataclass
class Result:
    """One evaluation of one method on one axis."""

    method: str
    axis: str  # "imagenet" | "t2i"
    guidance: bool | None  # with CFG, without, or not stated
    metrics: dict[str, float | None]
    seed: int | None = None
    cfg_scale: float | None = None
    category: str | None = None
    family: str | None = None
    source: str = ""  # "file:line" or "paper:line"
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ categories


def infer_category(method: str) -> tuple[str | None, str | None]:
    """(category, family) of a method from its name: the paper's methods by their table, else by keywords
    (meanflow -> one-few-step; pixel, jit, pixnerd, pixelgen -> pixel-space; rae, vae, latent, dino, siglip,
    pe-l -> latent-space, "improved" for RAE/REPA-E/FLUX.2-style names). Unknown: (None, None)."""
    paper = _paper_categories()
    base = method.split(" @")[0]
    if base in paper:
        return paper[base]
    n = method.lower()
    if "meanflow" in n or "mean-flow" in n or "mean_flow" in n:
        return "one-few-step", None
    if any(k in n for k in ("pixel", "pixnerd", "jit")):
        return "pixel-space", None
    if any(k in n for k in ("rae", "dino", "siglip", "pe-l", "e2e", "repa-e", "flux.2", "flux2")):
        return "latent-space", "improved-latent"
    if any(k in n for k in ("vae", "latent")):
        return "latent-space", "traditional-latent"
    return None, None


@cache
def _paper_categories() -> dict[str, tuple[str | None, str | None]]:
    doc = paper_table()
    out: dict[str, tuple[str | None, str | None]] = {}
    for row in doc["imagenet"]["methods"] + doc["t2i"]["methods"]:
        out.setdefault(row["method"], (row["category"], row.get("family")))
    return out


# ------------------------------------------------------------------------------------------------ the paper


@cache
def paper_table() -> dict[str, Any]:
    """The bundled transcription of the paper's tables (see the file's ``notes``)."""
    return json.loads(PAPER_FILE.read_text(encoding="utf-8"))


def paper_method_name(row: dict[str, Any], default_iters: int) -> str:
    iters = row.get("iters")
    return row["method"] if iters in (None, default_iters) else f"{row['method']} @{iters // 1000}K"


def load_paper() -> list[Result]:
    """The paper's ImageNet (with and without CFG) and T2I (guidance not stated) results."""
    doc = paper_table()
    out = []
    for row in doc["imagenet"]["methods"]:
        meta = {"epochs": doc["imagenet"]["epochs"], **({"nfe": row["nfe"]} if "nfe" in row else {})}
        for key, guided in (("with_cfg", True), ("without_cfg", False)):
            out.append(Result(row["method"], "imagenet", guided, dict(row[key]), category=row["category"],
                              family=row.get("family"), source=f"paper:{row['line']}", meta=dict(meta)))  # fmt: skip
    default_iters = doc["t2i"]["default_iters"]
    for row in doc["t2i"]["methods"]:
        meta = {k: row[k] for k in ("iters", "params", "nfe") if k in row}
        out.append(Result(paper_method_name(row, default_iters), "t2i", None, dict(row["metrics"]),
                          category=row["category"], family=row.get("family"), source=f"paper:{row['line']}",
                          meta=meta))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ parsing


class Malformed(ValueError):
    """A record that cannot be read; the message says why."""


def parse_guidance(value: Any) -> tuple[bool | None, float | None]:
    """``true``/``false``/scale/``null`` -> (with CFG?, scale)."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        return value, None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value) > 1.0, float(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("with", "true", "yes", "cfg"):
            return True, None
        if low in ("without", "false", "no", "none"):
            return False, None
        try:
            return parse_guidance(float(low))
        except ValueError:
            pass
    raise Malformed(f"guidance must be true/false, a CFG scale or null, not {value!r}")


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Malformed(f"{what} must be a number or null, not {value!r}")
    return float(value) if math.isfinite(value) else None


def parse_record(obj: Any) -> Result:
    """One results-store object (the schema in the module docstring) -> Result."""
    if not isinstance(obj, dict):
        raise Malformed(f"expected a JSON object, got {type(obj).__name__}")
    method = obj.get("method")
    if not isinstance(method, str) or not method.strip():
        raise Malformed("'method' must be a non-empty string")
    axis = obj.get("axis")
    if axis not in AXES:
        raise Malformed(f"'axis' must be one of {', '.join(AXES)}, not {axis!r}")
    guided, scale = parse_guidance(obj.get("guidance"))
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise Malformed(f"'seed' must be an integer or null, not {seed!r}")
    metrics = obj.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise Malformed("'metrics' must be an object {name: value}")
    values = {str(k): _number(v, f"metric {k!r}") for k, v in metrics.items()}
    category, family = obj.get("category"), obj.get("family")
    if category is not None and category not in CATEGORIES:
        raise Malformed(f"'category' must be one of {', '.join(CATEGORIES)}, not {category!r}")
    if family is not None and family not in FAMILIES:
        raise Malformed(f"'family' must be one of {', '.join(FAMILIES)}, not {family!r}")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise Malformed("'meta' must be an object")
    return Result(method.strip(), axis, guided, values, seed=seed, cfg_scale=scale, category=category,
                  family=family, meta=dict(meta))  # fmt: skip


T2I_HEADS = ("nano_geneval", "geneval", "dpgbench", "vqascore", "clipscore")
IMAGENET_HEADS = ("fid", "inception_score", "fdr", "fd_", "mind_", "precision", "recall")
EVAL_BOOKKEEPING = ("step", "config", "weights", "cfg_scale", "cfg_interval", "sampler_steps", "time")


def eval_metric(key: str, sets: Iterable[str]) -> tuple[str, str, float] | None:
    """An eval column ``<metric>_<set>[/<part>]`` -> (axis, leaderboard name, scale), or None to leave it out."""
    head, _, part = key.partition("/")
    if part and part != "overall":
        return None
    label = None
    for s in sorted(sets, key=len, reverse=True):
        if head.endswith(f"_{s}"):
            label, set_name = head[: -len(s) - 1], s
            break
    if label is None:  # files without num_samples_<set> columns: the set is the last _-separated word
        label, _, set_name = head.rpartition("_")
    if not label or label.startswith(("num_samples", "seconds", "inception_score_std")):
        return None
    name = label.split("@")[0]  # fid@jit -> fid, inception_score@adm -> inception_score
    if name.startswith(T2I_HEADS):
        if name.startswith("vqascore"):
            return "t2i", ("genaibench" if "genai" in set_name.lower() else "vqascore"), 1.0
        if name.startswith("dpgbench"):
            return "t2i", "dpgbench", 0.01  # nanogen writes percent; the paper prints fractions
        if name.startswith("clipscore"):
            return "t2i", "clipscore", 1.0
        return "t2i", name, 1.0
    if name.startswith(IMAGENET_HEADS):
        if name == "inception_score":
            return "imagenet", "is", 1.0
        if name.endswith("_cls"):
            name = name[: -len("_cls")]
        return "imagenet", name, 1.0
    return None


def eval_results(row: dict[str, Any]) -> list[Result]:
    """One eval record (a CSV row or a ``results.jsonl`` line) -> one Result per axis it has metrics for."""
    config = row.get("config")
    if not isinstance(config, str) or not config:
        raise Malformed("no 'config' (the run's name)")
    try:
        step = int(float(row["step"]))
    except (KeyError, TypeError, ValueError):
        raise Malformed(f"'step' must be an integer, not {row.get('step')!r}") from None
    scale_raw = row.get("cfg_scale")
    guided, scale = (None, None) if scale_raw in (None, "") else parse_guidance(_to_float(scale_raw, "cfg_scale"))
    weights = row.get("weights") or "ema"
    method = config if weights == "ema" else f"{config} [{weights}]"
    sets = [k[len("num_samples_") :] for k in row if k.startswith("num_samples_")]
    by_axis: dict[str, dict[str, float | None]] = {}
    for key, raw in row.items():
        if key in EVAL_BOOKKEEPING or key is None:
            continue
        found = eval_metric(key, sets)
        if found is None:
            continue
        axis, name, factor = found
        value = None if raw in (None, "") else _to_float(raw, f"column {key!r}")
        values = by_axis.setdefault(axis, {})
        if value is not None and math.isfinite(value):
            values[name] = value * factor
        else:  # an empty column (another metric's row, or fid next to fid@jit) leaves a value already read
            values.setdefault(name, None)
    meta = {"step": step, "weights": weights}
    if row.get("sampler_steps") not in (None, ""):
        meta["sampler_steps"] = row["sampler_steps"]
    return [Result(method, axis, guided, values, cfg_scale=scale, meta=dict(meta)) for axis, values in by_axis.items()]


def _to_float(raw: Any, what: str) -> float:
    if isinstance(raw, bool):
        raise Malformed(f"{what} must be a number, not {raw!r}")
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise Malformed(f"{what} must be a number, not {raw!r}") from None


def _warn(path: Path, line: int, reason: str) -> None:
    warnings.warn(f"{path}:{line}: {reason}; line skipped", stacklevel=3)


def load_jsonl(path: Path) -> list[Result]:
    """A results store or an eval ``results.jsonl``; each line is recognised on its own."""
    out = []
    text = _read(path)
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        out += _records(path, i, lambda line=line: _parse_jsonl_line(line))
    return out


def _parse_jsonl_line(line: str) -> list[Result]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise Malformed(f"not JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and "method" not in obj and "config" in obj and "step" in obj:
        return eval_results(obj)
    return [parse_record(obj)]


def _records(path: Path, line: int, parse) -> list[Result]:
    """The results of one line, tagged with ``file:line``; a malformed line warns (naming both) and gives none."""
    try:
        records = parse()
    except Malformed as e:
        _warn(path, line, str(e))
        return []
    for r in records:
        r.source = f"{path}:{line}"
    return records


def load_eval_csv(path: Path) -> list[Result]:
    """An eval CSV ``<run>_<ema|model>.csv``."""
    out = []
    text = _read(path)
    reader = csv.DictReader(text.splitlines())
    fields = reader.fieldnames or []
    if "step" not in fields or "config" not in fields:
        raise UserError(f"{path}: not a nanogen eval CSV (its header needs the columns step and config; got "
                        f"{', '.join(fields[:6]) or 'nothing'})")  # fmt: skip
    for row in reader:
        out += _records(path, reader.line_num, lambda row=row: _parse_csv_row(row, fields))
    return out


def _parse_csv_row(row: dict, fields: list[str]) -> list[Result]:
    if None in row:
        raise Malformed(f"{len(fields) + len(row[None])} fields where the header has {len(fields)}")
    return eval_results(row)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"results file '{path}' is not UTF-8 text (expected JSONL or CSV)") from None
    except OSError as e:
        raise UserError(f"results file '{path}' cannot be read: {e.strerror}") from None


def result_files(path: Path) -> list[Path]:
    """The files to read for one command-line argument: the file itself, or under a directory every ``*.jsonl``
    except training logs (``metrics.jsonl``) and every ``*_ema.csv`` / ``*_model.csv``."""
    if not path.exists():
        raise UserError(f"results path '{path}' not found (give results files (.jsonl, .csv) or folders holding them)")
    if path.is_file():
        if path.suffix not in (".jsonl", ".json", ".csv"):
            raise UserError(f"results file '{path}': unknown kind '{path.suffix}' (expected .jsonl or .csv)")
        return [path]
    found = [p for p in sorted(path.rglob("*.jsonl")) if p.name != "metrics.jsonl"]
    found += [p for p in sorted(path.rglob("*.csv")) if p.stem.endswith(("_ema", "_model"))]
    if not found:
        warnings.warn(f"{path}: no results files in this folder (*.jsonl, *_ema.csv, *_model.csv)", stacklevel=2)
    return found


def load(paths: Iterable[str | Path] = (), paper: bool = True) -> list[Result]:
    """Every result of ``paths`` (files or folders), plus the paper's tables unless ``paper=False``."""
    out = load_paper() if paper else []
    for arg in paths:
        for f in result_files(Path(arg)):
            out += load_eval_csv(f) if f.suffix == ".csv" else load_jsonl(f)
    for r in out:
        if r.category is None and r.family is None:
            r.category, r.family = infer_category(r.method)
    return out


# ------------------------------------------------------------------------------------------------ tables


@dataclass
class Row:
    """One method on one axis in one guidance setting: the mean of its seeds' metrics."""

    method: str
    category: str | None
    family: str | None
    metrics: dict[str, float | None]
    seeds: int
    guidance_stated: bool
    sources: list[str]

    def get(self, metric: str) -> float | None:
        return self.metrics.get(metric)


def categories(results: Iterable[Result]) -> dict[str, tuple[str | None, str | None]]:
    """method -> (category, family): the first record that states one."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for r in results:
        if r.method not in out or out[r.method] == (None, None):
            out[r.method] = (r.category, r.family)
    return out


def table(results: list[Result], axis: str, mode: str) -> dict[str, Row]:
    """method -> Row for ``axis`` with (``mode="with"``) or without CFG. A method with no record of that guidance
    setting falls back to its records whose guidance is not stated (``guidance_stated=False``)."""
    if mode not in MODES:
        raise ValueError(mode)
    want = mode == "with"
    cats = categories(results)
    exact: dict[str, list[Result]] = {}
    loose: dict[str, list[Result]] = {}
    for r in results:
        if r.axis != axis:
            continue
        if r.guidance is None:
            loose.setdefault(r.method, []).append(r)
        elif r.guidance == want:
            exact.setdefault(r.method, []).append(r)
    rows = {}
    for method in dict.fromkeys([*exact, *loose]):
        recs, stated = (exact[method], True) if method in exact else (loose[method], False)
        cat, fam = cats.get(method, (None, None))
        rows[method] = Row(method, cat, fam, *_merge_seeds(recs), guidance_stated=stated,
                           sources=list(dict.fromkeys(r.source for r in recs if r.source)))  # fmt: skip
    return rows


def _merge_seeds(recs: list[Result]) -> tuple[dict[str, float | None], int]:
    """Per seed: the newest step's records merged (later values fill gaps and override); then the mean over seeds."""
    per_seed: dict[int | None, list[Result]] = {}
    for r in recs:
        per_seed.setdefault(r.seed, []).append(r)
    seed_values = []
    for group in per_seed.values():
        newest = max(_step(r) for r in group)
        merged: dict[str, float | None] = {}
        for r in group:
            if _step(r) == newest:
                for k, v in r.metrics.items():
                    if v is not None or k not in merged:
                        merged[k] = v
        seed_values.append(merged)
    names = dict.fromkeys(k for vals in seed_values for k in vals)
    out: dict[str, float | None] = {}
    for k in names:
        vals = [v[k] for v in seed_values if v.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None  # type: ignore[arg-type]
    return out, len(seed_values)


def _step(r: Result) -> float:
    step = r.meta.get("step")
    return float(step) if isinstance(step, int | float) and not isinstance(step, bool) else -1.0


def axis_metrics(results: Iterable[Result], axis: str) -> list[str]:
    """The metrics that have at least one value on ``axis``, in display order."""
    return metric_order({k for r in results if r.axis == axis for k, v in r.metrics.items() if v is not None})
