"""nanogen: diffusion transformers for ImageNet and text-to-image, one codebase (DiffusionBench)."""

__version__ = "0.1.0"
