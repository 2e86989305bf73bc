"""The leaderboard page of ``nanogen report`` in a real browser: headless Chromium (Debian package ``chromium``)
driven by Playwright. The page toggles guidance and the sort metric like the paper's own page
(../shared/spec/diffusionbench-paper.txt line 56); every expected number here is read from paper_results.json,
never from the page.

Skipped, with the install command, where Chromium or the playwright package is missing. Set
NANOGEN_UPDATE_SCREENSHOT=1 to refresh docs/leaderboard-screenshot.png (the README's picture); by default the
test writes only into tmp_path.
"""

import json
import os
import shutil

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from conftest import ROOT
from nanogen.leaderboard import correlation as C
from nanogen.leaderboard import render as R
from nanogen.leaderboard import results as L

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
# --disable-background-networking and friends: Chromium's own update / sync / field-trial connections are refused
# on a closed network and would only slow the start; the page itself needs no network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
VIEWPORT = {"width": 1400, "height": 960}  # all 26 ImageNet rows (the widest columns run off the right edge)
SCREENSHOT = ROOT / "docs" / "leaderboard-screenshot.png"
HIGHLIGHT = (0xFF, 0xF4, 0xD6)  # td.sel / th.sel background: the sort column

PAPER = json.loads(L.PAPER_FILE.read_text(encoding="utf-8"))
IMAGENET = {r["method"]: r for r in PAPER["imagenet"]["methods"]}


def _t2i_name(row):
    iters = row.get("iters", PAPER["t2i"]["default_iters"])
    return row["method"] if iters == PAPER["t2i"]["default_iters"] else f"{row['method']} @{iters // 1000}K"


T2I = {_t2i_name(r): r["metrics"] for r in PAPER["t2i"]["methods"]}


# ------------------------------------------------------------------------------------------------ expectations


def values(axis, mode, key):
    """{method: value} straight from the JSON; T2I numbers carry no guidance, so ``mode`` does not matter there."""
    if axis == "t2i":
        return {m: v.get(key) for m, v in T2I.items()}
    return {m: r[f"{mode}_cfg"].get(key) for m, r in IMAGENET.items()}


def higher_better(axis, key):
    return axis == "t2i" or key == "is"


def expected_order(axis, mode, key):
    """Best first in the metric's own direction, gaps last, ties by lower-cased name."""
    v, sign = values(axis, mode, key), -1.0 if higher_better(axis, key) else 1.0
    return sorted(v, key=lambda m: (v[m] is None, sign * (v[m] or 0.0), m.lower()))


def cell(axis, key, value):
    decimals = 3 if axis == "t2i" else 1 if key == "is" else 2  # GenEval 0.691, IS 224.1, FID / FDr / MIND 1.37
    return "–" if value is None else f"{value:.{decimals}f}"


def spearman_cell(mode, t2i_key="geneval"):
    """(n, Spearman of ImageNet FID vs a T2I metric over the methods in both tables) as the page prints it."""
    both = [m for m in IMAGENET if m in T2I]
    rho = scipy.stats.spearmanr([IMAGENET[m][f"{mode}_cfg"]["fid"] for m in both], [T2I[m][t2i_key] for m in both])[0]
    return str(len(both)), f"{rho:+.3f}"


# ------------------------------------------------------------------------------------------------ the page

_READ = """() => {
  const heads = [...document.querySelectorAll('#leaderboard thead th')];
  return {
    heads: heads.map(th => [th.dataset.metric || null, th.textContent, th.className]),
    rows: [...document.querySelectorAll('#leaderboard tbody tr')].map(
      tr => [tr.dataset.method, [...tr.children].map(td => [td.textContent, td.className])]),
    corr: [...document.querySelectorAll('#correlation-table tbody tr')].map(tr => [...tr.children].map(td => td.textContent)),
    status: document.getElementById('status').textContent,
    axis: document.getElementById('axis-select').value,
    guidance: document.getElementById('guidance-toggle').checked,
    metric: document.getElementById('metric-select').value,
    options: [...document.querySelectorAll('#metric-select option')].map(o => o.value),
  };
}"""


def read(page):
    """What the page shows: row methods, {metric key: cell texts}, the highlighted metric columns, the controls."""
    s = page.evaluate(_READ)
    keys = [k for k, _, _ in s["heads"]]
    s["methods"] = [m for m, _ in s["rows"]]
    s["names"] = [cells[1][0] for _, cells in s["rows"]]
    s["cols"] = {k: [cells[i][0] for _, cells in s["rows"]] for i, k in enumerate(keys) if k}
    s["highlighted"] = {k for k, _, c in s["heads"] if c == "sel"} | {
        keys[i] for _, cells in s["rows"] for i, (_, c) in enumerate(cells) if c == "sel"}  # fmt: skip
    s["labels"] = {k: text for k, text, _ in s["heads"] if k}
    return s


def check_table(page, axis, mode, key):
    """Order and every cell of the table against the JSON, sorted by ``key``; returns the page state."""
    s = read(page)
    assert s["axis"] == axis and s["guidance"] == (mode == "with") and s["metric"] == key
    assert s["methods"] == expected_order(axis, mode, key)
    assert s["highlighted"] == {key}
    src = {k: values(axis, mode, k) for k in s["cols"]}
    for k, col in s["cols"].items():
        assert col == [cell(axis, k, src[k][m]) for m in s["methods"]], (axis, mode, k)
    return s


def status_line(axis, mode, key, label):
    n = len(T2I if axis == "t2i" else IMAGENET)
    direction = "higher" if higher_better(axis, key) else "lower"
    return f"{L.AXIS_LABEL[axis]} · {mode} CFG · {n} methods · sorted by {label} ({direction} is better)"


def corr_row(state, imagenet_label="FID", t2i_label="GenEval"):
    rows = [r for r in state["corr"] if r[0] == "all" and r[1] == imagenet_label and r[2] == t2i_label]
    assert len(rows) == 1, state["corr"][:3]
    return rows[0][3], rows[0][5]  # n, Spearman


def check_png(path):
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (VIEWPORT["width"], VIEWPORT["height"])
    rgb = img.convert("RGB")
    colors = rgb.getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 100  # text, dots, highlights: far from a blank page
    px = np.asarray(rgb).astype(int)
    assert np.all(np.abs(px - HIGHLIGHT) <= 2, axis=-1).sum() > 2000  # the highlighted sort column is painted
    return px


@pytest.fixture
def browser(tmp_path_factory):
    """Chromium on an empty profile folder."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: run `uv sync` (it is in the dev extra; never `playwright install`)")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: `apt-get install -y --no-install-recommends chromium`")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True, viewport=VIEWPORT)  # fmt: skip
        yield ctx
        ctx.close()


def open_page(browser, html_path):
    """The page, with every console error/warning, uncaught exception and request it makes recorded."""
    page = browser.new_page()
    log = {"problems": [], "requests": []}
    page.on("console", lambda m: m.type in ("error", "warning") and log["problems"].append(f"console.{m.type}: {m.text}"))
    page.on("pageerror", lambda e: log["problems"].append(f"pageerror: {e}"))
    page.on("request", lambda r: log["requests"].append(r.url))
    page.goto(html_path.as_uri())
    return page, log


def write_page(path, results):
    """leaderboard.html exactly as ``nanogen report`` writes it (cli.cmd_report): correlations for both guidance
    settings. (Not through the CLI: that also draws a dozen matplotlib scatter plots, about 10 s on two cores,
    which test_report.py covers.)"""
    reports = [C.correlate(results, "all", mode) for mode in L.MODES]
    path.write_text(R.leaderboard_html(results, reports), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ tests


def test_leaderboard_page_in_headless_chromium(browser, tmp_path):
    # one test, so one Chromium start (about 3 s): under xdist two tests would start one per worker
    (tmp_path / "paper").mkdir()
    check_paper_leaderboard(browser, tmp_path / "paper")
    (tmp_path / "odd").mkdir()
    check_names_are_text_not_markup(browser, tmp_path / "odd")


def check_paper_leaderboard(browser, tmp_path):
    """The paper's tables: guidance toggle, metric selector, header clicks and the axis switch."""
    html = write_page(tmp_path / "leaderboard.html", L.load([], paper=True))
    page, log = open_page(browser, html)

    # opens on ImageNet with CFG, sorted by FID: the paper's best, FLUX.2-VAE at 1.37 (paper line 56), first
    s = check_table(page, "imagenet", "with", "fid")
    fid_with, fid_without = values("imagenet", "with", "fid"), values("imagenet", "without", "fid")
    best = min(fid_with, key=fid_with.get)
    assert s["methods"][0] == best and s["cols"]["fid"][0] == cell("imagenet", "fid", fid_with[best])
    assert s["status"] == status_line("imagenet", "with", "fid", "FID")
    assert s["labels"]["fid"] == "FID ↓" and s["labels"]["is"] == "IS ↑"
    assert set(s["cols"]) == set(IMAGENET[best]["with_cfg"])
    assert corr_row(s) == spearman_cell("with")
    shot_with = tmp_path / "leaderboard-with-cfg.png"
    page.screenshot(path=str(shot_with))
    px_with = check_png(shot_with)
    if os.environ.get("NANOGEN_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot_with, SCREENSHOT)

    # the guidance toggle: the same method now shows its without-CFG FID, the order and correlations follow
    page.click("#guidance-toggle")
    s = check_table(page, "imagenet", "without", "fid")
    assert s["cols"]["fid"][s["methods"].index(best)] == cell("imagenet", "fid", fid_without[best])
    assert fid_with[best] != fid_without[best] and s["methods"][0] == min(fid_without, key=fid_without.get) != best
    assert s["status"] == status_line("imagenet", "without", "fid", "FID")
    assert corr_row(s) == spearman_cell("without") != spearman_cell("with")
    shot_without = tmp_path / "leaderboard-without-cfg.png"
    page.screenshot(path=str(shot_without))
    assert np.any(check_png(shot_without) != px_with)

    # another metric: higher-better IS, then lower-better MIND; a header click sorts too
    page.select_option("#metric-select", "is")
    s = check_table(page, "imagenet", "without", "is")
    assert s["status"] == status_line("imagenet", "without", "is", "IS")
    page.select_option("#metric-select", "mind_dinov2")
    check_table(page, "imagenet", "without", "mind_dinov2")
    page.click('#leaderboard th[data-metric="fdr_dinov2"]')
    s = check_table(page, "imagenet", "without", "fdr_dinov2")
    assert s["status"] == status_line("imagenet", "without", "fdr_dinov2", "FDr DINOv2")
    page.click("#guidance-toggle")  # the chosen metric survives the toggle
    check_table(page, "imagenet", "with", "fdr_dinov2")

    # text-to-image: its own metrics (FID is not one, so GenEval sorts), every row marked "guidance not stated"
    page.select_option("#axis-select", "t2i")
    s = check_table(page, "t2i", "with", "geneval")
    assert s["options"] == ["geneval", "dpgbench", "genaibench"]
    assert s["status"] == status_line("t2i", "with", "geneval", "GenEval")
    assert all(name.endswith(" †") for name in s["names"]) and s["methods"][0] == max(T2I, key=lambda m: T2I[m]["geneval"])
    page.click("#guidance-toggle")
    assert read(page)["cols"] == s["cols"]  # the paper states no guidance for T2I: same numbers both ways
    page.select_option("#metric-select", "dpgbench")
    check_table(page, "t2i", "without", "dpgbench")
    page.select_option("#axis-select", "imagenet")  # back: FID again (DPG-Bench is no ImageNet metric)
    check_table(page, "imagenet", "without", "fid")

    assert log["problems"] == []
    assert log["requests"] == [html.as_uri()]  # self-contained: no script, style, font or image fetched
    page.close()


def check_names_are_text_not_markup(browser, tmp_path):
    """Metric and method names are free text in a results store (results.py docstring). Before the header was
    built from DOM nodes, a metric named like this became an <i> element and a broken data-metric attribute."""
    odd = '<i>x</i>"q'
    store = tmp_path / "s.jsonl"
    store.write_text("".join(json.dumps(r) + "\n" for r in [
        {"method": "a", "axis": "imagenet", "guidance": True, "metrics": {"fid": 3.0, odd: 1.0}},
        {"method": "x</script><b>", "axis": "imagenet", "guidance": True, "metrics": {"fid": 2.0, odd: 5.0}},
    ]))  # fmt: skip
    page, log = open_page(browser, write_page(tmp_path / "leaderboard.html", L.load([store], paper=False)))
    s = read(page)
    assert s["labels"] == {"fid": "FID ↓", odd: odd + " ↑"} and s["methods"] == ["x</script><b>", "a"]
    assert page.locator("#leaderboard i, #leaderboard b").count() == 0
    page.locator("#leaderboard thead th").nth(4).click()  # sorts by the odd metric, higher-better: 5.0 first
    s = read(page)
    assert s["metric"] == odd and s["highlighted"] == {odd} and s["cols"][odd] == ["5.000", "1.000"]  # 4 significant digits
    assert log["problems"] == []
    page.close()
