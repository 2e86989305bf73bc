"""``nanogen report``: results -> leaderboards, correlation tables, the HTML page and scatter plots, in one folder.

Shared by the ``report`` command and by ``nanogen bench``, which reports its own store when the suite finishes."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from nanogen.errors import UserError
from nanogen.leaderboard import correlation, render, results


def write_report(
    paths: Sequence[str],
    out: str | Path,
    *,
    paper: bool = True,
    subset: str | list[str] | None = None,
    modes: tuple[str, ...] = ("with", "without"),
    as_json: bool = False,
    echo: bool = True,
) -> dict:
    """Write ``leaderboard.md``, ``correlations.md``, ``leaderboard.html`` and ``scatter-*.png`` into ``out``;
    print the Markdown tables (or, ``as_json``, the whole report as JSON). Malformed lines warn as ``file:line``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every malformed line is reported, not only the first of a kind
        res = results.load(paths, paper=paper)
    for w in caught:
        print(f"nanogen: warning: {w.message}", file=sys.stderr)
    reports = [correlation.correlate(res, subset or "all", mode) for mode in modes]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"report: cannot create --out '{out}': {e.strerror}") from None
    board, corr = render.leaderboard_markdown(res, modes), render.correlation_markdown(reports)
    (out / "leaderboard.md").write_text(board, encoding="utf-8")
    (out / "correlations.md").write_text(corr, encoding="utf-8")
    (out / "leaderboard.html").write_text(render.leaderboard_html(res, reports, modes), encoding="utf-8")
    plots = render.scatter_plots(res, out, modes)
    doc = render.report_dict(res, reports, modes)
    doc["files"] = [str(out / n) for n in ("leaderboard.md", "correlations.md", "leaderboard.html")] + [str(p) for p in plots]
    if echo and as_json:
        print(json.dumps(doc, indent=1, ensure_ascii=False))
    elif echo:
        print(board + "\n" + corr)
        print(f"wrote {out}/leaderboard.md, correlations.md, leaderboard.html and {len(plots)} scatter plot(s)")
    return doc
