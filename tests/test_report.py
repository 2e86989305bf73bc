"""nanogen report: the paper's transcribed tables, results loading (stores, eval CSV/JSONL), rank correlations
against scipy, Markdown / HTML / PNG output and the CLI."""

import json
import math
import re
import warnings

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ROOT, one_line_error
from nanogen.cli import main
from nanogen.errors import UserError
from nanogen.leaderboard import correlation as C
from nanogen.leaderboard import render as R
from nanogen.leaderboard import results as L
from nanogen.log import append_csv

PAPER_TXT = ROOT.parent / "shared" / "spec" / "diffusionbench-paper.txt"


def paper_rows(key):
    doc = L.paper_table()
    return {r["method"] + ("" if r.get("iters", 100000) == 100000 else "@200K"): r for r in doc[key]["methods"]}


def write_store(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def rec(method, axis, guidance=True, seed=0, **metrics):
    return {"method": method, "axis": axis, "guidance": guidance, "seed": seed, "metrics": metrics}


# ------------------------------------------------------------------------------------------------ the paper


@pytest.mark.skipif(not PAPER_TXT.is_file(), reason="the spec folder is not next to the checkout")
def test_every_paper_number_is_on_its_recorded_line():
    lines = PAPER_TXT.read_text(encoding="utf-8").split("\n")
    doc = L.paper_table()
    for r in doc["imagenet"]["methods"]:
        text = lines[r["line"] - 1]
        w, wo = r["with_cfg"], r["without_cfg"]
        assert text.startswith(f"| {r['method']} | {w['fid']:.2f}{wo['fid']:.2f} | {w['is']:.1f}{wo['is']:.1f} |"), text
        for space in ("inception", "convnext", "dinov2", "mae", "siglip"):
            cell = f"{w[f'fdr_{space}']:.2f}{wo[f'fdr_{space}']:.2f}{w[f'mind_{space}']:.2f}{wo[f'mind_{space}']:.2f}"
            assert f"| {cell} |" in text, (r["method"], space, text)
    for r in doc["t2i"]["methods"]:
        m = r["metrics"]
        iters = f"{r['iters'] // 1000}K" if "iters" in r else "–"
        expect = f"| {r['method']} | {iters} | {r['params']} | {m['geneval']:.3f} | {m['dpgbench']:.3f} | {m['genaibench']:.3f} |"
        assert lines[r["line"] - 1] == expect
    for r in doc["reproduction"]["rows"]:
        cells = [c.strip() for c in lines[r["line"] - 1].strip("|").split("|")]
        assert cells[0] == ("Ours" if r["source"] == "NanoGen" else r["method"])
        assert cells[1:6] == [str(r["epochs"]), r["params"], r["prediction"], str(r["nfe"]), "✓" if r["guidance"] else "×"]
        assert cells[6] == f"{r['metrics']['fid']:.2f}"
        assert cells[7] == (f"{r['metrics']['is']:.1f}" if "is" in r["metrics"] else "–")
    # complete: every table row of the paper that holds numbers is transcribed
    recorded = {r["line"] for key in ("imagenet", "t2i") for r in doc[key]["methods"]}
    recorded |= {r["line"] for r in doc["reproduction"]["rows"]}
    numeric = {i for i, t in enumerate(lines, 1) if t.startswith("| ") and re.search(r"\| [\d.–]+ \|", t)}
    assert recorded == numeric


def test_paper_spot_checks_and_categories():
    im, t2i = paper_rows("imagenet"), paper_rows("t2i")
    assert len(im) == 26 and len(t2i) == 35 and len(L.paper_table()["reproduction"]["rows"]) == 12
    best = min(im.values(), key=lambda r: r["with_cfg"]["fid"])
    assert best["method"] == "FLUX.2-VAE" and best["with_cfg"]["fid"] == 1.37  # "The best FID (1.37)", line 56
    rae = [r for r in im.values() if r["section"] == "Latent-space (RAE)"]
    assert min(r["with_cfg"]["fid"] for r in rae) == 1.74 == im["DINOv3-B"]["with_cfg"]["fid"]  # best RAE, line 56
    assert im["SD-VAE-EMA"]["without_cfg"] == {
        "fid": 10.16, "is": 113.4, "fdr_inception": 5.97, "mind_inception": 9.56, "fdr_convnext": 10.14,
        "mind_convnext": 688.82, "fdr_dinov2": 18.17, "mind_dinov2": 245.95, "fdr_mae": 11.11, "mind_mae": 0.99,
        "fdr_siglip": 35.43, "mind_siglip": 38.87,
    }  # fmt: skip
    assert t2i["E2E-Qwen-Image-VAE"]["metrics"] == {"geneval": 0.691, "dpgbench": 0.835, "genaibench": 0.714}
    assert t2i["FLUX.2-VAE@200K"]["metrics"]["geneval"] == 0.625 and t2i["FLUX.2-VAE@200K"]["line"] == 123
    assert t2i["MeanFlow (NFE=1)"]["nfe"] == 1 and t2i["MeanFlow (NFE=1)"]["metrics"]["geneval"] == 0.287
    assert "iters" not in t2i["FLUX-2"] and t2i["FLUX-2"]["params"] == "32B"  # "–" in the paper: absent
    repro = {r["method"]: r for r in L.paper_table()["reproduction"]["rows"]}
    assert repro["JiT"]["metrics"] == {"fid": 8.62}  # IS "–": absent, not zero
    assert repro["NanoGen (JiT)"] == {**repro["NanoGen (JiT)"], "epochs": 200, "params": "88M", "prediction": "x",
                                      "nfe": 50, "guidance": True, "metrics": {"fid": 5.49, "is": 231.6}}  # fmt: skip
    # categories as the paper groups them (improved latent vs traditional VAE: line 135)
    assert L.infer_category("FLUX.2-VAE") == ("latent-space", "improved-latent")
    assert L.infer_category("E2E-VAVAE @200K") == ("latent-space", "improved-latent")
    assert L.infer_category("SD-VAE-EMA + REG") == ("latent-space", "traditional-latent")
    assert L.infer_category("PixNerd") == ("pixel-space", None)
    assert L.infer_category("MeanFlow (NFE=2)") == ("one-few-step", None)
    assert L.infer_category("Qwen-Image") == ("reference", None)
    assert L.infer_category("nano-meanflow-1step") == ("one-few-step", None)
    assert L.infer_category("pixel-xpred") == ("pixel-space", None)
    assert L.infer_category("mystery") == (None, None)


def test_paper_results_load_with_guidance():
    res = L.load_paper()
    im_with, im_without = L.table(res, "imagenet", "with"), L.table(res, "imagenet", "without")
    assert im_with["FLUX.2-VAE"].get("fid") == 1.37 and im_without["FLUX.2-VAE"].get("fid") == 4.53
    assert im_with["FLUX.2-VAE"].guidance_stated and im_with["FLUX.2-VAE"].sources == ["paper:77"]
    t2i = L.table(res, "t2i", "with")
    assert not t2i["FLUX.2-VAE"].guidance_stated  # the paper does not say: fills both settings
    assert t2i["FLUX.2-VAE @200K"].get("geneval") == 0.625 and "FLUX.2-VAE @200K" not in im_with


# ------------------------------------------------------------------------------------------------ correlations

vectors = st.integers(3, 25).flatmap(
    lambda n: st.tuples(
        st.one_of(st.lists(st.integers(-4, 4), min_size=n, max_size=n),
                  st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=n, max_size=n)),
        st.one_of(st.lists(st.integers(-4, 4), min_size=n, max_size=n),
                  st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=n, max_size=n)),
    )
)  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(vectors)
def test_coefficients_equal_scipy(xy):
    x, y = (np.asarray(v, dtype=np.float64) for v in xy)
    np.testing.assert_allclose(C.rank(x), scipy.stats.rankdata(x, method="average"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input
        expect = (scipy.stats.pearsonr(x, y)[0], scipy.stats.spearmanr(x, y)[0], scipy.stats.kendalltau(x, y)[0])
    for ours, ref in zip((C.pearson(x, y), C.spearman(x, y), C.kendall_tau_b(x, y)), expect, strict=True):
        if np.ptp(x) < 1e-9 * max(1.0, np.abs(x).max()) or np.ptp(y) < 1e-9 * max(1.0, np.abs(y).max()):
            continue  # (nearly) constant: undefined; exact constants are checked below
        assert math.isclose(ours, ref, rel_tol=1e-9, abs_tol=1e-9), (ours, ref)


def test_ties_and_constants_by_hand():
    x, y = [1, 2, 2, 3], [1, 3, 2, 4]
    assert C.rank(x).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert C.rank([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]
    # one tie in x: 5 concordant pairs, 0 discordant, 6 pairs, 1 tied in x -> 5 / sqrt(5 * 6)
    assert math.isclose(C.kendall_tau_b(x, y), 5 / math.sqrt(30), rel_tol=1e-12)
    assert math.isclose(C.spearman(x, y), 4.5 / math.sqrt(4.5 * 5), rel_tol=1e-12)
    assert math.isclose(C.pearson(x, y), 3 / math.sqrt(10), rel_tol=1e-12)
    assert C.kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0 and math.isclose(C.spearman([1, 2, 3], [10, 20, 1000]), 1.0)
    for f in (C.pearson, C.spearman, C.kendall_tau_b):
        assert math.isnan(f([1, 2, 3], [0.1, 0.1, 0.1]))


def test_correlate_pairs_subsets_and_the_fewer_than_three_reason(tmp_path):
    store = write_store(tmp_path / "s.jsonl", [
        rec("a", "imagenet", fid=1.0, **{"is": 9.0}), rec("a", "t2i", geneval=0.9),
        rec("b", "imagenet", fid=2.0, **{"is": 7.0}), rec("b", "t2i", geneval=0.5),
        rec("c", "imagenet", fid=3.0, **{"is": 8.0}), rec("c", "t2i", geneval=0.7),
        rec("d", "imagenet", fid=4.0),  # no T2I result: a gap, not counted
    ])  # fmt: skip
    res = L.load([store], paper=False)
    rep = C.correlate(res, "all", "with")
    fid = next(p for p in rep.pairs if (p.imagenet_metric, p.t2i_metric) == ("fid", "geneval"))
    assert fid.methods == ["a", "b", "c"] and fid.agree_sign == -1
    assert math.isclose(fid.pearson, -0.5) and math.isclose(fid.spearman, -0.5)
    assert math.isclose(fid.kendall, -1 / 3)
    is_pair = next(p for p in rep.pairs if p.imagenet_metric == "is")
    assert is_pair.agree_sign == 1 and math.isclose(is_pair.spearman, 1.0)
    two = C.correlate(res, ["a", "b", "d"], "with")
    assert all(p.pearson is None and p.spearman is None and p.kendall is None for p in two.pairs)
    assert "only 2 methods" in two.pairs[0].reason and "need at least 3" in two.pairs[0].reason
    none = C.correlate(res, "all", "without")  # nothing without CFG
    assert none.pairs == [] and "no ImageNet and T2I results" in none.reason
    with pytest.raises(UserError, match="unknown subset 'latentspace'"):
        C.correlate(res, "latentspace")
    with pytest.raises(UserError, match="unknown method"):
        C.correlate(res, ["a", "zzz"])


def test_correlate_the_paper_by_category():
    res = L.load_paper()
    rep = C.correlate(res, "all", "with")
    p = next(p for p in rep.pairs if (p.imagenet_metric, p.t2i_metric) == ("fid", "geneval"))
    assert p.n == 26  # the 100K T2I rows that have an ImageNet row; public models and @200K rows drop out
    im, t2i = L.table(res, "imagenet", "with"), L.table(res, "t2i", "with")
    x, y = [im[m].get("fid") for m in p.methods], [t2i[m].get("geneval") for m in p.methods]
    assert math.isclose(p.spearman, scipy.stats.spearmanr(x, y)[0], rel_tol=1e-12)
    assert p.spearman < 0  # FID lower-better, GenEval higher-better: negative = the axes agree
    pixel = C.correlate(res, "pixel-space", "without")
    assert sorted(pixel.pairs[0].methods) == ["JiT", "PixNerd", "PixelGen"] and pixel.pairs[0].pearson is not None
    few = C.correlate(res, "one-/few-step", "with")
    assert few.subset == "one-few-step" and all(p.n == 2 and p.reason for p in few.pairs)
    assert len(C.correlate(res, "improved-latent", "with").pairs[0].methods) == 14
    assert len(C.correlate(res, "traditional-latent", "with").pairs[0].methods) == 7


# ------------------------------------------------------------------------------------------------ loading


def test_malformed_lines_warn_with_file_and_line_and_are_skipped(tmp_path):
    store = write_store(tmp_path / "bench.jsonl", [
        rec("a", "imagenet", fid=3.0),
        "{not json",
        {"axis": "t2i", "metrics": {}},
        rec("b", "cifar", fid=1.0),
        rec("c", "imagenet", fid="low"),
        "",
        [1, 2],
        rec("d", "t2i", guidance=None, seed=None, geneval=None),
    ])  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        res = L.load([store], paper=False)
    messages = [str(w.message) for w in caught]
    for line, why in ((2, "not JSON"), (3, "'method'"), (4, "'axis'"), (5, "metric 'fid'"), (7, "JSON object")):
        assert any(m.startswith(f"{store}:{line}: ") and why in m and "skipped" in m for m in messages), (line, messages)
    assert len(messages) == 5
    assert [(r.method, r.source) for r in res] == [("a", f"{store}:1"), ("d", f"{store}:8")]


def test_gaps_are_gaps(tmp_path):
    store = write_store(tmp_path / "s.jsonl", [
        rec("only-imagenet", "imagenet", fid=5.0, **{"is": None}),
        {"method": "no-metrics", "axis": "t2i"},
        rec("nan", "imagenet", fid=float("nan")),
    ])  # fmt: skip
    res = L.load([store], paper=False)
    im = L.table(res, "imagenet", "with")
    assert im["only-imagenet"].metrics == {"fid": 5.0, "is": None} and im["nan"].get("fid") is None
    assert L.table(res, "t2i", "with")["no-metrics"].metrics == {}  # a row of gaps
    md = R.leaderboard_markdown(res)
    assert "| only-imagenet | – | 5.00 |" in md and "| nan | – | – |" in md
    rep = C.correlate(res)
    assert rep.pairs == [] and rep.reason


def test_seeds_average_and_the_newest_step_wins(tmp_path):
    store = write_store(tmp_path / "s.jsonl", [
        {**rec("m", "imagenet", seed=0, fid=10.0), "meta": {"step": 100}},
        {**rec("m", "imagenet", seed=0, fid=4.0), "meta": {"step": 200}},
        {**rec("m", "imagenet", seed=0, fid=99.0), "meta": {"step": 150}},
        rec("m", "imagenet", seed=1, fid=6.0),
        rec("m", "imagenet", guidance=1.0, seed=0, fid=20.0),  # CFG scale 1: without guidance
        rec("m", "imagenet", guidance=4.5, seed=2, fid=8.0),
    ])  # fmt: skip
    res = L.load([store], paper=False)
    row = L.table(res, "imagenet", "with")["m"]
    assert row.seeds == 3 and math.isclose(row.get("fid"), (4.0 + 6.0 + 8.0) / 3)
    assert L.table(res, "imagenet", "without")["m"].get("fid") == 20.0


def test_eval_csv_and_results_jsonl(tmp_path):
    evals = tmp_path / "run" / "evals"
    base = {"config": "nano-xpred", "weights": "ema", "cfg_interval": "0.0-1.0", "sampler_steps": 25}
    # the columns nanogen eval writes (eval/evaluate.py record), through the same CSV writer
    append_csv(evals / "nano-xpred_ema.csv", {"step": 500, **base, "cfg_scale": 3.0, "fid_mnist": 80.0,
                                              "num_samples_mnist": 150, "seconds_mnist": 3.0})  # fmt: skip
    append_csv(evals / "nano-xpred_ema.csv", {"step": 700, **base, "cfg_scale": 3.0, "fid@jit_mnist": 60.0,
                                              "inception_score_mnist": 2.5, "inception_score_std_mnist": 0.1,
                                              "fdr_dinov2_cls_mnist": 7.0, "num_samples_mnist": 150})  # fmt: skip
    append_csv(evals / "nano-xpred_ema.csv", {"step": 700, **base, "cfg_scale": 3.0, "mind_mae_cls_mnist": 0.5,
                                              "num_samples_mnist": 150})  # fmt: skip
    append_csv(evals / "nano-xpred_ema.csv", {"step": 700, **base, "cfg_scale": 1.0, "fid_mnist": 90.0,
                                              "num_samples_mnist": 150})  # fmt: skip
    append_csv(evals / "nano-xpred_model.csv", {"step": 700, **base, "weights": "model", "cfg_scale": 3.0,
                                                "fid_mnist": 70.0, "num_samples_mnist": 150})  # fmt: skip
    t2i = {"time": "2026-01-01T00:00:00", "step": 900, **base, "config": "nano-t2i", "cfg_scale": 4.0,
           "nano_geneval_nano-geneval/overall": 0.4, "nano_geneval_nano-geneval/counting": 0.1,
           "dpgbench_dpg/overall": 81.5, "dpgbench_dpg": 80.0, "num_samples_nano-geneval": 60, "num_samples_dpg": 10,
           "vqascore_clip-flant5-xl_genai": 0.7, "num_samples_genai": 10}  # fmt: skip
    (evals / "results.jsonl").write_text(json.dumps(t2i) + "\n")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')  # a training log: not read
    res = L.load([tmp_path], paper=False)
    im = L.table(res, "imagenet", "with")
    assert im["nano-xpred"].metrics == {"fid": 60.0, "is": 2.5, "fdr_dinov2": 7.0, "mind_mae": 0.5}
    assert im["nano-xpred [model]"].get("fid") == 70.0
    assert L.table(res, "imagenet", "without")["nano-xpred"].get("fid") == 90.0
    t = L.table(res, "t2i", "with")["nano-t2i"]
    assert t.metrics == {"nano_geneval": 0.4, "dpgbench": 0.8, "genaibench": 0.7}  # percent -> fraction
    assert L.table(res, "t2i", "with")["nano-t2i"].sources == [f"{evals / 'results.jsonl'}:1"]


def test_malformed_csv_row_warns(tmp_path):
    f = tmp_path / "x_ema.csv"
    f.write_text("step,config,weights,cfg_scale,fid_mnist,num_samples_mnist\n"
                 "100,x,ema,3.0,12.5,10\n"
                 "oops,x,ema,3.0,11.0,10\n"
                 "200,x,ema,3.0,high,10\n"
                 "300,x,ema,3.0,10.0,10,extra\n")  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        res = L.load([f], paper=False)
    msgs = sorted(str(w.message) for w in caught)
    assert [m.split(": ")[0] for m in msgs] == [f"{f}:3", f"{f}:4", f"{f}:5"]
    assert L.table(res, "imagenet", "with")["x"].get("fid") == 12.5
    bad = tmp_path / "y_ema.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not a nanogen eval CSV"):
        L.load([bad], paper=False)


# ------------------------------------------------------------------------------------------------ output


def small_results(tmp_path):
    store = write_store(tmp_path / "nano.jsonl", [
        {**rec("pixel-vpred", "imagenet", fid=40.0, **{"is": 3.0}), "category": "pixel-space"},
        rec("pixel-vpred", "t2i", nano_geneval=0.30),
        rec("vae", "imagenet", fid=25.0, **{"is": 3.5}), rec("vae", "t2i", nano_geneval=0.45),
        rec("rae", "imagenet", fid=20.0, **{"is": 3.9}), rec("rae", "t2i", nano_geneval=0.50),
        rec("meanflow-1", "imagenet", fid=60.0), rec("meanflow-1", "t2i", nano_geneval=0.1),
        rec("vae", "imagenet", guidance=False, fid=35.0),
        rec("x</script><b>", "imagenet", fid=70.0),
    ])  # fmt: skip
    return store, L.load([store], paper=False)


def test_markdown_and_html(tmp_path):
    _, res = small_results(tmp_path)
    md = R.leaderboard_markdown(res)
    assert "### ImageNet, with CFG (5 methods)" in md and "### ImageNet, without CFG (1 methods)" in md
    assert md.index("| 1 | rae |") < md.index("| 2 | vae |") < md.index("| 3 | pixel-vpred |")
    assert "| 4 | meanflow-1 | one-/few-step | 60.00 | – |" in md
    reports = [C.correlate(res, "all", m) for m in ("with", "without")]
    cm = R.correlation_markdown(reports)
    assert "*negative* coefficient means the two axes agree" in cm and "| FID ↓ | nano GenEval ↑ | 4 |" in cm
    page = R.leaderboard_html(res, reports)
    for el in ('id="guidance-toggle"', 'id="metric-select"', 'id="axis-select"', 'id="leaderboard"', "<tbody>",
               'id="correlation-table"', 'id="status"'):  # fmt: skip
        assert el in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and " src=" not in page
    assert page.count("</script>") == 2  # the method name cannot close the data block
    blob = re.search(r'<script id="leaderboard-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    data = json.loads(blob)
    rows = data["axes"]["imagenet"]["modes"]
    assert [r["method"] for r in rows["with"]][:2] == ["rae", "vae"] and rows["without"][0]["metrics"]["fid"] == 35.0
    assert {m["key"] for m in data["axes"]["imagenet"]["metrics"]} == {"fid", "is"}
    assert "x</script><b>" in [r["method"] for r in rows["with"]]
    assert data["correlations"][0]["pairs"][0]["n"] == 4


def test_scatter_png_is_written_and_not_blank(tmp_path):
    _, res = small_results(tmp_path)
    paths = R.scatter_plots(res, tmp_path, ("with",))
    assert [p.name for p in paths] == ["scatter-with-fid-vs-nano_geneval.png", "scatter-with-is-vs-nano_geneval.png"]
    img = Image.open(paths[0]).convert("RGB")
    assert img.width >= 400 and img.height >= 300
    colors = img.getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 50  # text, points, axes: far from a blank canvas
    px = np.asarray(img)
    orange = np.all(np.abs(px.astype(int) - [0xE6, 0x91, 0x38]) < 12, axis=-1)  # the pixel-space colour
    assert orange.sum() > 20


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_report_end_to_end(tmp_path, capsys):
    store, _ = small_results(tmp_path)
    out = tmp_path / "rep"
    assert main(["report", str(store), "--no-paper", "--out", str(out), "--guidance", "with"]) == 0
    printed = capsys.readouterr().out
    assert "## DiffusionBench leaderboard" in printed and "rank correlations" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["correlations.md", "leaderboard.html", "leaderboard.md", "scatter-with-fid-vs-nano_geneval.png",
                     "scatter-with-is-vs-nano_geneval.png"]  # fmt: skip
    assert (out / "leaderboard.md").read_text() in printed
    assert main(["report", str(store), "--no-paper", "--out", str(out), "--subset", "rae,vae", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["guidance"] for c in doc["correlations"]] == ["with", "without"]
    assert "only 2 methods" in doc["correlations"][0]["pairs"][0]["reason"]


def test_cli_report_of_the_paper(tmp_path, capsys):
    out = tmp_path / "paper"
    assert main(["report", "--out", str(out), "--subset", "pixel-space", "--guidance", "without"]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | DINOv2-B + REG | latent (improved) | 2.08 |" in printed  # the best FID without CFG
    assert "### Text-to-image, guidance not stated (35 methods)" in printed
    assert "### Subset pixel-space, without CFG" in printed
    assert len(list(out.glob("scatter-without-*.png"))) == 6


def test_cli_report_bad_input(tmp_path, capsys):
    one_line_error(capsys, ["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)], "not found")
    one_line_error(capsys, ["report", "--no-paper"], "nothing to report")
    one_line_error(capsys, ["report", "--subset", "nope", "--out", str(tmp_path)], "unknown subset 'nope'")
    (tmp_path / "r.txt").write_text("x")
    one_line_error(capsys, ["report", str(tmp_path / "r.txt"), "--out", str(tmp_path)], "unknown kind '.txt'")
    store = write_store(tmp_path / "s.jsonl", [rec("a", "imagenet", fid=1.0), "{oops"])
    assert main(["report", str(store), "--no-paper", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nanogen: warning: ") and f"{store}:2: not JSON" in err
