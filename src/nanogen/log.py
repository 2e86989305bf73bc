"""Rank-0 printing, the metrics sink (JSONL, optionally W&B) and progress bars."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args: Any, **kwargs: Any) -> None:
    if is_main():
        tqdm.write(" ".join(str(a) for a in args), file=kwargs.get("file", sys.stdout))


def progress(total: int | None, desc: str, unit: str = "it", leave: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar on rank 0 only; ``NANOGEN_NO_PROGRESS=1`` silences bars (logs stay)."""
    disable = not is_main() or os.environ.get("NANOGEN_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=disable, dynamic_ncols=True, **kw)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; rank 0 only; optional W&B mirror."""

    def __init__(self, path: Path | None, wandb_run: Any = None):
        self.path = path
        self.wandb = wandb_run
        self.t0 = time.time()

    def log(self, step: int, **values: Any) -> None:
        if self.path is None or not is_main():
            return
        rec = {"step": step, "time": round(time.time() - self.t0, 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        """Finish the W&B run (its offline files are complete only after this)."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def append_csv(path: Path, row: dict[str, Any]) -> None:
    """Add a row to a CSV whose header is the union of all columns seen so far (``step`` first)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    rows.append({k: str(v) for k, v in row.items()})
    cols = list(dict.fromkeys(["step", *(k for r in rows for k in r)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
