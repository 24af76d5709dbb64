"""Converters from published checkpoints (safetensors) to Flax parameter pytrees."""
