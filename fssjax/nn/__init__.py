"""Reusable Flax Linen modules (NHWC, shapes in docstrings)."""
