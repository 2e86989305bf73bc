"""SigLIP2, MAE, DINOv3 and ConvNeXt V2 representation encoders on Hugging Face ``transformers`` models (spec
``reference.md`` §6.5).

The name -> hub id tables and the loading live in ``nanogen.encoders.base`` (``build_encoder``); these classes
wrap an already loaded model. WebSSL reuses ``base.DINOv2`` (same Dinov2 architecture, no registers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderFeatures, RepresentationEncoder


class SigLIP2(RepresentationEncoder):
    """SigLIP2 vision tower, patch 16 (§6.5 ``siglip2``).

    Preprocess: [-1, 1] -> [0, 1], bicubic resize to R, mean/std 0.5 (so [-1, 1] again). Output: the patch tokens
    of ``last_hidden_state``; SigLIP has no CLS token (``cls=None``).

    **Reference quirk, reproduced by default:** the reference means to strip the affine weights of the final
    ``post_layernorm`` but only sets its ``elementwise_affine`` flag after construction, which PyTorch ignores,
    so the learned affine IS applied; the default matches that (checkpoint parity with the reference's
    decoders and statistics). ``strip_affine=True`` gives the intended behaviour: a plain, non-affine
    LayerNorm over the last block's output.
    """

    def __init__(self, model: nn.Module, name: str, resolution: int = 256, strip_affine: bool = False):
        super().__init__()
        self.model = model
        self.name = name
        self.embed_dim = model.config.hidden_size
        self.input_size = resolution
        self.strip_affine = strip_affine
        self.set_input_norm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.freeze()

    def forward(self, images: Tensor) -> EncoderFeatures:
        x = self.preprocess(images, "bicubic")
        interpolate = self.input_size != self.model.config.image_size
        out = self.model(
            pixel_values=x, output_hidden_states=self.strip_affine, interpolate_pos_encoding=interpolate
        )
        if self.strip_affine:
            h = out.hidden_states[-1]  # the last block's output, before post_layernorm
            h = F.layer_norm(h, (h.shape[-1],), eps=self.model.post_layernorm.eps)
        else:
            # post_layernorm with its learned affine: what the reference's code actually outputs
            h = out.last_hidden_state
        return EncoderFeatures(cls=None, patches=h)


class MAE(RepresentationEncoder):
    """MAE ViT encoder, patch 16 (§6.5 ``mae``).

    Preprocess: [-1, 1] -> [0, 1], bicubic resize to R, ImageNet mean/std; the position embedding is resampled
    to the (R/16)^2 grid. No masking: mask ratio 0 and an identity-ordered noise (``arange``; ViTMAE keeps the
    tokens in ``argsort(noise)`` order), so the tokens stay in raster order. Output: CLS dropped, the final
    LayerNorm applied **without** its affine weights.
    """

    def __init__(self, model: nn.Module, name: str, resolution: int = 256):
        super().__init__()
        model.config.mask_ratio = 0.0  # the embeddings read the ratio from the (shared) config at call time
        model.embeddings.config.mask_ratio = 0.0
        self.model = model
        self.name = name
        self.embed_dim = model.config.hidden_size
        self.patch_size = model.config.patch_size
        self.input_size = resolution
        self.set_input_norm(IMAGENET_MEAN, IMAGENET_STD)
        self.freeze()

    def forward(self, images: Tensor) -> EncoderFeatures:
        x = self.preprocess(images, "bicubic")
        n = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        noise = torch.arange(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n)
        interpolate = self.input_size != self.model.config.image_size
        out = self.model(
            pixel_values=x, noise=noise, output_hidden_states=True, interpolate_pos_encoding=interpolate
        )
        h = out.hidden_states[-1]  # the last block's output, before the final LayerNorm
        h = F.layer_norm(h, (h.shape[-1],), eps=self.model.layernorm.eps)
        return EncoderFeatures(cls=None, patches=h[:, 1:])


class DINOv3(RepresentationEncoder):
    """DINOv3 ViT (``DINOv3ViTModel``), patch 16, RoPE positions (§6.5 ``dinov3``).

    Preprocess: [-1, 1] -> [0, 1], Resize(R, R) bilinear with antialias, ImageNet mean/std. The RoPE angles come
    from the patch-centre coordinates normalised to [-1, 1] for whatever grid the input gives (R = 256: 16 x 16),
    so no position table is resampled; the train-time coordinate augmentations are off (the encoder stays in
    eval mode). Output: the last block's tokens through a **non-affine** LayerNorm (eps of the model's final
    norm), unless ``affine_norm``; CLS = token 0, patches = the tokens after CLS and the
    ``config.num_register_tokens`` registers.
    """

    def __init__(self, model: nn.Module, name: str, resolution: int = 256, affine_norm: bool = False):
        super().__init__()
        self.model = model
        self.name = name
        self.embed_dim = model.config.hidden_size
        self.num_registers = model.config.num_register_tokens
        self.input_size = resolution
        self.affine_norm = affine_norm
        self.set_input_norm(IMAGENET_MEAN, IMAGENET_STD)
        self.freeze()

    def forward(self, images: Tensor) -> EncoderFeatures:
        x = self.preprocess(images, "bilinear", antialias=True)
        out = self.model(pixel_values=x, output_hidden_states=True)
        h = out.hidden_states[-1]  # the last block's output, before the final norm
        norm = self.model.norm
        h = norm(h) if self.affine_norm else F.layer_norm(h, (h.shape[-1],), eps=norm.eps)
        return EncoderFeatures(cls=h[:, 0], patches=h[:, 1 + self.num_registers :])


class ConvNeXtV2(RepresentationEncoder):
    """ConvNeXt V2 backbone (``ConvNextV2Model``, §6.5 ``convnextv2``).

    Preprocess: [-1, 1] -> [0, 1], bilinear resize to 224 (fixed, whatever R), ImageNet mean/std. Output: the
    last stage's feature map (B, C, h, w) flattened row-major to tokens (B, h * w, C) (224 px: 7 x 7 = 49),
    without the pooled head's LayerNorm; ConvNeXt has no CLS token (``cls=None``).
    """

    input_size = 224

    def __init__(self, model: nn.Module, name: str, resolution: int = 256):
        super().__init__()
        self.model = model
        self.name = name
        self.embed_dim = model.config.hidden_sizes[-1]
        self.set_input_norm(IMAGENET_MEAN, IMAGENET_STD)
        self.freeze()

    def forward(self, images: Tensor) -> EncoderFeatures:
        x = self.preprocess(images, "bilinear")
        h = self.model(pixel_values=x).last_hidden_state  # (B, C, h, w): the last stage
        return EncoderFeatures(cls=None, patches=h.flatten(2).transpose(1, 2))
