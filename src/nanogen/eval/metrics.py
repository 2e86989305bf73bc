"""Generation metrics by name: what each needs, how it accumulates, how it reduces over processes
(spec ``evaluation.md`` §1-3, §7; reference.md §8).

A dataset entry's ``metrics`` list picks them:

==============================  ==================================================================================
``fid``                         FID against the entry's ``reference_npz`` (or, for a built-in set, statistics of
                                its held-out images); key ``fid_<set>``
``fid@jit`` / ``fid@adm``       FID against a named published reference in the entry's ``data_dir`` (refstats.py)
``inception_score``             IS with the paper's convention (seed-0 permutation, 10 splits); ``@torch-fidelity``
                                and ``@adm`` pick the other conventions (isc.py)
``precision_recall``            Kynkäänniemi et al. with k = 3 on Inception pool3 against ``reference_images``
                                (ADM: the 10k images of its reference batch); keys ``precision_<set>``, ``recall_<set>``
``fd_<ext>`` / ``fdr_<ext>``    Fréchet distance in one of the six representation spaces, raw or divided by the
                                space's val-FD constant; ``fdr6`` = mean of the six FDr (representations.py)
``mind_<ext>`` / ``mind6``      sliced-Wasserstein MIND against ``reference_images`` features (mind.py); ``mind6``
                                reports the six values (there is no aggregate, as in the reference)
``geneval``, ``dpgbench``,      the text-to-image benchmarks (eval/t2i/); per-image scores, summed per key and
``vqascore[_<model>]``,         all-reduced; options per metric come from the entry's ``options``
``clipscore[@<convention>]``
``nano_geneval``                GenEval's rules with an exact detector on the nano scenes (nano_geneval.py)
==============================  ==================================================================================

Every metric sees each generated batch once, after the features it ``needs`` were extracted (once per
extractor per batch, shared by all metrics). Moments and score sums reduce exactly across processes;
feature sets (MIND, precision/recall) are gathered and scored on rank 0.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from nanogen import parallel
from nanogen.config.schema import EvalDatasetConfig
from nanogen.errors import UserError
from nanogen.eval import refstats
from nanogen.eval.fid import GaussianMoments, check_sample_count, frechet_distance
from nanogen.eval.isc import CONVENTIONS, InceptionScoreState

INCEPTION = "inception"  # feature stream: pool3 (+ unbiased logits when the weights have the head)
PROMPT_METRICS = ("geneval", "dpgbench", "vqascore", "clipscore", "nano_geneval")
NANO_GENEVAL_SET = "nano-geneval"  # the built-in prompt set of the nano T2I tier (data/nano_scenes.py)


def cache_dir() -> Path:
    """$NANOGEN_CACHE (default ~/.cache/nanogen): reference features, the text cache, the nano classifier."""
    return Path(os.environ.get("NANOGEN_CACHE", Path.home() / ".cache" / "nanogen")).expanduser()


@dataclass
class Context:
    """What a metric may need to know about the set it scores."""

    name: str  # the eval dataset's key
    ds: EvalDatasetConfig
    num_samples: int
    image_size: int
    info: parallel.DistInfo
    items: list[tuple[str, dict]] = field(default_factory=list)  # (prompt, metadata) per sample, text sets
    reference_images: Callable[[], Tensor] | None = None  # uint8 reference images (built-in sets), lazily


class Metric:
    needs: tuple[str, ...] = ()

    def update(self, feats: dict[str, Tensor], images: Tensor, idx: list[int]) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        """Collective: every process calls it; every process gets the numbers."""
        raise NotImplementedError


# --------------------------------------------------------------------------- names


def split_name(metric: str) -> tuple[str, str | None]:
    """'fid@adm' -> ('fid', 'adm'); 'fdr_convnext' -> ('fdr', 'convnext'); 'vqascore_clip-flant5-xxl' -> ..."""
    if "@" in metric:
        base, variant = metric.split("@", 1)
        return base, variant
    for prefix in ("fd_", "fdr_", "mind_", "vqascore_"):
        if metric.startswith(prefix):
            return prefix[:-1], metric[len(prefix) :]
    return metric, None


def _extractor_keys() -> tuple[str, ...]:
    from nanogen.eval.representations import REPRESENTATIONS

    return tuple(REPRESENTATIONS)


def known(metric: str) -> bool:
    base, variant = split_name(metric)
    if base == "fid":
        return variant is None or variant in refstats.PRESETS
    if base == "inception_score":
        return variant is None or variant in CONVENTIONS
    if base in ("fd", "fdr", "mind"):
        return variant in _extractor_keys()
    if base in ("fdr6", "mind6", "precision_recall", "geneval", "dpgbench", "nano_geneval"):
        return variant is None
    return base in ("vqascore", "clipscore")


METRIC_HELP = (
    "fid, fid@jit, fid@adm, inception_score[@torch-fidelity|@adm], precision_recall, fd_<ext>, fdr_<ext>, fdr6, "
    "mind_<ext>, mind6, geneval, dpgbench, vqascore[_<model>], clipscore[@rawcos|@torchmetrics|@hessel], nano_geneval"
)


def check(name: str, ds: EvalDatasetConfig, text: bool) -> None:
    """Cheap checks before any work: names exist, files are there, the metric suits the set."""
    where = f"eval.datasets.{name}.metrics"
    for m in ds.metrics:
        if not known(m):
            raise UserError(f"{where}: unknown metric '{m}' (known: {METRIC_HELP})")
        base, variant = split_name(m)
        if base in PROMPT_METRICS and not text:
            raise UserError(f"{where}: '{m}' scores images against prompts; use it on a text set (condition_type: text)")
        if base == "nano_geneval" and (ds.target or name) != NANO_GENEVAL_SET:
            raise UserError(f"{where}: nano_geneval scores the built-in '{NANO_GENEVAL_SET}' prompt set; set eval.datasets.{name}.target={NANO_GENEVAL_SET}")
        if base == "fid" and variant is None and ds.type != "builtin":
            if not ds.reference_npz:
                raise UserError(f"eval.datasets.{name}.reference_npz: 'fid' on '{name}' needs reference statistics (mu, sigma); or use fid@jit / fid@adm")
            refstats.load(ds.reference_npz, what=f"eval.datasets.{name}.reference_npz")
        if base == "inception_score":
            from nanogen.eval.inception import inception_head_missing_message, torch_fidelity_path

            if ds.num_samples < 10:
                raise UserError(f"eval.datasets.{name}.num_samples: '{m}' splits the samples 10 ways; use at least 10 (papers: 50,000)")
            if torch_fidelity_path() is None:
                raise UserError(f"{where}: '{m}': {inception_head_missing_message()}")
        if base == "fid" and variant is not None:
            refstats.load(refstats.preset_path(variant, ds.data_dir), what=f"{where}: {m}", fetch=refstats.PRESETS[variant].fetch)
        if base in ("precision_recall", "mind", "mind6") and ds.type != "builtin":
            if not ds.reference_images:
                raise UserError(f"eval.datasets.{name}.reference_images: '{m}' compares with real images; set it to an image folder or a uint8 .npz (e.g. imagenet-256-val.npz)")
            if not Path(ds.reference_images).expanduser().exists():
                raise UserError(f"eval.datasets.{name}.reference_images: '{ds.reference_images}' not found")
        if base in ("fd", "fdr", "fdr6") and ds.type != "builtin":
            from nanogen.eval.representations import REPRESENTATIONS

            keys = list(REPRESENTATIONS) if base == "fdr6" else [variant]
            for k in keys:
                path = fdr_stats_path(ds, k)
                if not path.is_file():
                    raise UserError(f"eval.datasets.{name}: '{m}' needs {path}; fetch it with nanogen prepare --data fid-stats (or set eval.datasets.{name}.stats_dir)")
        if base in ("fd", "fdr", "fdr6") and ds.type == "builtin":
            raise UserError(f"{where}: '{m}' needs published reference statistics, which the built-in set '{name}' has none of; use fid or mind_<ext>")


def fdr_stats_path(ds: EvalDatasetConfig, key: str) -> Path:
    from nanogen.eval.representations import REPRESENTATIONS

    return Path(ds.stats_dir or Path(ds.data_dir) / "fd-stats").expanduser() / REPRESENTATIONS[key].stats_file


# --------------------------------------------------------------------------- distribution metrics


class FID(Metric):
    needs = (INCEPTION,)

    def __init__(self, ctx: Context, variant: str | None, reference: Callable[[], GaussianMoments | refstats.ReferenceStats]):
        self.ctx, self.key = ctx, f"fid{'@' + variant if variant else ''}_{ctx.name}"
        self.moments = GaussianMoments.empty(2048)
        self.reference = reference

    def update(self, feats, images, idx):
        self.moments.update(feats[INCEPTION])

    def result(self):
        gen = self.moments.reduce(parallel.all_reduce_sum, self.ctx.info.device)
        check_sample_count(gen.n, self.key)
        ref = self.reference()
        mu, sigma = ref.mean_cov() if isinstance(ref, GaussianMoments) else (ref.mu, ref.sigma)
        return {self.key: frechet_distance(*gen.mean_cov(), mu, sigma)}


class InceptionScore(Metric):
    needs = (INCEPTION + ":logits",)

    def __init__(self, ctx: Context, variant: str | None):
        self.ctx = ctx
        self.key = f"inception_score{'@' + variant if variant else ''}_{ctx.name}"
        self.state = InceptionScoreState.create(ctx.num_samples, convention=variant or "diffusionbench")  # type: ignore[arg-type]

    def update(self, feats, images, idx):
        self.state.update(feats[INCEPTION + ":logits"], idx)

    def result(self):
        self.state.reduce(parallel.all_reduce_sum, self.ctx.info.device)
        mean, std = self.state.compute()
        return {self.key: mean, self.key.replace("inception_score", "inception_score_std", 1): std}


class _FeatureSet(Metric):
    """Keeps this process's features by global index; ``gathered()`` returns all of them in index order."""

    def __init__(self, ctx: Context, stream: str):
        self.ctx, self.stream = ctx, stream
        self.feats: list[Tensor] = []
        self.index: list[int] = []
        self.needs = (stream,)

    def update(self, feats, images, idx):
        self.feats.append(feats[self.stream].float().cpu())
        self.index += idx

    def gathered(self) -> Tensor:
        dev = self.ctx.info.device
        f = torch.cat(self.feats) if self.feats else torch.zeros(0, _stream_dim(self.stream))  # a rank with no samples
        all_f = parallel.gather_rows(f.to(dev)).cpu()
        all_i = parallel.gather_rows(torch.tensor(self.index, dtype=torch.long, device=dev)).cpu()
        return all_f[torch.argsort(all_i)]


def _stream_dim(stream: str) -> int:
    if stream == INCEPTION:
        return 2048
    from nanogen.eval.representations import REPRESENTATIONS

    return REPRESENTATIONS[stream.removeprefix("repr:")].dim


class PrecisionRecall(_FeatureSet):
    def __init__(self, ctx: Context, reference: Callable[[], Tensor]):
        super().__init__(ctx, INCEPTION)
        self.reference = reference

    def result(self):
        from nanogen.eval.prc import precision_recall

        fake = self.gathered()
        out = None
        if self.ctx.info.is_main:
            p, r = precision_recall(self.reference(), fake, k=3)
            out = {f"precision_{self.ctx.name}": float(p), f"recall_{self.ctx.name}": float(r)}
        return parallel.broadcast_object(out)  # type: ignore[return-value]


class MIND(_FeatureSet):
    def __init__(self, ctx: Context, ext: str, reference: Callable[[], Tensor]):
        super().__init__(ctx, INCEPTION if ext == "inception" else f"repr:{ext}")
        self.ext, self.reference = ext, reference

    def result(self):
        from nanogen.eval.mind import mind

        fake = self.gathered()
        out = None
        if self.ctx.info.is_main:
            out = {f"mind_{self.ext}_{self.ctx.name}": float(mind(fake, self.reference()))}
        return parallel.broadcast_object(out)  # type: ignore[return-value]


class FDr(Metric):
    """Fréchet distance in one representation space against its published statistics; reports fd and fdr."""

    def __init__(self, ctx: Context, ext: str):
        from nanogen.eval.representations import REPRESENTATIONS

        self.ctx, self.ext = ctx, ext
        self.needs = (INCEPTION if ext == "inception" else f"repr:{ext}",)
        self.moments = GaussianMoments.empty(REPRESENTATIONS[ext].dim)

    def update(self, feats, images, idx):
        self.moments.update(feats[self.needs[0]])

    def result(self):
        from nanogen.eval.representations import fdr

        gen = self.moments.reduce(parallel.all_reduce_sum, self.ctx.info.device)
        check_sample_count(gen.n, f"fd_{self.ext}_{self.ctx.name}", gen.dim)
        ref = refstats.load(fdr_stats_path(self.ctx.ds, self.ext), dim=gen.dim, what=f"fd_{self.ext} reference", fetch="nanogen prepare --data fid-stats")
        fd = frechet_distance(*gen.mean_cov(), ref.mu, ref.sigma)
        return {f"fd_{self.ext}_{self.ctx.name}": fd, f"fdr_{self.ext}_{self.ctx.name}": fdr(fd, self.ext)}


class FDr6(Metric):
    """The six FD_r spaces and their mean ``fdr6_<set>`` (reported only when all six are finite, as the
    reference does; the six values are reported either way)."""

    def __init__(self, ctx: Context):
        self.ctx, self.parts = ctx, [FDr(ctx, k) for k in _extractor_keys()]
        self.needs = tuple(dict.fromkeys(p.needs[0] for p in self.parts))

    def update(self, feats, images, idx):
        for p in self.parts:
            p.update(feats, images, idx)

    def result(self):
        from nanogen.eval.representations import fdr6

        out: dict[str, float] = {}
        for p in self.parts:
            out.update(p.result())
        out[f"fdr6_{self.ctx.name}"] = fdr6({p.ext: out[f"fdr_{p.ext}_{self.ctx.name}"] for p in self.parts})
        return out


class PromptScores(Metric):
    """Adapter for the text-to-image metrics (eval/t2i/): per-image contributions summed per key."""

    def __init__(self, ctx: Context, metric, label: str):
        self.ctx, self.metric, self.label = ctx, metric, label
        self.sums = torch.zeros(len(metric.keys), 2, dtype=torch.float64)
        self.pos = {k: i for i, k in enumerate(metric.keys)}

    def update(self, feats, images, idx):
        prompts = [self.ctx.items[i][0] for i in idx]
        meta = [self.ctx.items[i][1] for i in idx]
        for contrib in self.metric.score(images, prompts, meta):
            for k, v in contrib.items():
                self.sums[self.pos[k]] += torch.tensor([float(v), 1.0], dtype=torch.float64)

    def result(self):
        sums = parallel.all_reduce_sum(self.sums.to(self.ctx.info.device)).cpu()
        summary = self.metric.summarize({k: (float(s), float(c)) for k, (s, c) in zip(self.metric.keys, sums.tolist(), strict=True)})
        return {_with_set(k, self.ctx.name): v for k, v in summary.items()}


def _with_set(key: str, name: str) -> str:
    """'geneval/overall' -> 'geneval_<set>/overall'; 'clipscore_rawcos' -> 'clipscore_rawcos_<set>'."""
    head, sep, tail = key.partition("/")
    return f"{head}_{name}{sep}{tail}"


# --------------------------------------------------------------------------- references


def _cached_features(tag: str, key: dict, compute: Callable[[], Tensor]) -> Tensor:
    """Reference features, computed once per (extractor, file, count) and kept under $NANOGEN_CACHE."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / "features" / f"{tag}-{digest}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu")
        except Exception:
            path.unlink(missing_ok=True)
    feats = compute()
    from nanogen.checkpoint import save

    save(path, feats)
    return feats


def _file_key(path: str) -> dict:
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime": int(st.st_mtime)}


def reference_features(ctx: Context, stream: str, extract: Callable[[Tensor], Tensor], extractor_id: str, limit: int | None = None) -> Tensor:
    """Features of the set's real images (``reference_images``, or a built-in set's held-out images)."""

    def from_batches(batches) -> Tensor:
        from nanogen.log import progress

        out = []
        with progress(None, f"reference features ({stream})", unit="img", leave=False) as bar:
            for b in batches:
                out.append(extract(b.to(ctx.info.device)).float().cpu())
                bar.update(len(b))
        return torch.cat(out)

    if ctx.reference_images is not None:
        images = ctx.reference_images()
        key = {"builtin": ctx.name, "split": ctx.ds.split, "n": len(images), "size": ctx.image_size, "extractor": extractor_id}
        return _cached_features(f"{ctx.name}-{stream.replace(':', '-')}", key, lambda: from_batches(images.split(100)))
    from nanogen.eval.image_sources import ImageSource

    src = ImageSource(ctx.ds.reference_images)  # type: ignore[arg-type]
    n = min(len(src), limit) if limit else len(src)
    key = {**_file_key(ctx.ds.reference_images), "n": n, "extractor": extractor_id}  # type: ignore[arg-type]
    return _cached_features(f"ref-{stream.replace(':', '-')}", key, lambda: from_batches(src.batches(100, 0, n)))


# --------------------------------------------------------------------------- building


def build(ctx: Context, streams: FeatureStreams) -> list[Metric]:
    """The metric objects of one eval set (models are loaded here, before sampling starts)."""
    ds, out = ctx.ds, []
    for m in ds.metrics:
        base, variant = split_name(m)
        if base == "fid":
            out.append(FID(ctx, variant, _fid_reference(ctx, variant, streams)))
        elif base == "inception_score":
            streams.require_logits()
            out.append(InceptionScore(ctx, variant))
        elif base == "precision_recall":
            out.append(PrecisionRecall(ctx, lambda: reference_features(ctx, INCEPTION, streams.inception, streams.inception.extractor_id)))
        elif base in ("fd", "fdr"):
            out.append(FDr(ctx, variant))  # type: ignore[arg-type]
        elif base == "fdr6":
            out.append(FDr6(ctx))
        elif base in ("mind", "mind6"):
            for ext in [variant] if base == "mind" else list(_extractor_keys()):
                stream = INCEPTION if ext == "inception" else f"repr:{ext}"
                out.append(MIND(ctx, ext, _mind_reference(ctx, stream, streams)))  # type: ignore[arg-type]
        else:
            out.append(PromptScores(ctx, _prompt_metric(base, variant, ctx), m))
    for metric in out:
        for s in metric.needs:
            streams.require(s)
    return out


def _fid_reference(ctx: Context, variant: str | None, streams: FeatureStreams):
    ds = ctx.ds
    if variant is not None:
        path = refstats.preset_path(variant, ds.data_dir)
        return lambda: _checked(refstats.load(path, dim=2048, what=f"fid@{variant} reference"), streams)
    if ds.type == "builtin":
        return lambda: builtin_moments(ctx, streams)
    return lambda: _checked(refstats.load(ds.reference_npz, dim=2048, what=f"eval.datasets.{ctx.name}.reference_npz"), streams)  # type: ignore[arg-type]


def _checked(ref: refstats.ReferenceStats, streams: FeatureStreams) -> refstats.ReferenceStats:
    ref.check_compatible(streams.inception.extractor_id, "FID reference")
    return ref


def _mind_reference(ctx: Context, stream: str, streams: FeatureStreams) -> Callable[[], Tensor]:
    def load() -> Tensor:
        extractor = streams.extractor(stream)
        return reference_features(ctx, stream, extractor, extractor.extractor_id)

    return load


def builtin_moments(ctx: Context, streams: FeatureStreams) -> GaussianMoments:
    """Inception moments of a built-in set's class-balanced held-out images (cached)."""
    assert ctx.reference_images is not None
    feats = reference_features(ctx, INCEPTION, streams.inception, streams.inception.extractor_id)
    mom = GaussianMoments.empty(feats.shape[1])
    mom.update(feats.double())
    return mom


def _prompt_metric(base: str, variant: str | None, ctx: Context):
    opts = dict(ctx.ds.options.get(base, {}))
    dev = ctx.info.device
    if base == "geneval":
        from nanogen.eval.t2i.geneval import GenEvalMetric

        return GenEvalMetric(dev, **opts)
    if base == "dpgbench":
        from nanogen.eval.t2i.dpg import DPGMetric

        return DPGMetric(dev, **opts)
    if base == "vqascore":
        from nanogen.eval.t2i.vqascore import VQAScoreMetric

        return VQAScoreMetric(dev, **({"model": variant} if variant else {}), **opts)
    if base == "clipscore":
        from nanogen.eval.t2i.clipscore import CLIPScoreMetric

        return CLIPScoreMetric(dev, **({"convention": variant} if variant else {}), **opts)
    if base == "nano_geneval":
        from nanogen.eval.nano_geneval import NanoGenEvalMetric

        return NanoGenEvalMetric(dev)
    raise AssertionError(base)


# --------------------------------------------------------------------------- features


class FeatureStreams:
    """Loads each feature extractor once and runs it once per batch for all metrics that need it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wanted: set[str] = set()
        self._extractors: dict[str, torch.nn.Module] = {}
        self._logits = False

    @property
    def inception(self):
        if INCEPTION not in self._extractors:
            from nanogen.eval.inception import InceptionFeatures

            self._extractors[INCEPTION] = InceptionFeatures(self.device)
        return self._extractors[INCEPTION]

    def require_logits(self) -> None:
        if not self.inception.has_logits:
            from nanogen.eval.inception import inception_head_missing_message

            raise UserError(f"inception_score: {inception_head_missing_message()}")
        self._logits = True

    def require(self, stream: str) -> None:
        self.extractor(stream)  # load now: a missing model fails before sampling, not after
        self.wanted.add(stream)

    def extractor(self, stream: str):
        base = stream.split(":")[0]
        if base == INCEPTION:
            return self.inception
        key = stream.removeprefix("repr:")
        if stream not in self._extractors:
            from nanogen.eval.representations import build_extractor

            self._extractors[stream] = build_extractor(key, self.device)
        return self._extractors[stream]

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if any(s.startswith(INCEPTION) for s in self.wanted):
            f = self.inception.extract(images)
            out[INCEPTION] = f["pool"]
            if self._logits:
                out[INCEPTION + ":logits"] = f["logits_unbiased"]
        for s in self.wanted:
            if s.startswith("repr:"):
                out[s] = self._extractors[s](images)
        return out


def builtin_reference_images(name: str, ds: EvalDatasetConfig, image_size: int, n: int) -> Tensor:
    """The k-th held-out image of every class in turn (matches the class-balanced generated labels)."""
    from nanogen.data.nano import NUM_CLASSES, load_nano
    from nanogen.eval.images import to_uint8

    split = load_nano(ds.split, image_size)
    if n > len(split):
        raise UserError(f"eval.datasets.{name}.num_samples: {n} is more than the {len(split)} images of split '{ds.split}'")
    per_class = [torch.nonzero(split.labels == c).flatten() for c in range(NUM_CLASSES)]
    order = [int(per_class[i % NUM_CLASSES][i // NUM_CLASSES]) for i in range(n)]
    return to_uint8(split.images[order])

