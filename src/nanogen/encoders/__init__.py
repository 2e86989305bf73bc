"""Frozen representation encoders (spec ``reference.md`` §6.5): REPA / REG targets and the P-DINO loss.

    enc = build_encoder("dinov2-vit-b")            # hub id facebook/dinov2-with-registers-base
    enc = build_encoder("dinov2-vit-b", "/models/dinov2-b")   # or a local directory (offline)
    feats = enc(images)                            # images in [-1, 1]; feats.cls (B, D), feats.patches (B, T, D)

Every encoder is frozen (eval mode, no gradients to its weights); gradients still flow to its input, which
the perceptual loss needs. Weights load by a separate call, so tests build the same code on tiny random
models saved to a temporary directory.
"""

from nanogen.encoders.base import EncoderFeatures, RepresentationEncoder, build_encoder, encoder_width

__all__ = ["EncoderFeatures", "RepresentationEncoder", "build_encoder", "encoder_width"]
