"""The leaderboard as Markdown (terminal, README), a self-contained HTML page and scatter plots (PNG).

The HTML page needs no network: CSS and JS are inline and the data is embedded as JSON in
``<script id="leaderboard-data" type="application/json">``. Stable element ids for browser tests:
``#axis-select`` (imagenet | t2i), ``#guidance-toggle`` (a checkbox: checked = with CFG), ``#metric-select``
(sorts by that metric, best first, gaps last), ``#status`` (one line: axis, guidance, sort), ``#leaderboard``
(``thead`` / ``tbody``; each row has ``data-method``) and ``#correlation-table`` (follows the guidance toggle).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from nanogen.leaderboard.correlation import Pair, Report
from nanogen.leaderboard.results import (
    AXES,
    AXIS_LABEL,
    CATEGORY_LABEL,
    MODES,
    Result,
    Row,
    axis_metrics,
    metric_info,
    table,
)

GAP = "–"
SIGN_NOTE = (
    "Coefficients are raw. FID, FDr and MIND are lower-better while IS and the T2I scores are higher-better, so "
    "between FID and GenEval a *negative* coefficient means the two axes agree; the column \"agree if\" gives the "
    "sign that means agreement for each pair."
)
NOT_STATED_NOTE = "† guidance not stated by the source (the paper's T2I table): the same numbers appear with and without CFG."
GROUP_COLORS = {
    "improved-latent": "#1f4e9c",
    "traditional-latent": "#6fa8dc",
    "latent-space": "#3d85c6",
    "pixel-space": "#e69138",
    "one-few-step": "#cc0000",
    "reference": "#6aa84f",
    "other": "#888888",
}
GROUP_LABEL = {
    "improved-latent": "latent (improved: RAE, FLUX.2-VAE, REPA-E)",
    "traditional-latent": "latent (traditional VAE)",
    "latent-space": "latent",
    "pixel-space": "pixel",
    "one-few-step": "one-/few-step",
    "reference": "public model",
    "other": "uncategorised",
}


def fmt(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return GAP
    d = metric_info(metric).decimals
    return f"{value:.{d}f}" if d is not None else f"{value:.4g}"


def group(category: str | None, family: str | None) -> str:
    """The colour group: the latent family where known, else the category."""
    return family or category or "other"


def category_text(row: Row) -> str:
    text = CATEGORY_LABEL.get(row.category, row.category or GAP)
    if row.family == "improved-latent":
        text += " (improved)"
    elif row.family == "traditional-latent":
        text += " (VAE)"
    return text


def sorted_rows(rows: dict[str, Row], metric: str | None) -> list[Row]:
    """Best first by ``metric`` (its own direction), gaps last, ties by name."""
    if metric is None:
        return sorted(rows.values(), key=lambda r: r.method.lower())
    sign = 1.0 if metric_info(metric).better == "lower" else -1.0

    def key(r: Row):
        v = r.get(metric)
        return (v is None, sign * v if v is not None else 0.0, r.method.lower())

    return sorted(rows.values(), key=key)


def _md_table(header: list[str], body: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def leaderboard_markdown(results: list[Result], modes: tuple[str, ...] = MODES) -> str:
    """One table per axis and guidance setting, sorted by the axis's first metric (FID, GenEval, ...)."""
    parts = ["## DiffusionBench leaderboard"]
    any_loose = False
    for axis in AXES:
        metrics = axis_metrics(results, axis)
        tables = {mode: table(results, axis, mode) for mode in modes}
        if all(not r.guidance_stated for rows in tables.values() for r in rows.values()):
            # no record of this axis states its guidance: the tables would repeat each other
            tables = dict(list(tables.items())[:1])
            titles = {mode: "guidance not stated" for mode in tables}
        else:
            titles = {mode: f"{mode} CFG" for mode in tables}
        for mode, rows in tables.items():
            if not rows:
                continue
            ordered = sorted_rows(rows, metrics[0] if metrics else None)
            header = ["#", "Method", "Category"] + [f"{metric_info(m).label} {metric_info(m).arrow}" for m in metrics]
            body = []
            for i, r in enumerate(ordered, 1):
                loose = not r.guidance_stated and titles[mode] != "guidance not stated"
                any_loose |= loose
                body.append([str(i), r.method + " †" * loose, category_text(r)] + [fmt(m, r.get(m)) for m in metrics])
            parts.append(f"### {AXIS_LABEL[axis]}, {titles[mode]} ({len(rows)} methods)\n\n" + _md_table(header, body))
    if len(parts) == 1:
        parts.append("No results.")
    if any_loose:
        parts.append(NOT_STATED_NOTE)
    return "\n\n".join(parts) + "\n"


def _coef(v: float | None) -> str:
    return GAP if v is None else f"{v:+.3f}"


def correlation_markdown(reports: list[Report]) -> str:
    parts = ["## ImageNet vs text-to-image: rank correlations", SIGN_NOTE]
    for rep in reports:
        head = f"### Subset {rep.subset}, {rep.guidance} CFG ({len(rep.methods)} methods in the subset)"
        if rep.reason:
            parts.append(f"{head}\n\nNo correlation: {rep.reason}.")
            continue
        body = []
        for p in rep.pairs:
            il, tl = metric_info(p.imagenet_metric), metric_info(p.t2i_metric)
            body.append([f"{il.label} {il.arrow}", f"{tl.label} {tl.arrow}", str(p.n), _coef(p.pearson),
                         _coef(p.spearman), _coef(p.kendall), "> 0" if p.agree_sign > 0 else "< 0", p.reason or ""])  # fmt: skip
        header = ["ImageNet", "T2I", "n", "Pearson", "Spearman", "Kendall τ-b", "agree if", "note"]
        parts.append(f"{head}\n\n" + _md_table(header, body))
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ data


def pair_dict(p: Pair) -> dict[str, Any]:
    return {"imagenet_metric": p.imagenet_metric, "t2i_metric": p.t2i_metric, "n": p.n, "methods": p.methods,
            "pearson": p.pearson, "spearman": p.spearman, "kendall_tau_b": p.kendall,
            "agree_sign": p.agree_sign, "reason": p.reason}  # fmt: skip


def report_dict(results: list[Result], reports: list[Report], modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """Everything the report shows, as plain JSON (``nanogen report --json``, and the HTML page's data)."""
    axes = {}
    for axis in AXES:
        metrics = axis_metrics(results, axis)
        axes[axis] = {
            "label": AXIS_LABEL[axis],
            "metrics": [{"key": m, "label": metric_info(m).label, "better": metric_info(m).better,
                         "decimals": metric_info(m).decimals} for m in metrics],  # fmt: skip
            "modes": {
                mode: [
                    {"method": r.method, "category": r.category, "family": r.family,
                     "group": group(r.category, r.family), "category_label": category_text(r),
                     "guidance_stated": r.guidance_stated, "seeds": r.seeds,
                     "metrics": {m: r.get(m) for m in metrics}, "sources": r.sources}  # fmt: skip
                    for r in sorted_rows(table(results, axis, mode), metrics[0] if metrics else None)
                ]
                for mode in modes
            },
        }
    return {
        "axes": axes,
        "correlations": [
            {"subset": rep.subset, "guidance": rep.guidance, "methods": rep.methods, "reason": rep.reason,
             "pairs": [pair_dict(p) for p in rep.pairs]}  # fmt: skip
            for rep in reports
        ],
        "notes": {"sign": SIGN_NOTE, "guidance_not_stated": NOT_STATED_NOTE},
        "groups": {g: {"label": GROUP_LABEL[g], "color": c} for g, c in GROUP_COLORS.items()},
    }


# ------------------------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1400px;padding:0 1rem;color:#222}
h1{font-size:1.5rem;margin-bottom:.2rem}.sub{color:#666;margin-top:0}
.controls{display:flex;gap:1.5rem;align-items:center;flex-wrap:wrap;margin:1rem 0;padding:.6rem .8rem;background:#f4f6f8;border-radius:6px}
.controls label{font-weight:600}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1.5rem}
th,td{padding:.3rem .55rem;border-bottom:1px solid #e3e3e3;text-align:right;white-space:nowrap}
th{background:#fafafa;position:sticky;top:0;cursor:pointer}
td.m,th.m,td.c,th.c{text-align:left}
th.sel,td.sel{background:#fff4d6;font-weight:600}
.dot{display:inline-block;width:.7rem;height:.7rem;border-radius:50%;margin-right:.35rem;vertical-align:middle}
.scroll{overflow-x:auto;max-width:100%}#status{color:#444;font-size:.9rem}.note{color:#666;font-size:.85rem;max-width:60rem}
.legend span{margin-right:1rem;font-size:.85rem}
"""

_JS = r"""
(function(){
const data = JSON.parse(document.getElementById('leaderboard-data').textContent);
const axisSel = document.getElementById('axis-select');
const toggle = document.getElementById('guidance-toggle');
const metricSel = document.getElementById('metric-select');
const status = document.getElementById('status');
const GAP = '\u2013';
function fmt(m, v){ if(v===null||v===undefined||!isFinite(v)) return GAP;
  return (m.decimals===null||m.decimals===undefined) ? Number(v).toPrecision(4) : Number(v).toFixed(m.decimals); }
function mode(){ return toggle.checked ? 'with' : 'without'; }
function fillMetrics(){
  const ax = data.axes[axisSel.value], keep = metricSel.value;
  metricSel.innerHTML = '';
  for(const m of ax.metrics){ const o = document.createElement('option'); o.value = m.key;
    o.textContent = m.label + (m.better==='lower' ? ' \u2193' : ' \u2191'); metricSel.appendChild(o); }
  if(ax.metrics.some(m => m.key===keep)) metricSel.value = keep;
}
function render(){
  const ax = data.axes[axisSel.value], md = mode();
  const metric = ax.metrics.find(m => m.key===metricSel.value) || ax.metrics[0];
  const rows = (ax.modes[md] || []).slice();
  if(metric){ const s = metric.better==='lower' ? 1 : -1;
    rows.sort((a,b)=>{ const x=a.metrics[metric.key], y=b.metrics[metric.key];
      const gx = x===null||x===undefined, gy = y===null||y===undefined;
      if(gx!==gy) return gx ? 1 : -1; if(!gx && x!==y) return s*(x-y); return a.method.localeCompare(b.method); }); }
  const thead = document.querySelector('#leaderboard thead'), tbody = document.querySelector('#leaderboard tbody');
  const hr = document.createElement('tr'); hr.innerHTML = '<th>#</th><th class="m">Method</th><th class="c">Category</th>';
  for(const m of ax.metrics){  // metric names come from the results files: text and dataset, never markup
    const th = document.createElement('th'); th.dataset.metric = m.key; if(metric&&m.key===metric.key) th.className = 'sel';
    th.textContent = m.label + (m.better==='lower' ? ' \u2193' : ' \u2191'); hr.appendChild(th); }
  thead.replaceChildren(hr);
  tbody.innerHTML = '';
  rows.forEach((r,i)=>{
    const tr = document.createElement('tr'); tr.dataset.method = r.method;
    const g = data.groups[r.group] || data.groups.other;
    let c = '<td>'+(i+1)+'</td><td class="m"></td><td class="c"><span class="dot" style="background:'+g.color+'"></span></td>';
    for(const m of ax.metrics) c += '<td'+(metric&&m.key===metric.key?' class="sel"':'')+'>'+fmt(m, r.metrics[m.key])+'</td>';
    tr.innerHTML = c;
    tr.children[1].textContent = r.method + (r.guidance_stated ? '' : ' \u2020');
    tr.children[2].appendChild(document.createTextNode(r.category_label));
    tbody.appendChild(tr);
  });
  status.textContent = ax.label + ' \u00b7 ' + md + ' CFG \u00b7 ' + rows.length + ' methods'
    + (metric ? ' \u00b7 sorted by ' + metric.label + (metric.better==='lower' ? ' (lower is better)' : ' (higher is better)') : '');
  thead.querySelectorAll('th[data-metric]').forEach(th => th.onclick = () => { metricSel.value = th.dataset.metric; render(); });
  renderCorrelations(md);
}
function renderCorrelations(md){
  const tbody = document.querySelector('#correlation-table tbody'); tbody.innerHTML = '';
  const label = k => { for(const a of Object.values(data.axes)) for(const m of a.metrics) if(m.key===k) return m.label; return k; };
  const c3 = v => v===null ? GAP : (v>=0?'+':'') + v.toFixed(3);
  for(const rep of data.correlations.filter(r => r.guidance===md)){
    if(rep.reason){ const tr = document.createElement('tr'); tr.innerHTML = '<td class="m"></td><td colspan="8" class="m"></td>';
      tr.children[0].textContent = rep.subset; tr.children[1].textContent = rep.reason; tbody.appendChild(tr); continue; }
    for(const p of rep.pairs){ const tr = document.createElement('tr');
      tr.innerHTML = '<td class="m"></td><td class="m"></td><td class="m"></td><td>'+p.n+'</td><td>'+c3(p.pearson)+'</td><td>'
        + c3(p.spearman)+'</td><td>'+c3(p.kendall_tau_b)+'</td><td>'+(p.agree_sign>0?'&gt; 0':'&lt; 0')+'</td><td class="m"></td>';
      tr.children[0].textContent = rep.subset; tr.children[1].textContent = label(p.imagenet_metric);
      tr.children[2].textContent = label(p.t2i_metric); tr.children[8].textContent = p.reason || '';
      tbody.appendChild(tr); }
  }
}
axisSel.addEventListener('change', ()=>{ fillMetrics(); render(); });
toggle.addEventListener('change', render);
metricSel.addEventListener('change', render);
fillMetrics(); render();
})();
"""


def leaderboard_html(results: list[Result], reports: list[Report], modes: tuple[str, ...] = MODES,
                     title: str = "DiffusionBench leaderboard") -> str:  # fmt: skip
    """A self-contained page: inline CSS and JS, the data embedded as JSON, no network."""
    data = report_dict(results, reports, MODES)  # both guidance settings, so that the toggle always works
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    first_axis = next((a for a in AXES if any(data["axes"][a]["modes"][m] for m in MODES)), AXES[0])
    axis_options = "".join(f'<option value="{a}"{" selected" if a == first_axis else ""}>{html.escape(AXIS_LABEL[a])}</option>'
                           for a in AXES)  # fmt: skip
    checked = " checked" if modes[0] == "with" else ""
    legend = "".join(f'<span><span class="dot" style="background:{c}"></span>{html.escape(GROUP_LABEL[g])}</span>'
                     for g, c in GROUP_COLORS.items())  # fmt: skip
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="sub">ImageNet (class-conditional) and text-to-image results side by side, written by <code>nanogen report</code>.</p>
<div class="controls">
  <span><label for="axis-select">Axis</label> <select id="axis-select">{axis_options}</select></span>
  <span><input type="checkbox" id="guidance-toggle"{checked}> <label for="guidance-toggle">with CFG (classifier-free guidance)</label></span>
  <span><label for="metric-select">Sort by</label> <select id="metric-select"></select></span>
</div>
<p id="status"></p>
<div class="legend">{legend}</div>
<div class="scroll"><table id="leaderboard"><thead></thead><tbody></tbody></table></div>
<p class="note">{html.escape(NOT_STATED_NOTE)}</p>
<h2>ImageNet vs text-to-image: rank correlations</h2>
<p class="note">{html.escape(SIGN_NOTE.replace("*", ""))}</p>
<table id="correlation-table">
<thead><tr><th class="m">Subset</th><th class="m">ImageNet</th><th class="m">T2I</th><th>n</th><th>Pearson</th><th>Spearman</th><th>Kendall τ-b</th><th>agree if</th><th class="m">note</th></tr></thead>
<tbody></tbody>
</table>
<script id="leaderboard-data" type="application/json">{payload}</script>
<script>{_JS}</script>
</body>
</html>
"""


# ------------------------------------------------------------------------------------------------ PNG


def scatter_pairs(results: list[Result]) -> list[tuple[str, str]]:
    """Which (ImageNet metric, T2I metric) pairs get a plot: FID and IS (or the first ImageNet metric when
    neither exists) against every T2I metric."""
    im = axis_metrics(results, "imagenet")
    t2i = axis_metrics(results, "t2i")
    chosen = [m for m in ("fid", "is") if m in im] or im[:1]
    return [(a, b) for a in chosen for b in t2i]


def scatter_points(results: list[Result], a: str, b: str, mode: str) -> list[tuple[str, float, float, str]]:
    """(method, ImageNet value, T2I value, colour group) for the methods with both values."""
    im, t2i = table(results, "imagenet", mode), table(results, "t2i", mode)
    out = []
    for m, row in im.items():
        x, y = row.get(a), t2i[m].get(b) if m in t2i else None
        if x is not None and y is not None:
            out.append((m, x, y, group(row.category, row.family)))
    return out


def write_scatter(points: list[tuple[str, float, float, str]], a: str, b: str, title: str, path: Path) -> Path:
    """One scatter plot, points labelled by method and coloured by category. matplotlib (Agg) when installed,
    else a plain PIL drawing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib ships with the environment (via mlxtend)
        return _scatter_pil(points, a, b, title, path)
    fig = Figure(figsize=(8, 6), dpi=110)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.09, top=0.93)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for g, color in GROUP_COLORS.items():
        pts = [p for p in points if p[3] == g]
        if pts:
            ax.scatter([p[1] for p in pts], [p[2] for p in pts], c=color, s=36, label=GROUP_LABEL[g],
                       edgecolors="white", linewidths=0.6, zorder=3)  # fmt: skip
    for m, x, y, _ in points:
        ax.annotate(m, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6.5, color="#333")
    ia, ib = metric_info(a), metric_info(b)
    ax.set_xlabel(f"ImageNet {ia.label} ({ia.better} is better)")
    ax.set_ylabel(f"T2I {ib.label} ({ib.better} is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, zorder=0)
    ax.margins(x=0.14, y=0.06)  # room for the labels of the outermost points
    if points:
        ax.legend(fontsize=7, loc="best")
    fig.savefig(path)
    return path


def _scatter_pil(points, a: str, b: str, title: str, path: Path) -> Path:  # pragma: no cover - fallback
    from PIL import Image, ImageDraw

    W, H, pad = 880, 660, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad, W - pad, H - pad], outline="#999")
    d.text((pad, 20), title, fill="black")
    d.text((W // 2 - 80, H - 35), f"ImageNet {metric_info(a).label}", fill="black")
    d.text((8, pad - 25), f"T2I {metric_info(b).label}", fill="black")
    if points:
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        sx = (W - 2 * pad - 20) / ((x1 - x0) or 1.0)
        sy = (H - 2 * pad - 20) / ((y1 - y0) or 1.0)
        for m, x, y, g in points:
            px, py = pad + 10 + (x - x0) * sx, H - pad - 10 - (y - y0) * sy
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=GROUP_COLORS[g])
            d.text((px + 6, py - 6), m, fill="#333")
        d.text((pad, H - pad + 8), f"{x0:.4g}", fill="black")
        d.text((W - pad - 40, H - pad + 8), f"{x1:.4g}", fill="black")
        d.text((8, H - pad - 10), f"{y0:.4g}", fill="black")
        d.text((8, pad), f"{y1:.4g}", fill="black")
    img.save(path)
    return path


def scatter_plots(results: list[Result], out_dir: Path, modes: tuple[str, ...] = MODES) -> list[Path]:
    """``scatter-<with|without>-<imagenet metric>-vs-<t2i metric>.png`` for every pair of ``scatter_pairs`` that
    has at least one method with both values."""
    from nanogen.leaderboard.correlation import MIN_METHODS, spearman

    paths = []
    for mode in modes:
        for a, b in scatter_pairs(results):
            pts = scatter_points(results, a, b, mode)
            if not pts:
                continue
            rho = ""
            if len(pts) >= MIN_METHODS:
                r = spearman([p[1] for p in pts], [p[2] for p in pts])
                rho = f", Spearman ρ = {r:+.2f}" if math.isfinite(r) else ""
            title = f"{metric_info(a).label} vs {metric_info(b).label}, {mode} CFG (n = {len(pts)}{rho})"
            safe = lambda s: "".join(c if c.isalnum() or c in "-_" else "-" for c in s)
            paths.append(write_scatter(pts, a, b, title, out_dir / f"scatter-{mode}-{safe(a)}-vs-{safe(b)}.png"))
    return paths
