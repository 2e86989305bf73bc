"""Text-to-image prompt sets (GenEval, DPG-Bench, GenAI-Bench, MS-COCO, MJHQ or any other) from local files
(spec ``reference.md`` §7.3-7.4). Every row is one prompt, so one generated sample per row.

Sources, tried in this order in ``<data_dir>/<name>/`` and then in ``<data_dir>/`` itself:

* the reference's Arrow layout ``<split>/`` (``datasets.load_from_disk``): a ``text`` column; the other
  columns become metadata, except ``image`` (never decoded: prompts only);
* GenEval's ``evaluation_metadata.jsonl`` (also under ``prompts/``): metadata = the whole object;
* DPG-Bench's ``dpg_bench.csv`` (one row per question: one prompt per distinct ``item_id``, in order) or its
  ``prompts/`` folder of ``<item_id>.txt`` files;
* GenAI-Bench's JSON: ``genai_image.json`` or ``<name>.json``, a dict id -> {"prompt": ...} or a list of objects;
* generic ``<name>`` or ``prompts`` + ``.txt`` (one prompt per line), ``.jsonl`` (key prompt | text | caption)
  or ``.csv`` (column prompt | text | caption).

``data_dir`` may also be the file itself. Empty prompts in a table are kept (as "", the unconditional
prompt) so the sample count matches the set; blank lines of a ``.txt`` are layout and skipped. Empty and
non-UTF-8 prompts (decoded with replacement characters) are reported in one line on stderr.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogen.data.captions import CaptionCounters, clean_caption
from nanogen.errors import UserError
from nanogen.log import print0

PROMPT_KEYS = ("prompt", "text", "caption")
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _is_arrow(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "state.json").is_file()


def candidates(name: str, split: str) -> list[str]:
    """Where a prompt set may live inside a base folder, in the order tried ("." is the folder itself)."""
    files = ["evaluation_metadata.jsonl", "prompts/evaluation_metadata.jsonl", "dpg_bench.csv", "prompts",
             "genai_image.json", f"{name}.json"]
    return [split, "."] + files + [f"{stem}{ext}" for stem in (name, "prompts") for ext in (".txt", ".jsonl", ".csv")]


def _usable(path: Path) -> bool:
    if path.is_file():
        return True
    if path.name == "prompts" and path.is_dir():
        return any(path.glob("*.txt"))
    return path.is_dir() and (_is_arrow(path) or (path / "dataset_dict.json").is_file())


def find_source(name: str, data_dir: Path, split: str) -> Path:
    if data_dir.is_file():
        return data_dir
    bases = [data_dir / name, data_dir]
    names = candidates(name, split)
    found = next((b / n for b in bases for n in names if _usable(b / n)), None)
    if found is None:
        looked = ", ".join(f"{b}/{{{','.join(n for n in names if n != '.')}}}" for b in bases)
        raise UserError(
            f"prompt set '{name}' not found: looked for {looked}; run `nanogen prepare --data eval` "
            f"or set eval.datasets.{name}.data_dir"
        )
    return found


def _decode(data: bytes) -> str:
    """File bytes as text: bytes that are not UTF-8 become U+FFFD, and the prompts holding one are counted."""
    return data.decode("utf-8", errors="replace")


def _item(raw: Any, metadata: dict[str, Any], where: str, counters: CaptionCounters) -> PromptItem:
    if raw is not None and not isinstance(raw, str):
        raise UserError(f"{where}: the prompt must be a string, got {type(raw).__name__}; fix the file")
    prompt, flag = clean_caption(raw)
    counters.count(flag)
    counters.non_utf8 += int(REPLACEMENT in prompt)  # from _decode, or already broken upstream
    return PromptItem(prompt, metadata)


def _prompt_key(keys: Any, where: str) -> str:
    key = next((k for k in PROMPT_KEYS if k in keys), None)
    if key is None:
        raise UserError(f"{where}: no prompt field (one of {', '.join(PROMPT_KEYS)}); found {', '.join(map(str, keys))}")
    return key


def read_arrow(path: Path, split: str, counters: CaptionCounters) -> list[PromptItem]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if not _is_arrow(path):  # a DatasetDict saved at the set's folder
        if split not in ds:
            raise UserError(f"{path}: no split '{split}' (has {', '.join(ds)}); set the eval dataset's split")
        ds = ds[split]
    if "text" not in ds.column_names:
        raise UserError(f"{path}: Arrow prompt set without a 'text' column (has {', '.join(ds.column_names)})")
    columns = ds.select_columns([c for c in ds.column_names if c != "image"]).to_dict()  # images stay undecoded
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    return [_item(r.pop("text"), r, f"{path} row {i}", counters) for i, r in enumerate(rows)]


def read_jsonl(path: Path, counters: CaptionCounters) -> list[PromptItem]:
    items = []
    for lineno, line in enumerate(_decode(path.read_bytes()).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}); write one object per line, e.g. {{\"prompt\": \"a cat\"}}") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object such as {{\"prompt\": \"a cat\"}}, got {type(obj).__name__}")
        items.append(_item(obj[_prompt_key(obj, where)], obj, where, counters))
    return items


def read_csv(path: Path, counters: CaptionCounters) -> list[PromptItem]:
    """One prompt per row, or per distinct ``item_id`` (DPG-Bench: one row per question, the rows kept in metadata)."""
    reader = csv.DictReader(io.StringIO(_decode(path.read_bytes()), newline=""))
    key = _prompt_key(reader.fieldnames or [], f"{path}: header")
    if "item_id" not in (reader.fieldnames or []):
        return [_item(row.pop(key), row, f"{path}:{i + 2}", counters) for i, row in enumerate(reader)]
    groups: dict[str, tuple[str, list[dict[str, str]]]] = {}  # item_id -> (prompt, rows), insertion-ordered
    for row in reader:
        prompt = row.pop(key)
        groups.setdefault(row["item_id"], (prompt, []))[1].append(row)
    return [_item(p, {"item_id": i, "rows": rows}, f"{path} item {i}", counters) for i, (p, rows) in groups.items()]


def read_json(path: Path, counters: CaptionCounters) -> list[PromptItem]:
    try:
        data = json.loads(_decode(path.read_bytes()))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix or re-download the file") from None
    if isinstance(data, dict):
        entries = [(f"{path} id {k}", {"id": k, **v} if isinstance(v, dict) else v) for k, v in data.items()]
    elif isinstance(data, list):
        entries = [(f"{path} entry {i}", v) for i, v in enumerate(data)]
    else:
        raise UserError(f"{path}: expected a dict id -> {{\"prompt\": ...}} or a list of such objects")
    items = []
    for where, obj in entries:
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected an object with a prompt field, got {type(obj).__name__}")
        items.append(_item(obj[_prompt_key(obj, where)], obj, where, counters))
    return items


def read_txt(path: Path, counters: CaptionCounters) -> list[PromptItem]:
    lines = _decode(path.read_bytes()).splitlines()
    return [_item(line, {"line": n}, f"{path}:{n}", counters) for n, line in enumerate(lines, start=1) if line.strip()]


def read_txt_folder(path: Path, counters: CaptionCounters) -> list[PromptItem]:
    """DPG-Bench's ``prompts/<item_id>.txt``: one prompt per file, in file-name order."""
    return [_item(_decode(f.read_bytes()), {"item_id": f.stem}, str(f), counters) for f in sorted(path.glob("*.txt"))]


def read_source(path: Path, split: str, counters: CaptionCounters) -> list[PromptItem]:
    if path.is_dir():
        return read_txt_folder(path, counters) if path.name == "prompts" else read_arrow(path, split, counters)
    readers = {".jsonl": read_jsonl, ".csv": read_csv, ".json": read_json, ".txt": read_txt}
    if path.suffix not in readers:
        raise UserError(f"{path}: unknown prompt file type '{path.suffix}'; use .txt, .jsonl, .csv or .json")
    return readers[path.suffix](path, counters)


def load_prompts(name: str, data_dir: str | Path, split: str = "val") -> list[PromptItem]:
    """The prompts of set ``name``, in file order, each with its metadata (GenEval's include/tag, DPG's item_id ...)."""
    source = find_source(name, Path(data_dir), split)
    counters = CaptionCounters()
    items = read_source(source, split, counters)
    if not items:
        raise UserError(f"prompt set '{name}': {source} holds no prompts; re-download it or point data_dir elsewhere")
    if counters.empty or counters.non_utf8:
        print0(f"prompt set '{name}' ({source}): {counters.empty} empty prompts kept as unconditional, "
               f"{counters.non_utf8} non-UTF-8 prompts decoded with replacement characters", file=sys.stderr)
    return items
