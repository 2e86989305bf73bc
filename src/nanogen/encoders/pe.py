"""Perception Encoder (PE) representation encoders on ``timm`` models (spec ``reference.md`` §6.5 ``pe``,
``spatialpe``, ``langpe``).

The reference runs Meta's own PE code on the original checkpoints; timm ships the same architectures
(``vit_pe_core_*``, ``vit_pe_spatial_*``, ``vit_pe_lang_*``: an Eva ViT with an absolute position table, 2-D
RoPE, a pre-transformer LayerNorm and, for PE-Core only, ``ln_post``) and converts those checkpoints. At a grid
other than the checkpoint's, PE's code (a) resamples the absolute position table **bilinearly**
(``align_corners=False``; CLS entry kept) and (b) computes RoPE from the integer patch indices of the new grid
(+1 when there is a CLS token, which gets the zero angle). timm's own resizing differs on both (bicubic with
antialias; RoPE indices rescaled to the pre-training grid), so :func:`load_pe` builds the timm model at the
target size with no RoPE rescaling and resamples the table itself, the PE way.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.encoders.base import EncoderFeatures, RepresentationEncoder, not_loadable
from nanogen.errors import ConfigError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _files(source: str) -> tuple[str | None, str]:
    """(config.json or None, weight file) of a local file, a local directory or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        return None, str(path)
    if path.is_dir():
        config = path / "config.json"
        weights = [path / f for f in WEIGHT_FILES if (path / f).is_file()] or sorted(path.glob("*.pt"))
        if not weights:
            raise FileNotFoundError(f"no {', '.join(WEIGHT_FILES)} or *.pt file in {path}")
        return (str(config) if config.is_file() else None), str(weights[0])
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"no such file or directory: {source}")
    from huggingface_hub import hf_hub_download

    repo = source.split("/")[1]
    if repo.startswith("PE-"):  # Meta's original release: facebook/PE-Core-L14-336/PE-Core-L14-336.pt
        return None, hf_hub_download(source, f"{repo}.pt")
    return hf_hub_download(source, "config.json"), hf_hub_download(source, WEIGHT_FILES[0])


def _read_weights(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "weights", "model"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


def resample_pos_embed(pos: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """PE's resampling of a (1, prefix + m*m, D) absolute position table to ``grid``: bilinear,
    ``align_corners=False``, prefix (CLS) entries unchanged."""
    prefix, table = pos[:, :num_prefix], pos[:, num_prefix:]
    m = math.isqrt(table.shape[1])
    if m * m != table.shape[1]:
        raise ConfigError(f"position table of {table.shape[1]} entries is not a square grid")
    table = table.reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    table = F.interpolate(table, size=grid, mode="bilinear", align_corners=False)
    table = table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([prefix, table], dim=1)


def load_pe(name: str, arch: str, source: str, default: str, resolution: int = 256) -> nn.Module:
    """The timm model ``arch`` with the weights of ``source`` (a timm-format directory or hub id: config.json +
    model.safetensors; or one weight file, timm's or Meta's original ``PE-*.pt``), built for inputs of
    patch * R / 16 pixels (R = 256: a 16 x 16 grid for patch 14 and 16 alike), heads dropped."""
    import timm
    from timm.models.eva import checkpoint_filter_fn

    try:
        config_path, weights_path = _files(source)
        config = json.loads(Path(config_path).read_text()) if config_path else {}
        sd = _read_weights(weights_path)
    except Exception as e:  # missing, offline, gated or unreadable: one line
        raise not_loadable(name, source, default, e) from None
    found = config.get("architecture")
    if found and found != arch:
        raise ConfigError(f"'{source}' holds a timm '{found}' model, but encoder '{name}' is '{arch}'")
    kwargs = dict(config.get("model_args", {}))
    patch = kwargs.get("patch_size") or int(re.search(r"patch(\d+)", arch).group(1))
    size = patch * resolution // 16
    # heads off; the target size; RoPE from the integer indices of the target grid: timm rescales the indices by
    # ref_feat_shape / grid, so the reference shape is the grid itself (timm drops a None argument)
    grid = size // patch
    kwargs.update(
        img_size=size, ref_feat_shape=(grid, grid), num_classes=0, global_pool="", dynamic_img_size=False
    )
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if "conv1.weight" in sd or "visual.conv1.weight" in sd:  # Meta's original key names -> timm's
        sd = checkpoint_filter_fn(sd, model)
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "attn_pool."))}
    if model.pos_embed is not None and "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], num_prefix, model.patch_embed.grid_size)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ConfigError(
            f"the weights in '{source}' do not fit timm '{arch}': {' '.join(str(e).split())[:240]}"
        ) from None
    return model


class PerceptionEncoder(RepresentationEncoder):
    """A Perception Encoder ViT (§6.5 ``pe``, ``spatialpe``, ``langpe``), patch 14 (l, g) or 16.

    Preprocess: [-1, 1] -> [0, 1], **bilinear** resize (no antialias) to patch * R / 16, mean/std 0.5 (so
    [-1, 1] again). Output: the last block's tokens, CLS stripped from the patches (and returned as ``cls``
    where the model has one; the G models have none, ``cls=None``). Per the spec, only the config suffix
    ``norm`` (``pe-vit-lnorm``) applies ``ln_post`` (with its learned affine); by default the tokens are the raw
    last-block output with no norm at all. The PE-Spatial and PE-Lang checkpoints have no ``ln_post`` (an
    identity in PE's code and in timm), so there the suffix changes nothing.
    """

    def __init__(self, model: nn.Module, name: str, resolution: int = 256, ln_post: bool = False):
        super().__init__()
        self.model = model
        self.name = name
        self.embed_dim = model.embed_dim
        self.input_size = model.patch_embed.img_size[0]
        self.ln_post = ln_post
        self.set_input_norm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.freeze()

    def forward(self, images: Tensor) -> EncoderFeatures:
        x = self.preprocess(images, "bilinear")
        has_cls = self.model.num_prefix_tokens > 0
        (out,) = self.model.forward_intermediates(
            x, indices=[len(self.model.blocks) - 1], norm=self.ln_post, output_fmt="NLC",
            intermediates_only=True, return_prefix_tokens=has_cls,
        )  # fmt: skip
        if has_cls:
            patches, prefix = out
            return EncoderFeatures(cls=prefix[:, 0], patches=patches)
        return EncoderFeatures(cls=None, patches=out)
