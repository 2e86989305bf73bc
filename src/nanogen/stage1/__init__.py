"""Stage-1 (tokenizer decoder) training pieces: DiffAug, the DINO discriminator and the GAN losses (§6.7)."""

from nanogen.stage1.diffaug import DiffAug
from nanogen.stage1.disc import (
    DinoDiscriminator,
    DiscHead,
    LocalBatchNorm1d,
    ViT,
    build_dino_discriminator,
    load_dino_vit,
    vit_small_patch8,
    zero_qkv_k_bias_,
)
from nanogen.stage1.gan_losses import (
    adaptive_weight,
    disc_accuracy,
    disc_loss,
    gen_loss,
    hinge_d_loss,
    quantize_8bit,
    vanilla_d_loss,
)

__all__ = [
    "DiffAug",
    "DinoDiscriminator",
    "DiscHead",
    "LocalBatchNorm1d",
    "ViT",
    "adaptive_weight",
    "build_dino_discriminator",
    "disc_accuracy",
    "disc_loss",
    "gen_loss",
    "hinge_d_loss",
    "load_dino_vit",
    "quantize_8bit",
    "vanilla_d_loss",
    "vit_small_patch8",
    "zero_qkv_k_bias_",
]
