"""Reference statistics files: read, write, check (spec ``evaluation.md`` §0.1, §1.4, §7.3).

A statistics file is an ``.npz`` holding ``mu`` (d,) and ``sigma`` (d, d); ``ref_mu`` / ``ref_sigma`` are
accepted as the same thing (the reference's loader reads both). ADM's ``VIRTUAL_imagenet256_labeled.npz``
also holds sFID moments (``mu_s``, ``sigma_s``) and 10k images (``arr_0``); FID reads only mu and sigma.

Files nanogen writes (``nanogen ref-stats``) also carry a ``manifest``: a JSON string with the feature
extractor's id and weights sha256, the number of images, the preprocessing and where the images came from.
Comparing two files whose manifests name different extractors raises instead of printing a meaningless
number. Files without a manifest (ADM's, JiT's) are taken as Inception pool3 statistics.

Named presets (``fid@jit``, ``fid@adm``) say which published ImageNet-256 statistics an FID is measured
against: three are in circulation and their numbers are not interchangeable (§1.4). ``fid`` alone means the
eval dataset's ``reference_npz`` (the ImageNet task preset points it at JiT's file, as the paper does).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanogen.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    filename: str  # in the ImageNet data_dir (./data/imagenet by default)
    description: str
    fetch: str  # the command that downloads it
    sha256: str | None = None


ADM_REF_BATCH_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz"


# §1.4. The JiT file comes with the reference's ImageNet download (reference.md §7.5). Its sha256 is a
# third-party value (unverified), so a different hash is a warning (``check_preset_hash``), never an error.
PRESETS: dict[str, Preset] = {
    "jit": Preset(
        "jit", "jit_in256_stats.npz",
        "JiT's ImageNet-256 Inception statistics (the paper's FID; nanogen prepare --data imagenet)",
        "nanogen prepare --data imagenet",
        sha256="412046720c0d496dc6d72a30eac3e22b9ef6ddac3501cce7f996674ad227ba4c",
    ),
    "adm": Preset(
        "adm", "adm/VIRTUAL_imagenet256_labeled.npz",
        "ADM's ImageNet-256 reference batch statistics (most DiT papers' FID; nanogen prepare --data fid-stats)",
        "nanogen prepare --data fid-stats",
    ),
}  # fmt: skip


def preset_path(name: str, data_dir: str | Path = "./data/imagenet") -> Path:
    if name not in PRESETS:
        raise UserError(f"unknown FID reference preset '{name}' (known: {', '.join(PRESETS)})")
    return Path(data_dir).expanduser() / PRESETS[name].filename


def check_preset_hash(name: str, path: Path) -> None:
    expected = PRESETS[name].sha256
    if expected and sha256_file(path) != expected:
        warnings.warn(f"{path}: sha256 differs from the published {name} statistics ({expected[:12]}...); is it the right file?", stacklevel=2)


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (d,) float64
    sigma: np.ndarray  # (d, d) float64
    manifest: dict = field(default_factory=dict)
    path: str = ""

    @property
    def dim(self) -> int:
        return len(self.mu)

    def check_compatible(self, extractor_id: str, where: str) -> None:
        """Refuse statistics made by another feature extractor (only files that say which one made them)."""
        theirs = self.manifest.get("extractor")
        if theirs and _family(theirs) != _family(extractor_id):
            raise UserError(
                f"{where}: '{self.path}' was computed with '{theirs}', not '{extractor_id}'; rebuild it with nanogen ref-stats"
            )


def _family(extractor_id: str) -> str:
    """Extractor ids are '<network>/<layer> (<weights source>)'; the part before the space decides."""
    return extractor_id.split(" ")[0]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_stats_file(path: str | Path) -> bool:
    """True for an npz holding mu/sigma (or ref_mu/ref_sigma). ADM's reference batch also holds 10k images
    (``arr_0``, for precision/recall); like ADM's evaluator, FID uses its stored statistics."""
    try:
        with np.load(path) as f:
            return "mu" in f.files or "ref_mu" in f.files
    except (OSError, ValueError):
        return False


def load(
    path: str | Path, dim: int | None = None, what: str = "reference statistics", fetch: str = "nanogen prepare --data imagenet"
) -> ReferenceStats:
    """Read a statistics npz; every problem is one line naming the file and the fix."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what}: '{path}' not found; fetch it ({fetch}) or build one with nanogen ref-stats")
    try:
        f = np.load(p)
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: '{path}' is not a readable .npz ({e})") from None
    with f:
        keys = ("mu", "sigma") if "mu" in f.files else ("ref_mu", "ref_sigma")
        if keys[0] not in f.files or keys[1] not in f.files:
            raise UserError(f"{what}: '{path}' has no 'mu' and 'sigma' arrays (keys: {', '.join(f.files)})")
        mu, sigma = f[keys[0]].astype(np.float64), f[keys[1]].astype(np.float64)
        manifest = json.loads(str(f["manifest"])) if "manifest" in f.files else {}
    d = len(mu)
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise UserError(f"{what}: '{path}' has mu {mu.shape} and sigma {sigma.shape}; expected (d,) and (d, d)")
    if dim is not None and d != dim:
        raise UserError(f"{what}: '{path}' holds {d}-d statistics but the features are {dim}-d; use statistics of the same extractor")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{what}: '{path}' contains NaN or inf")
    return ReferenceStats(mu, sigma, manifest, str(path))


def save(path: str | Path, mu: np.ndarray, sigma: np.ndarray, manifest: dict) -> Path:
    """Write mu / sigma / manifest atomically (a crash never leaves a half-written reference)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, mu=mu.astype(np.float64), sigma=sigma.astype(np.float64), manifest=np.array(json.dumps(manifest, sort_keys=True)))
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(p)
    return p
