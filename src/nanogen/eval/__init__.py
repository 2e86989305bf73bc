"""Evaluation: image quantisation, feature extractors, streaming statistics and metrics."""
