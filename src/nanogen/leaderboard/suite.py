"""``nanogen bench --suite nano``: DiffusionBench at nano size, every method family on both axes.

The paper's claim is that ImageNet rankings do not predict text-to-image rankings, so a method is reported on both
axes. The nano suite makes that cheap: it trains each method family on the class-conditional digits (``task: nano``,
scored by FID) and on the compositional T2I digits (``task: nano-t2i``, scored by nano GenEval) with the same
budget per run, and writes every score to one results store that ``nanogen report`` turns into leaderboards and
ImageNet-vs-T2I rank correlations.

A suite is a list of jobs, run in order, each skipped when its output already exists:

1. **stage 1**, the latent spaces the families need, trained here on both tiers' images (``nano-mix``): the nano
   representation encoder (``nanogen train-encoder``), the RAE's ViT decoder and its latent statistics
   (``train-stage1`` + ``compute-stats``), and the nano KL-VAE (``train-stage1``);
2. **train**, one stage-2 run per (method, axis, seed): the method's config in ``configs/bench/nano/`` with
   ``task=nano`` or ``task=nano-t2i`` (the one-line switch), resumed from its checkpoints after an interruption;
3. **eval**, one evaluation per variant of a run (with and without CFG; MeanFlow with 1 and 2 steps), appended to
   ``<out>/results.jsonl`` keyed by method, axis, guidance and seed (the store format of ``leaderboard/results.py``).
   Sample shards are kept, so an evaluation cut short reuses what it finished.

At the end the suite writes one comparison picture per axis (a row of samples per method) and the report
(``<out>/report/``: leaderboard.md, correlations.md, leaderboard.html, scatter plots) and prints the tables.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogen.errors import UserError

CONFIG_DIR = "configs/bench/nano"
AXIS_TASK = {"imagenet": "nano", "t2i": "nano-t2i"}  # the store's axis -> the nano task preset that runs it


# ----------------------------------------------------------------------------------------------- the suite


@dataclass(frozen=True)
class Stage1Job:
    """A latent space a family needs, trained once per suite directory (both axes share it)."""

    key: str
    what: str
    config: str | None  # a stage-1 config in configs/bench/nano/ (None: the encoder, which has its own trainer)
    needs: tuple[str, ...] = ()
    est_s: float = 120.0  # rough wall time on 2 CPU cores, for the ETA before anything was measured


@dataclass(frozen=True)
class Variant:
    """One evaluation of a trained run: a leaderboard row (``method``) with or without guidance."""

    method: str
    guidance: bool
    overrides: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Family:
    """One method family: a config, the stage-1 jobs it needs, its category and its evaluation variants."""

    key: str
    label: str
    config: str
    category: str  # the leaderboard category (latent-space, pixel-space, one-few-step)
    needs: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = ()
    cost: float = 1.0  # training cost per step relative to a plain flow run (MeanFlow's JVP steps cost about 2x)


def _cfg_variants(method: str) -> tuple[Variant, ...]:
    return (Variant(method, True), Variant(method, False, ("guidance.cfg.scale=1.0",)))


@dataclass(frozen=True)
class Suite:
    name: str
    stage1: tuple[Stage1Job, ...]
    families: tuple[Family, ...]
    steps: int  # optimizer steps per stage-2 run (configs/bench/nano/budget.yaml)
    est_step_s: float = 0.4  # one plain training step on 2 CPU cores, for the first ETA
    est_eval_s: dict[str, float] = field(default_factory=dict)

    def stage1_job(self, key: str) -> Stage1Job:
        return next(j for j in self.stage1 if j.key == key)


NANO = Suite(
    name="nano",
    stage1=(
        Stage1Job("nano-encoder", "the nano representation encoder (a small ViT on the digits)", None, est_s=90),
        Stage1Job("nano-rae", "the RAE's ViT decoder (train-stage1) and latent statistics",
                  f"{CONFIG_DIR}/stage1-nano-rae.yaml", needs=("nano-encoder",), est_s=170),
        Stage1Job("nano-vae", "the nano KL-VAE (train-stage1)", f"{CONFIG_DIR}/stage1-nano-vae.yaml", est_s=180),
    ),  # fmt: skip
    families=(
        Family("pixnerd-vpred", "pixel space, v-prediction (PixNerd-style)", f"{CONFIG_DIR}/pixnerd-vpred.yaml",
               "pixel-space", variants=_cfg_variants("Pixel v-pred (PixNerd-style)")),
        Family("jit-xpred", "pixel space, x-prediction (JiT-style)", f"{CONFIG_DIR}/jit-xpred.yaml",
               "pixel-space", variants=_cfg_variants("Pixel x-pred (JiT-style)")),
        Family("nano-vae", "the nano VAE latent space", f"{CONFIG_DIR}/nano-vae.yaml", "latent-space",
               needs=("nano-vae",), variants=_cfg_variants("Nano-VAE")),
        Family("rae-nano", "RAE latent space (nano encoder + ViT decoder)", f"{CONFIG_DIR}/rae-nano.yaml",
               "latent-space", needs=("nano-encoder", "nano-rae"), variants=_cfg_variants("RAE (nano-ViT)")),
        Family("rae-nano-reg", "REG on the RAE latent space", f"{CONFIG_DIR}/rae-nano-reg.yaml", "latent-space",
               needs=("nano-encoder", "nano-rae"), variants=_cfg_variants("RAE (nano-ViT) + REG")),
        Family("meanflow", "MeanFlow, 1 and 2 steps (CFG distilled)", f"{CONFIG_DIR}/meanflow.yaml", "one-few-step",
               variants=(Variant("MeanFlow (NFE=1)", True, ("sampler.num_steps=1",), "CFG distilled"),
                         Variant("MeanFlow (NFE=2)", True, ("sampler.num_steps=2",), "CFG distilled")),
               cost=2.0),
    ),  # fmt: skip
    steps=300,
    est_eval_s={"imagenet": 45.0, "t2i": 26.0},  # measured means (docs/PERFORMANCE.md, issue 9)
)
SUITES = {"nano": NANO}


# ----------------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    kind: str  # stage1 | train | eval
    title: str
    est_s: float
    done: bool = False
    stage1: Stage1Job | None = None
    family: Family | None = None
    axis: str = ""
    seed: int = 0
    variant: Variant | None = None
    detail: str = ""  # shown in the plan's table, not in the one-line header of a running job


@dataclass
class Layout:
    """Where a suite directory keeps everything."""

    root: Path

    @property
    def store(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def state(self) -> Path:
        return self.root / "suite.json"

    def stage1_dir(self, key: str) -> Path:
        return self.root / "stage1" / key

    def stage1_marker(self, key: str) -> Path:
        return self.root / "stage1" / f"{key}.done.json"

    def run_name(self, family: Family, seed: int) -> str:
        return f"{family.key}-seed{seed}"

    def run_dir(self, family: Family, axis: str, seed: int) -> Path:
        return self.root / "runs" / axis / self.run_name(family, seed)

    def samples_dir(self, family: Family, axis: str, seed: int, variant: Variant) -> Path:
        return self.run_dir(family, axis, seed) / "eval-samples" / _slug(variant.method, variant.guidance)

    @property
    def encoder_dir(self) -> Path:
        return self.stage1_dir("nano-encoder")

    @property
    def vae_export(self) -> Path:
        return self.stage1_dir("nano-vae") / "export"

    def rae_files(self) -> dict[str, str]:
        marker = self.stage1_marker("nano-rae")
        return json.loads(marker.read_text()) if marker.exists() else {}


def _slug(method: str, guidance: bool) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in method.lower())
    return "-".join(p for p in keep.split("-") if p) + ("-cfg" if guidance else "-nocfg")


def store_keys(path: Path) -> set[tuple[str, str, bool, int]]:
    """(method, axis, guidance, seed) of every record already in a store."""
    from nanogen.leaderboard.results import Malformed, parse_record

    keys = set()
    if not path.exists():
        return keys
    for line in path.read_text().splitlines():
        try:
            r = parse_record(json.loads(line))  # the report's own reader: what it cannot read is not done
        except (ValueError, Malformed):
            continue  # nanogen report names malformed lines as file:line; here they simply do not count as done
        if r.guidance is not None and r.seed is not None:
            keys.add((r.method, r.axis, r.guidance, r.seed))
    return keys


def final_checkpoint(run_dir: Path, steps: int) -> Path | None:
    from nanogen import checkpoint as ckpt

    found = [p for s, p in ckpt.list_checkpoints(run_dir / "checkpoints") if s >= steps]
    return found[-1] if found else None


def plan(suite: Suite, layout: Layout, families: list[Family], axes: list[str], seeds: list[int], steps: int) -> list[Job]:
    """Every job of the selection, in run order, marked done where its output exists."""
    needed = {n for f in families for n in f.needs}
    for key in list(needed):
        needed |= set(suite.stage1_job(key).needs)
    jobs = [
        Job("stage1", f"stage 1 · {j.key}", j.est_s, done=layout.stage1_marker(j.key).exists(), stage1=j, detail=j.what)
        for j in suite.stage1 if j.key in needed
    ]  # fmt: skip
    have = store_keys(layout.store)
    for seed in seeds:
        for axis in axes:
            for f in families:
                tail = f" · seed {seed}" if len(seeds) > 1 else ""
                evals = [
                    Job("eval", f"eval · {v.method} · {axis} · {v.note or ('CFG' if v.guidance else 'no CFG')}{tail}",
                        suite.est_eval_s.get(axis, 40.0), done=(v.method, axis, v.guidance, seed) in have,
                        family=f, axis=axis, seed=seed, variant=v)
                    for v in f.variants
                ]  # fmt: skip
                trained = final_checkpoint(layout.run_dir(f, axis, seed), steps) is not None
                jobs.append(Job("train", f"train · {f.key} · {axis} · {steps} steps{tail}",
                                steps * suite.est_step_s * f.cost, done=trained or all(e.done for e in evals),
                                family=f, axis=axis, seed=seed, detail=f.label))  # fmt: skip
                jobs.extend(evals)
    return jobs


# ----------------------------------------------------------------------------------------------- configs


def stage2_overrides(layout: Layout, family: Family, axis: str, seed: int, steps: int, extra: list[str]) -> list[str]:
    """The overrides that place one run in the suite directory and point it at the suite's own latent spaces."""
    out = [
        f"task={AXIS_TASK[axis]}",
        f"run.results_dir={layout.root / 'runs' / axis}",
        f"run.name={layout.run_name(family, seed)}",
        f"training.global_seed={seed}",
        f"training.max_steps={steps}",
        f"training.scheduler.decay_end_steps={steps}",
    ]
    if "nano-vae" in family.needs:
        out.append(f"misc.weights.nano-vae={layout.vae_export}")
    if "nano-encoder" in family.needs:
        out.append(f"misc.weights.nano-vit-s={layout.encoder_dir}")
    if "nano-rae" in family.needs:
        files = layout.rae_files()
        out += [f"stage_1.params.pretrained_decoder_path={files.get('decoder', '')}",
                f"stage_1.params.normalization_stat_path={files.get('stats', '')}"]  # fmt: skip
    return out + list(extra)


def load_stage2(family: Family, overrides: list[str]):
    from nanogen.config import load_config

    return load_config(family.config, overrides)


# ----------------------------------------------------------------------------------------------- running


def run_stage1(job: Stage1Job, layout: Layout) -> dict[str, Any]:
    """Train one latent space into ``<out>/stage1/<key>``; returns what the marker file records."""
    from nanogen.config import load_stage1_config

    out_dir = layout.stage1_dir(job.key)
    if job.key == "nano-encoder":
        from nanogen.encoders.nano import train_nano_encoder

        path = train_nano_encoder(out_dir)
        return {"encoder": str(path)}
    overrides = [f"run.results_dir={out_dir.parent}", f"run.name={job.key}"]
    if "nano-encoder" in job.needs:
        overrides.append(f"misc.weights.nano-vit-s={layout.encoder_dir}")
    assert job.config is not None
    cfg = load_stage1_config(job.config, overrides)
    from nanogen.stage1.train import train_stage1

    res = train_stage1(cfg)
    record: dict[str, Any] = {"export": str(res.export_dir), "evals": res.evals}
    if job.key == "nano-rae":  # §6.4: the per-element statistics of the raw latents, for stage 2's normalisation
        from nanogen.latents.extract import run_compute_stats

        record["decoder"] = str(Path(str(res.export_dir)) / "decoder.pt")
        record["stats"] = str(run_compute_stats(job.config, overrides, out=str(out_dir / "stats.pt")))
    return record


def run_train(suite: Suite, job: Job, layout: Layout, steps: int, extra: list[str]) -> None:
    from nanogen.train import train

    assert job.family is not None
    cfg = load_stage2(job.family, stage2_overrides(layout, job.family, job.axis, job.seed, steps, [*extra, "eval=null"]))
    train(cfg)


def run_eval(suite: Suite, job: Job, layout: Layout, steps: int, extra: list[str]) -> dict[str, Any]:
    """Evaluate a run's final EMA weights with one variant's settings and append the record to the store."""
    from nanogen.eval.evaluate import check_metrics, evaluate_checkpoint
    from nanogen.leaderboard.results import eval_results
    from nanogen.log import is_main

    f, v = job.family, job.variant
    assert f is not None and v is not None
    cfg = load_stage2(f, stage2_overrides(layout, f, job.axis, job.seed, steps, [*extra, *v.overrides]))
    check_metrics(cfg)
    ckpt_path = final_checkpoint(layout.run_dir(f, job.axis, job.seed), steps)
    if ckpt_path is None:
        raise UserError(f"bench: no final checkpoint in {layout.run_dir(f, job.axis, job.seed)}; rerun the suite to train it")
    t0 = time.perf_counter()
    res = evaluate_checkpoint(cfg, str(ckpt_path), seed=job.seed, samples_dir=layout.samples_dir(f, job.axis, job.seed, v),
                              tag=f" [{v.method}, {job.axis}]")  # fmt: skip
    row = {"step": steps, "config": f.key, "cfg_scale": cfg.guidance.cfg.scale, "sampler_steps": cfg.sampler.num_steps, **res}
    found = [r for r in eval_results(row) if r.axis == job.axis]
    metrics = found[0].metrics if found else {}
    parts = {k: v_ for k, v_ in res.items() if "/" in k and not k.endswith("/overall")}  # e.g. GenEval per category
    record = {
        "method": v.method, "axis": job.axis, "guidance": v.guidance, "seed": job.seed, "metrics": metrics,
        "category": f.category,
        "meta": {"suite": suite.name, "family": f.key, "config": f.config, "task": AXIS_TASK[job.axis], "step": steps,
                 "batch_size": cfg.training.batch_size, "cfg_scale": cfg.guidance.cfg.scale if v.guidance else 1.0,
                 "guidance_note": v.note, "sampler_steps": cfg.sampler.num_steps, "parts": parts,
                 "eval_seconds": round(time.perf_counter() - t0, 1), "checkpoint": str(ckpt_path),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }  # fmt: skip
    if is_main():
        layout.store.parent.mkdir(parents=True, exist_ok=True)
        with open(layout.store, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    return record


# ----------------------------------------------------------------------------------------------- pictures


def comparison_grid(suite: Suite, layout: Layout, axis: str, seed: int, n: int = 10) -> Path | None:
    """``<out>/samples-<axis>.png``: one row per leaderboard method (its first ``n`` evaluation samples; with CFG
    where the method has both), the method written at the left. The same sample indices, hence the same noise and
    the same classes or prompts, in every row."""
    import numpy as np
    import torch

    from nanogen.viz import save_captioned_grid

    rows, labels = [], []
    for f in suite.families:
        for v in f.variants:
            if not v.guidance:
                continue
            shards = sorted(layout.samples_dir(f, axis, seed, v).glob("*/shard-*.npz"))
            if not shards:
                continue
            with np.load(shards[0]) as z:
                images = z["arr_0"][:n]
            rows.append(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
            labels.append(v.method)
    n = min((len(r) for r in rows), default=0)  # a set smaller than n (tiny test configs): the common prefix
    if n == 0:
        return None
    grid = torch.cat([r[:n] for r in rows])
    return save_captioned_grid(grid, labels, layout.root / f"samples-{axis}.png", nrow=n, scale=2)


# ----------------------------------------------------------------------------------------------- the command


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def check_state(layout: Layout, identity: dict[str, Any]) -> None:
    """A suite directory holds one budget: scores of another budget would mix into one leaderboard."""
    if not layout.state.exists():
        return
    try:
        saved = json.loads(layout.state.read_text()).get("identity", {})
    except ValueError:
        return
    diff = [k for k in identity if k in saved and saved[k] != identity[k]]
    if diff:
        said = ", ".join(f"{k} {saved[k]!r} (now {identity[k]!r})" for k in diff)
        raise UserError(
            f"bench: {layout.root} holds a suite run with {said}; rerun with the same settings to resume it, "
            f"or pass --out NEW_DIR for a new suite"
        )


def write_state(layout: Layout, identity: dict[str, Any], timings: dict[str, float]) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    tmp = layout.state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"identity": identity, "timings": timings}, indent=2) + "\n")
    tmp.replace(layout.state)


def select(suite: Suite, methods: str | None, axes: str | None) -> tuple[list[Family], list[str]]:
    fams = list(suite.families)
    if methods:
        keys = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [k for k in keys if k not in {f.key for f in suite.families}]
        if unknown:
            raise UserError(f"bench --methods: unknown method(s) {', '.join(unknown)}; the {suite.name} suite has "
                            + ", ".join(f.key for f in suite.families))  # fmt: skip
        fams = [f for f in suite.families if f.key in keys]
    ax = list(AXIS_TASK)
    if axes:
        ax = [a.strip() for a in axes.split(",") if a.strip()]
        bad = [a for a in ax if a not in AXIS_TASK]
        if bad:
            raise UserError(f"bench --axes: unknown axis {', '.join(bad)}; use imagenet, t2i or imagenet,t2i")
    return fams, ax


def run_suite(
    suite_name: str | Suite,
    out: str | Path,
    methods: str | None = None,
    axes: str | None = None,
    seeds: list[int] | None = None,
    steps: int | None = None,
    overrides: list[str] | None = None,
    dry_run: bool = False,
    report: bool = True,
) -> int:
    from rich.console import Console
    from rich.table import Table

    if isinstance(suite_name, Suite):
        suite = suite_name  # a suite built in code (tests, custom studies)
    elif suite_name in SUITES:
        suite = SUITES[suite_name]
    else:
        raise UserError(f"bench --suite: unknown suite '{suite_name}'; available: {', '.join(SUITES)}")
    families, axes_ = select(suite, methods, axes)
    seeds = seeds or [0]
    steps = suite.steps if steps is None else steps
    if steps < 1:
        raise UserError(f"bench --steps: must be a positive number of optimizer steps, got {steps}")
    extra = list(overrides or [])
    layout = Layout(Path(out).expanduser())
    identity = {"suite": suite.name, "steps": steps, "overrides": extra}
    check_state(layout, identity)
    # Check every config before hours of work: a bad override fails here, in one line.
    for f in families:
        for axis in axes_:
            load_stage2(f, stage2_overrides(layout, f, axis, seeds[0], steps, extra))

    console = Console(highlight=False)
    jobs = plan(suite, layout, families, axes_, seeds, steps)
    todo = [j for j in jobs if not j.done]
    table = Table(title=f"nanogen bench --suite {suite.name}: {len(jobs)} jobs, {len(todo)} to run ({layout.root})",
                  header_style="bold")  # fmt: skip
    table.add_column("#", justify="right")
    table.add_column("job")
    table.add_column("status")
    for i, j in enumerate(jobs, 1):
        title = f"{j.title} ({j.detail})" if j.detail else j.title
        table.add_row(str(i), title, "[green]done[/]" if j.done else f"~{_fmt_s(j.est_s)}")
    console.print(table)
    console.print(f"estimated time for what is left: ~{_fmt_s(sum(j.est_s for j in todo))} on 2 CPU cores "
                  f"(the same command resumes an interrupted suite)")  # fmt: skip
    if dry_run:
        return 0

    timings: dict[str, float] = {}
    if layout.state.exists():
        try:
            timings = json.loads(layout.state.read_text()).get("timings", {})
        except ValueError:
            timings = {}
    write_state(layout, identity, timings)
    t_suite = time.time()
    measured: dict[str, list[float]] = {}  # kind -> seconds per estimated second, to correct the ETA as we go
    for n, job in enumerate(todo, 1):
        ratio = [r for rs in measured.values() for r in rs]
        scale = sum(ratio) / len(ratio) if ratio else 1.0
        left = sum(j.est_s for j in todo[n - 1 :]) * scale
        console.rule(f"[bold]bench {suite.name} [{n}/{len(todo)}][/] {job.title}  ·  "
                     f"{_fmt_s(time.time() - t_suite)} elapsed, ~{_fmt_s(left)} left")  # fmt: skip
        t0 = time.time()
        if job.kind == "stage1":
            assert job.stage1 is not None
            record = run_stage1(job.stage1, layout)
            record["seconds"] = round(time.time() - t0, 1)
            marker = layout.stage1_marker(job.stage1.key)
            marker.write_text(json.dumps(record, indent=2, default=str) + "\n")
        elif job.kind == "train":
            run_train(suite, job, layout, steps, extra)
        else:
            rec = run_eval(suite, job, layout, steps, extra)
            console.print(f"  -> {rec['method']} · {rec['axis']}: "
                          + ", ".join(f"{k} {v:.4g}" for k, v in rec["metrics"].items() if v is not None))  # fmt: skip
        took = time.time() - t0
        measured.setdefault(job.kind, []).append(took / max(job.est_s, 1e-9))
        timings[job.title] = round(took, 1)
        write_state(layout, identity, timings)
    console.rule(f"[bold]bench {suite.name}: {len(todo)} jobs in {_fmt_s(time.time() - t_suite)}")
    for axis in axes_:
        for seed in seeds:
            pic = comparison_grid(suite, layout, axis, seed)
            if pic:
                console.print(f"samples ({axis}, one row per method, the same noise and conditions): {pic}")
    if report and layout.store.exists():
        from nanogen.leaderboard.report import write_report

        console.rule("[bold]DiffusionBench nano: leaderboards and ImageNet-vs-T2I correlations")
        write_report([str(layout.store)], layout.root / "report", paper=False)
    return 0
