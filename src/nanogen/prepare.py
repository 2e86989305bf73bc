"""``nanogen prepare``: fetch what runs need from the Hugging Face Hub, once, so that later runs work offline
(``HF_HUB_OFFLINE=1``).

- ``--models NAMES``: frozen networks (encoders, VAEs) into the HF cache, by nanogen name (``dinov2-vit-b``) or hub id.
- ``--data GROUP``: the dataset, prompt-set and reference-statistics repos of spec reference.md §7.5 into ``data/``.
- the released stage-2 checkpoints, RAE decoders and latent stats (§1.4, §2.7; one model repo) into
  ``pretrained_models/``.

Data and release repos go to plain folders (``local_dir``). huggingface_hub resumes partial files, so a rerun after
a crash continues where it stopped; a ``.nanogen-complete`` marker, written last and atomically, records a finished
folder (repo id and commit) so that a rerun never touches it again. A failed item does not stop the others; the
run ends with one error line naming every missing item.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nanogen.errors import NotAvailableError, UserError
from nanogen.eval.refstats import ADM_REF_BATCH_URL

MARKER = ".nanogen-complete"


@dataclass(frozen=True)
class HubItem:
    repo_id: str
    repo_type: str  # "dataset" or "model" (the hub keeps them in separate namespaces), or "url" (one plain file)
    local: str  # folder under the destination root ("" = the root itself)
    expects: tuple[str, ...] = ()  # paths inside it that the configs read; checked after the download


# spec reference.md §7.5 (the reference's scripts/prepare.py table); the expected imagenet files are the ones the
# configs point at (§7.1 train/val Arrow, §7.5 gFID statistics, the rFID reference of configs/stage1).
DATA_ITEMS: dict[str, HubItem] = {
    "imagenet": HubItem("diffusion-bench/imagenet", "dataset", "imagenet",
                        expects=("imagenet-latents-images", "jit_in256_stats.npz", "imagenet-256-val.npz")),
    "blip3o-256": HubItem("diffusion-bench/blip3o-256", "dataset", "blip3o-256"),
    "coco-30k": HubItem("diffusion-bench/coco-30k", "dataset", "mscoco"),
    "mjhq-30k": HubItem("diffusion-bench/mjhq-30k", "dataset", "mjhq"),
    "geneval": HubItem("diffusion-bench/geneval", "dataset", "geneval"),
    "dpgbench": HubItem("diffusion-bench/dpgbench", "dataset", "dpgbench"),
    "genaibench": HubItem("diffusion-bench/genaibench", "dataset", "genaibench"),
    "blip3o-original-lc": HubItem("BLIP3o/BLIP3o-Pretrain-Long-Caption", "dataset", "blip3o/long-caption"),
    "blip3o-original-sc": HubItem("BLIP3o/BLIP3o-Pretrain-Short-Caption", "dataset", "blip3o/short-caption"),
    "blip3o-original-jdb": HubItem("BLIP3o/BLIP3o-Pretrain-JourneyDB", "dataset", "blip3o/journeydb"),
}  # fmt: skip

# Not in the reference's script: evaluation.md §1.4 (ADM's reference batch, for fid@adm and precision/recall) and
# §2.1 (the six FD_r reference statistics, which the reference's evaluator downloads at first use).
EVAL_STATS_ITEMS: dict[str, HubItem] = {
    "adm-ref-batch": HubItem(ADM_REF_BATCH_URL, "url", "imagenet/adm", expects=("VIRTUAL_imagenet256_labeled.npz",)),
    "fd-stats": HubItem("nanovisionx/nanogen-evals-stats", "dataset", "imagenet/fd-stats"),
}

DATA_GROUPS: dict[str, tuple[str, ...]] = {
    "imagenet": ("imagenet",),
    "t2i": ("blip3o-256",),
    "eval": ("coco-30k", "mjhq-30k", "geneval", "dpgbench", "genaibench"),
    "t2i-res512": ("blip3o-original-lc", "blip3o-original-sc", "blip3o-original-jdb"),  # the 512 px originals (§7.6)
    "all": tuple(DATA_ITEMS),
}

# §1.4 / §2.7: {imagenet,t2i}/ckpts/<config-name>-v0.pt, stage1/decoders/<encoder>/decoder.pt, stage1/stats/<encoder>/...
RELEASE = HubItem("diffusion-bench/diffusion-bench", "model", "",
                  expects=("imagenet/ckpts", "t2i/ckpts", "stage1/decoders", "stage1/stats"))  # fmt: skip

Download = Callable[[str, str, Path], str]
"""``download(repo_id, repo_type, local_dir) -> commit``: make ``local_dir`` a complete copy of the repo and return
the commit it holds; raise when that is not possible."""


@dataclass
class PrepareResult:
    name: str
    item: HubItem
    local_dir: Path
    status: Literal["done", "skipped", "failed"]  # skipped: the marker was there
    commit: str | None = None  # the commit in local_dir (from the marker when skipped)
    error: BaseException | None = None  # why it failed
    warnings: list[str] = field(default_factory=list)  # expected files that are missing


TRAINED_HERE = {
    "nano-vit-s": "nanogen train-encoder",
    "nano-vae": "nanogen train-stage1 -c configs/stage1/nano/nano-vae.yaml",
}


def hub_id(name: str) -> str:
    """A nanogen model name -> its hub id; strings with a '/' are hub ids already."""
    if "/" in name:
        return name
    if name in TRAINED_HERE:  # the nano tier's own models have no hub id: nanogen trains them offline
        raise UserError(f"prepare --models: '{name}' is not downloaded but trained by nanogen itself: run '{TRAINED_HERE[name]}'")
    from nanogen.encoders.base import default_source

    try:
        return default_source(name)
    except (NotAvailableError, UserError):
        pass
    try:
        from nanogen.latents.vae import VAE_TYPES
    except ImportError:  # pragma: no cover - the VAE table ships with the VAE latents
        VAE_TYPES = {}
    if name in VAE_TYPES:
        return VAE_TYPES[name][0]
    raise UserError(
        f"prepare --models: unknown model '{name}'; use a representation encoder name (e.g. dinov2-vit-b), a VAE "
        f"type (e.g. sdvae-ema) or a hub id such as facebook/dinov2-with-registers-base"
    )


def _expand_eval_models(names: list[str]) -> list[str]:
    """'fdr' stands for the five timm FD_r extractors (evaluation.md §2.1)."""
    from nanogen.eval.representations import FDR_HUB_IDS

    return [m for n in names for m in (FDR_HUB_IDS if n == "fdr" else [n])]


def fetch_inception_head() -> Path:
    """torch-fidelity's Inception weights (with the 1008-class head that the Inception Score needs) into the
    torch hub cache, where ``eval/inception.py`` looks for them."""
    import torch

    from nanogen.eval.inception import TORCH_FIDELITY_FILE, TORCH_FIDELITY_URL

    dest = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        fetch_url(TORCH_FIDELITY_URL, dest)
    except OSError as e:
        raise NotAvailableError(f"prepare --models inception: cannot download {TORCH_FIDELITY_URL} ({_short_reason(e)})") from None
    return dest / TORCH_FIDELITY_FILE


def prepare_models(names: list[str]) -> None:
    """Fetch each named network into the Hugging Face cache; the first failure raises one line."""
    from huggingface_hub import snapshot_download

    for name in _expand_eval_models(names):
        if name == "inception":
            print(f"inception: {fetch_inception_head()}")
            continue
        repo = hub_id(name)
        try:
            path = snapshot_download(repo)
        except Exception as e:  # offline, gated, or a typo: one line, with the reason
            raise NotAvailableError(f"prepare --models: cannot download '{repo}' ({_short_reason(e)})") from None
        print(f"{name}: {repo} -> {path}")


def fetch_url(url: str, local_dir: Path) -> str:
    """Download one file into ``local_dir`` (resuming a ``.part`` file with an HTTP Range request); returns
    ``sha256:<hash>`` of the finished file as its 'commit'."""
    import urllib.request

    from nanogen.eval.refstats import sha256_file

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConnectionRefusedError("HF_HUB_OFFLINE=1 is set")  # offline means offline for plain URLs too
    local_dir.mkdir(parents=True, exist_ok=True)
    dest = local_dir / url.rsplit("/", 1)[-1]
    part = dest.with_name(dest.name + ".part")
    if not dest.is_file():
        have = part.stat().st_size if part.is_file() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        with urllib.request.urlopen(req, timeout=60) as r, open(part, "ab" if r.status == 206 else "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(part, dest)
    return f"sha256:{sha256_file(dest)}"


def fetch_snapshot(repo_id: str, repo_type: str, local_dir: Path) -> str:
    """The real ``download``: resolve the commit, then ``snapshot_download`` exactly that commit into local_dir
    (a plain URL, repo_type "url", is fetched by ``fetch_url``)."""
    if repo_type == "url":
        return fetch_url(repo_id, local_dir)
    from huggingface_hub import HfApi, snapshot_download

    # Resolve first, on purpose: when the hub is unreachable, snapshot_download returns a non-empty local_dir as it
    # is, which after a crash is a partial copy that must not get a marker. repo_info raises instead, and a pinned
    # commit makes snapshot_download finish that commit (resuming partial files) or raise.
    commit = HfApi().repo_info(repo_id, repo_type=repo_type).sha
    snapshot_download(repo_id, repo_type=repo_type, local_dir=local_dir, revision=commit)
    return commit


def prepare_data(group: str, data_dir: Path, *, download: Download = fetch_snapshot) -> list[PrepareResult]:
    """Fetch every item of ``group`` (a key of DATA_GROUPS, or "fid-stats") into ``data_dir``; raise one
    UserError if any failed."""
    groups = {**DATA_GROUPS, "fid-stats": tuple(EVAL_STATS_ITEMS)}
    if group not in groups:
        raise UserError(f"prepare --data: unknown group '{group}'; use one of {', '.join(groups)}")
    items = {name: {**DATA_ITEMS, **EVAL_STATS_ITEMS}[name] for name in groups[group]}
    return _prepare(items, Path(data_dir), download, rerun=f"nanogen prepare --data {group}")


def prepare_release(dest: Path = Path("pretrained_models"), *, download: Download = fetch_snapshot) -> PrepareResult:
    """Fetch the released checkpoints, decoders and latent stats (RELEASE) into ``dest``."""
    return _prepare({"release": RELEASE}, Path(dest), download, rerun="nanogen prepare --models")[0]


def _prepare(items: dict[str, HubItem], root: Path, download: Download, rerun: str) -> list[PrepareResult]:
    results = []
    for name, item in items.items():
        r = _prepare_one(name, item, root / item.local, download)
        print(_status_line(r), flush=True)  # huggingface_hub draws its own progress bars during the download
        for w in r.warnings:
            print(f"warning: {w}", flush=True)
        results.append(r)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise UserError(_failure_message(failed, rerun))
    return results


def _prepare_one(name: str, item: HubItem, local_dir: Path, download: Download) -> PrepareResult:
    marker = local_dir / MARKER
    if marker.is_file():
        commit = json.loads(marker.read_text())["commit"]
        return PrepareResult(name, item, local_dir, "skipped", commit, warnings=_missing(name, item, local_dir))
    try:
        commit = download(item.repo_id, item.repo_type, local_dir)
    except _hub_errors() as e:  # offline, DNS, 401/404, a dropped connection, a full disk: report, go on
        return PrepareResult(name, item, local_dir, "failed", error=e)
    _write_marker(marker, item, commit)
    return PrepareResult(name, item, local_dir, "done", commit, warnings=_missing(name, item, local_dir))


def _write_marker(marker: Path, item: HubItem, commit: str) -> None:
    # write-then-rename: a crash leaves either no marker or a whole one, never a truncated file
    tmp = marker.with_name(MARKER + ".tmp")
    tmp.write_text(json.dumps({"repo_id": item.repo_id, "repo_type": item.repo_type, "commit": commit}) + "\n")
    os.replace(tmp, marker)


def _missing(name: str, item: HubItem, local_dir: Path) -> list[str]:
    # the repos' exact contents were never inspected (spec §13 point 4), so a missing path is a warning, not an error
    return [
        f"{name}: {local_dir / p} is missing but the configs expect it (the hub repo's layout may differ; "
        f"place it there or point the config at it)"
        for p in item.expects
        if not (local_dir / p).exists()
    ]


def _status_line(r: PrepareResult) -> str:
    where = f"{r.item.repo_id} -> {r.local_dir}"
    if r.status == "done":
        return f"{r.name}: done ({where} @ {r.commit})"
    if r.status == "skipped":
        return f"{r.name}: skipped, already complete ({r.local_dir / MARKER})"
    return f"{r.name}: failed ({where}: {_short_reason(r.error)})"


def _failure_message(failed: list[PrepareResult], rerun: str) -> str:
    reasons = "; ".join(dict.fromkeys(_short_reason(r.error) for r in failed))  # usually one, shared by all items
    missing = ", ".join(f"{r.name} ({r.item.repo_id} -> {r.local_dir})" for r in failed)
    if all(_is_disk_error(r.error) for r in failed):
        return (
            f"cannot write the downloads ({reasons}); missing: {missing}; free space or fix permissions, then "
            f"rerun `{rerun}` (finished items are kept)"
        )
    return (
        f"cannot reach the Hugging Face Hub ({reasons}); missing: {missing}; rerun `{rerun}` when online "
        f"(finished items are kept)"
    )


def _hub_errors() -> tuple[type[BaseException], ...]:
    # OSError covers the hub's own errors (HfHubHTTPError, OfflineModeIsEnabled, LocalEntryNotFoundError) and disk
    # errors; HTTPError is the HTTP client's base class, raised as-is for DNS failures and dropped connections.
    from huggingface_hub.errors import HTTPError

    return (OSError, HTTPError)


def _short_reason(e: BaseException) -> str:
    from huggingface_hub import errors as hf

    if isinstance(e, hf.OfflineModeIsEnabled) or isinstance(e.__cause__, hf.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE=1 is set"  # snapshot_download wraps it in a LocalEntryNotFoundError
    if isinstance(e, hf.GatedRepoError):
        return "gated repo: accept its terms on huggingface.co, then `hf auth login`"
    if isinstance(e, hf.RepositoryNotFoundError):
        return "repo not found (404), or private: `hf auth login`"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf.HfHubHTTPError) and status is not None:
        return "401 unauthorized: `hf auth login`" if status == 401 else f"HTTP {status}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


def _is_disk_error(e: BaseException) -> bool:
    """A local write problem (full disk, permissions) rather than the network: OSErrors with an errno."""
    return isinstance(e, OSError) and e.errno is not None and not isinstance(e, ConnectionError | TimeoutError)
