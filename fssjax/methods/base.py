"""The small interface every method implements.

A method owns its Linen module(s), its loss and its prediction. The generic trainer
(`fssjax.train`) and evaluator (`fssjax.evaluate`) only ever talk to this interface.

Parameters are split in two plain pytrees:
  * `params`: trainable; the only thing the optimiser sees;
  * `frozen`: everything else (pretrained backbones, VAE, batch-norm statistics, LLM base
    weights). Never differentiated, never in the optimiser state.

Batch (see DESIGN section 3), NHWC, images float32 normalised by `method.normalization`:
  query_image [B,H,W,3], query_mask [B,H,W] uint8 (0 bg, 1 fg, 255 ignore),
  support_images [B,K,H,W,3], support_masks [B,K,H,W] uint8, class_id [B] int32.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

PyTree = Any


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """The compute dtype a method uses: config.model.dtype, else config.train.precision.

  Returns None for float32 (Flax's default) or jnp.bfloat16; parameters stay float32.
  """
  name = (config.get("model", {}).get("dtype", "")
          or config.get("train", {}).get("precision", "float32"))
  if name in ("float32", "fp32"):
    return None
  if name in ("bfloat16", "bf16"):
    return jnp.bfloat16
  raise ValueError(f"Unknown compute precision {name!r}; expected 'float32' or 'bfloat16'")


class Method(abc.ABC):
  """Base class of a few-shot segmentation method.

  Attributes:
    kshot: 'vote' -- the evaluator runs K one-shot predictions and votes (HSNet rule);
      'joint' -- `predict` receives all K supports at once (for example DiffewS's K/V bank).
    threshold: foreground where `predict(...) > threshold`.
    normalization: image normalisation the data pipeline applies for this method:
      'imagenet' (mean/std of ImageNet on [0,1] pixels) or 'minus_one_one' ([-1, 1]).
    align_corners: whether scores are upsampled to the original query size with
      corner-aligned bilinear interpolation (HSNet) or half-pixel centres.
  """

  kshot: str = "vote"
  threshold: float = 0.0
  normalization: str = "imagenet"
  align_corners: bool = True

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @classmethod
  def missing_inputs(cls, config: ml_collections.ConfigDict) -> list[str]:
    """Lines naming each file the method needs per `config` that does not exist (weights).

    Checked before a job starts (`fssjax.train.preflight`), so that a run without its inputs
    fails at once with one message listing all of them. Only checks paths; loading checks
    contents.
    """
    del config
    return []

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[PyTree, PyTree]:
    """Returns (params, frozen) for an example batch (only shapes matter)."""

  @abc.abstractmethod
  def loss(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss (scalar) and a dict of scalar metrics."""

  @abc.abstractmethod
  def predict(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
    """Foreground scores [B, h, w] float32, at the query resolution or the model's own.

    The evaluator upsamples the scores once (bilinear, `self.align_corners`) to the resolution
    that is scored (the batch's query size, or each query's original size) and takes
    `scores > self.threshold` as foreground. Returning native-resolution scores (HSNet: a
    quarter of the input) keeps that a single interpolation, as in the published code.
    """
