"""Names -> components.

Configs name things (``stage_2.target: LightningDiT``, ``stage_1.target: pixel``); these small tables turn
names into constructors. Entries point at ``module:attribute`` inside nanogen and are imported lazily, so
``import nanogen`` stays light and ``--help`` can list every name without importing torch.

The reference's configs use import paths (``target: stage2.models.DDT.DiTwDDTHead``); ``ALIASES`` maps
those to nanogen names. It is the only place an import-path string may appear.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from dataclasses import dataclass
from typing import Any

from nanogen.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    target: str  # "module:attribute" inside nanogen
    config: str | None  # "module:attribute" of the typed params dataclass, if any
    summary: str
    size: str | None = None  # a named size: key into the model module's SIZES table

    def load(self) -> Any:
        return _import(self.target)

    def config_cls(self) -> type | None:
        return _import(self.config) if self.config else None

    @property
    def defaults(self) -> dict[str, Any]:
        """Params a named size fixes (width, depth, heads); YAML params still win."""
        if self.size is None:
            return {}
        return dict(_import(self.target.split(":")[0] + ":SIZES")[self.size])


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


# stage-2 networks (the generator).
MODELS: dict[str, Entry] = {
    "DDT": Entry(
        "nanogen.models.ddt:DDT",
        "nanogen.models.ddt:DDTConfig",
        "Decoupled Diffusion Transformer (spec reference.md §3.2): in-context encoder + AdaLN-Zero decoder head",
    ),
    "LightningDiT": Entry(
        "nanogen.models.lightning_dit:LightningDiT",
        "nanogen.models.lightning_dit:LightningDiTConfig",
        "single-stream in-context DiT (spec reference.md §3.4): time/class/text tokens + pre-norm blocks",
    ),
}
for _size in ("XS", "S", "B", "XL"):
    MODELS[f"DDT-{_size}"] = Entry(MODELS["DDT"].target, MODELS["DDT"].config, f"DDT, named size {_size}", f"DDT-{_size}")
for _size in ("XS", "S", "B", "L", "XL"):
    MODELS[f"LightningDiT-{_size}"] = Entry(
        MODELS["LightningDiT"].target, MODELS["LightningDiT"].config, f"LightningDiT, named size {_size}", f"LightningDiT-{_size}"
    )

# stage-1 tokenizers (the space the generator works in).
TOKENIZERS: dict[str, Entry] = {
    "vae": Entry(
        "nanogen.latents.vae:from_params",
        "nanogen.latents.vae:VAEParams",
        "Diffusers VAEs (SD, SDXL, FLUX.1, SD3.5, REPA-E e2e-*), spec reference.md §6.6",
    ),
    "qwen-vae": Entry(
        "nanogen.latents.vae:from_params", "nanogen.latents.vae:VAEParams",
        "Qwen-Image VAE (5-D, T = 1), per-channel latent statistics, spec reference.md §6.6",
    ),  # fmt: skip
    "flux2-vae": Entry(
        "nanogen.latents.vae:from_params", "nanogen.latents.vae:VAEParams",
        "FLUX.2 VAE: 2x2 patchify to 128 channels, BatchNorm running statistics, spec reference.md §6.6",
    ),  # fmt: skip
    "rae": Entry(
        "nanogen.latents.rae:from_params",
        "nanogen.latents.rae:RAEParams",
        "representation autoencoder: frozen encoder + ViT pixel decoder (spec reference.md §6.2-6.3)",
    ),
    "pixel": Entry(
        "nanogen.latents.pixel:PixelSpace",
        None,  # no params: the size comes from misc.latent_size
        "pixel space: encode = 2x - 1 (the generator works on pixels in [-1, 1]; JiT, PixelGen, PixNerd, nano)",
    ),
    "kl-vae": Entry(
        "nanogen.stage1.kl_vae:from_params",
        "nanogen.stage1.kl_vae:KLVAEParams",
        "a trainable KL-VAE (diffusers AutoencoderKL) for train-stage1; export it, then use it as vae_type nano-vae",
    ),
}

# Tokenizers that only stage-1 training builds (stage 2 loads their exported weights through another entry).
TRAIN_ONLY_TOKENIZERS = {"kl-vae": "stage_1: {target: vae, params: {vae_type: nano-vae}} with misc.weights.nano-vae: <export dir>"}

# The reference's `target:` import strings, accepted when reading its configs.
ALIASES: dict[str, str] = {
    "stage2.models.DDT.DiTwDDTHead": "DDT",
    "stage2.models.lightningDiT.LightningDiT": "LightningDiT",
    "stage1.pixel.PixelEncoder": "pixel",
    "stage1.PixelEncoder": "pixel",
    "stage1.VAE": "vae",
    "stage1.QwenVAE": "qwen-vae",
    "stage1.Flux2VAE": "flux2-vae",
    "stage1.RAE": "rae",
}

# Names the reference uses that a later nanogen release fills in: a clear message instead of "unknown".
PLANNED: dict[str, str] = {
    "stage2.models.DDT.DiTwDDTHeadIG": "DDT-IG",
    "stage2.models.lightningDiT.LightningDiTIG": "LightningDiT-IG",
    "DDT-IG": "DDT-IG",
    "LightningDiT-IG": "LightningDiT-IG",
}


def lookup(table: dict[str, Entry], name: str, where: str) -> tuple[str, Entry]:
    """Resolve ``name`` (or a reference alias) in ``table``; a clear ConfigError otherwise."""
    canonical = ALIASES.get(name, name)
    if canonical in table:
        return canonical, table[canonical]
    if name in PLANNED or canonical in PLANNED:
        raise ConfigError(
            f"{where}: '{name}' is not available in this nanogen release yet; "
            f"available: {', '.join(sorted(table))}"
        )
    close = difflib.get_close_matches(name, list(table) + list(ALIASES), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"{where}: unknown name '{name}'{hint} (available: {', '.join(sorted(table))})")


def build_params(entry: Entry, params: dict[str, Any], where: str) -> Any:
    """Check a free ``params`` mapping against the component's typed config and build it."""
    from nanogen.config.loader import build

    cls = entry.config_cls()
    if cls is None:
        if params:
            raise ConfigError(f"{where}: this component takes no params, got {', '.join(params)}")
        return None
    return build(cls, params, source="config", prefix=where)


def params_fields(entry: Entry) -> set[str]:
    cls = entry.config_cls()
    return {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
