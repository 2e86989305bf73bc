"""nanogen: diffusion transformers for ImageNet and text-to-image, one codebase (DiffusionBench).

``import nanogen`` stays light (no torch); ``nanogen.build_stage2`` / ``nanogen.load_stage2`` import on use.
"""

__version__ = "0.1.0"

__all__ = ["build_stage2", "load_stage2"]


def __getattr__(name: str):
    if name in ("build_stage2", "load_stage2"):
        from nanogen import api

        return getattr(api, name)
    raise AttributeError(f"module 'nanogen' has no attribute '{name}'")
