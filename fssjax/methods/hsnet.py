"""HSNet as an fssjax method (Min, Kang, Cho: Hypercorrelation Squeeze for Few-Shot
Segmentation, ICCV 2021; published code juhongm999/hsnet).

Config keys (`config.model`, all optional; defaults in brackets):
  backbone ['resnet50']: resnet50 | resnet101 | vgg16 | resnet_tiny (small, GroupNorm, for
    from-scratch CPU demos).
  backbone_weights ['']: torchvision ImageNet state dict (safetensors; see
    fssjax.weights.torchvision). Empty: random init (a warning is logged unless the backbone
    is trainable, as for the from-scratch demo).
  allow_pickle_weights [False]: allow a pickled .pth for backbone_weights (imports torch).
  backbone_trainable [False]: published HSNet freezes the backbone (False): its parameters and
    BatchNorm statistics go to `frozen` and features are wrapped in stop_gradient. True: the
    backbone's parameters join `params` (BatchNorm statistics stay frozen, in inference mode).
  learner_channels [(16, 64, 128)]: HPN learner channels (published).
  loss_boundary ['ignore']: query-mask pixels labelled 255 are 'ignore'd in the loss, or counted
    as 'background' -- the published behaviour: HSNet's PASCAL loader maps the 255 boundary to
    0 in the training mask and its nn.CrossEntropyLoss has no ignore index.
  train_support ['first']: K > 1 training episodes use only the first support ('first'; HSNet
    trains 1-shot), or 'all' K supports as K one-shot pairs with the same query (loss averaged).
  dtype ['']: compute dtype; '' uses config.train.precision ('float32' | 'bfloat16');
    parameters stay float32.

Prediction: `kshot = 'vote'`. A 1-shot batch gives scores = logit_fg - logit_bg (foreground
where > 0, i.e. the argmax). A K-shot batch runs the K one-shot predictions and votes as
published: foreground where votes / max(max votes in the image, 1) >= 0.5; the returned scores
are `votes / max(max_votes, 1) - 0.5 + 1 / (4K)`, positive exactly where that rule says
foreground (so `scores > 0` reproduces it).

Support masks: pixels equal to 1 are foreground; 0 and 255 are background for the support
(as published, where the boundary becomes 0).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fssjax.methods.base import Method, compute_dtype
from fssjax.nn.hsnet import HSNet as HSNetModule
from fssjax.nn.ops import resize_bilinear
from fssjax.weights import torchvision as tv_weights

PyTree = Any

IGNORE = 255

_DEFAULTS = dict(
    backbone="resnet50",
    backbone_weights="",
    allow_pickle_weights=False,
    backbone_trainable=False,
    learner_channels=(16, 64, 128),
    loss_boundary="ignore",
    train_support="first",
    dtype="",
)


def _seed_from_key(rng: jax.Array) -> np.ndarray:
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return np.asarray(rng, np.uint32).ravel()


def pytorch_default_init(shapes: PyTree, rng: jax.Array) -> PyTree:
  """Initial variables as PyTorch / torchvision would initialise the published modules.

  Generated with numpy from `rng`'s bits: no XLA compilation (jitted Flax initialisers with
  threefry take minutes to compile on a loaded CPU). Rules (by variable path):
    * learner convs (PyTorch's nn.Conv2d default, as HSNet uses): weight and bias
      ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = kh * kw * in_channels;
    * backbone convs (torchvision ResNet / VGG init): weight ~ N(0, 2 / (kh * kw * out)),
      bias 0;
    * GroupNorm / BatchNorm: scale 1, bias 0; running mean 0, running variance 1.

  Args:
    shapes: `jax.eval_shape(module.init, ...)` output ({'params': ..., 'batch_stats': ...}).
    rng: a JAX PRNG key (typed or raw uint32).

  Returns:
    The same structure with float32 numpy arrays.
  """
  gen = np.random.default_rng(_seed_from_key(rng))

  def init_module(path: tuple[str, ...], leaves: dict) -> dict:
    out = {}
    kernel = leaves.get("kernel")
    in_backbone = "backbone" in path
    for name in sorted(leaves):
      shape = tuple(leaves[name].shape)
      if kernel is not None and name in ("kernel", "bias"):
        kh, kw, cin, cout = kernel.shape
        if in_backbone:
          value = (gen.normal(0.0, np.sqrt(2.0 / (kh * kw * cout)), shape) if name == "kernel"
                   else np.zeros(shape))
        else:
          bound = 1.0 / np.sqrt(kh * kw * cin)
          value = gen.uniform(-bound, bound, shape)
      elif name in ("scale", "var"):
        value = np.ones(shape)
      elif name in ("bias", "mean"):
        value = np.zeros(shape)
      else:
        raise ValueError(f"pytorch_default_init: no rule for variable {'/'.join(path + (name,))}")
      out[name] = value.astype(np.float32)
    return out

  def walk(tree, path):
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    out = init_module(path, leaves) if leaves else {}
    for k, v in tree.items():
      if isinstance(v, Mapping):
        out[k] = walk(v, path + (k,))
    return out

  return {collection: walk(tree, (collection,)) for collection, tree in shapes.items()}


class HSNet(Method):
  """Hypercorrelation Squeeze Network behind the fssjax Method interface."""

  kshot = "vote"
  threshold = 0.0
  normalization = "imagenet"
  align_corners = True

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    model_cfg = config.get("model", ml_collections.ConfigDict())
    unknown = sorted(set(model_cfg.keys()) - set(_DEFAULTS))
    if unknown:
      raise ValueError(f"Unknown config.model key(s) for hsnet: {unknown}; known: "
                       f"{sorted(_DEFAULTS)}")
    self.opts = {k: model_cfg.get(k, v) for k, v in _DEFAULTS.items()}
    if self.opts["loss_boundary"] not in ("ignore", "background"):
      raise ValueError(f"config.model.loss_boundary={self.opts['loss_boundary']!r}; expected "
                       "'ignore' or 'background'")
    if self.opts["train_support"] not in ("first", "all"):
      raise ValueError(f"config.model.train_support={self.opts['train_support']!r}; expected "
                       "'first' or 'all'")
    self.trainable_backbone = bool(self.opts["backbone_trainable"])
    self.model = HSNetModule(
        backbone_name=self.opts["backbone"],
        learner_channels=tuple(self.opts["learner_channels"]),
        backbone_trainable=self.trainable_backbone,
        dtype=compute_dtype(config),
    )

  @classmethod
  def missing_inputs(cls, config: ml_collections.ConfigDict) -> list[str]:
    path = config.model.get("backbone_weights", "")
    if path and not os.path.isfile(path):
      return [f"model.backbone_weights = {path!r}: no such file ({os.path.abspath(path)}); "
              "expected a torchvision ImageNet state dict saved as safetensors"]
    return []

  # ---------------------------------------------------------------------------------------------
  # Parameters.

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[PyTree, PyTree]:
    q = jax.ShapeDtypeStruct((1,) + tuple(batch["query_image"].shape[1:]), jnp.float32)
    s = jax.ShapeDtypeStruct((1,) + tuple(batch["support_images"].shape[2:]), jnp.float32)
    m = jax.ShapeDtypeStruct((1,) + tuple(batch["support_masks"].shape[2:]), jnp.float32)
    shapes = jax.eval_shape(self.model.init, rng, q, s, m)
    variables = pytorch_default_init(shapes, rng)
    backbone = {"params": variables["params"]["backbone"]}
    if "batch_stats" in variables:
      backbone["batch_stats"] = variables["batch_stats"]["backbone"]

    path = self.opts["backbone_weights"]
    if path:
      backbone = tv_weights.load_backbone_variables(
          path, backbone, allow_pickle=bool(self.opts["allow_pickle_weights"]))
      logging.info("HSNet: loaded %s backbone weights from %s", self.opts["backbone"], path)
    elif not self.trainable_backbone:
      logging.warning(
          "HSNet: config.model.backbone_weights is empty: the FROZEN %s backbone is randomly "
          "initialised. Published results need ImageNet weights (a torchvision state dict as "
          "safetensors).", self.opts["backbone"])
    else:
      logging.info("HSNet: training the %s backbone from scratch (no backbone_weights).",
                   self.opts["backbone"])

    params = {"learner": variables["params"]["learner"]}
    frozen: dict[str, PyTree] = {}
    if self.trainable_backbone:
      params["backbone"] = backbone["params"]
    else:
      frozen["params"] = {"backbone": backbone["params"]}
    if "batch_stats" in backbone:
      frozen["batch_stats"] = {"backbone": backbone["batch_stats"]}
    return params, frozen

  def _variables(self, params: PyTree, frozen: PyTree) -> dict[str, PyTree]:
    variables = {"params": {**params, **frozen.get("params", {})}}
    if "batch_stats" in frozen:
      variables["batch_stats"] = frozen["batch_stats"]
    return variables

  def logits(self, params: PyTree, frozen: PyTree, query_image: jax.Array,
             support_image: jax.Array, support_mask: jax.Array) -> jax.Array:
    """One-shot logits [B, H, W, 2] (float32) for query [B,H,W,3], one support each.

    support_mask: [B, H, W] uint8 (1 foreground; 0 and 255 background).
    """
    fg = (support_mask == 1).astype(jnp.float32)
    return self.model.apply(self._variables(params, frozen), query_image, support_image, fg)

  # ---------------------------------------------------------------------------------------------
  # Training.

  def loss(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    del rng  # HSNet has no stochastic layers.
    query, target = batch["query_image"], batch["query_mask"]
    supports, masks = batch["support_images"], batch["support_masks"]
    if self.opts["train_support"] == "first" or supports.shape[1] == 1:
      support, mask = supports[:, 0], masks[:, 0]
    else:
      k = supports.shape[1]
      query = jnp.repeat(query, k, axis=0)
      target = jnp.repeat(target, k, axis=0)
      support = supports.reshape((-1,) + supports.shape[2:])
      mask = masks.reshape((-1,) + masks.shape[2:])
    logits = self.logits(params, frozen, query, support, mask)
    if logits.shape[1:3] != target.shape[1:3]:
      logits = resize_bilinear(logits, target.shape[1:3], axes=(1, 2), align_corners=True)
    labels = (target == 1).astype(jnp.int32)
    if self.opts["loss_boundary"] == "ignore":
      valid = (target != IGNORE).astype(jnp.float32)
    else:
      valid = jnp.ones(target.shape, jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    n_valid = jnp.maximum(valid.sum(), 1.0)
    loss = (ce * valid).sum() / n_valid

    pred = (logits[..., 1] > logits[..., 0]).astype(jnp.float32)
    fg = labels.astype(jnp.float32)
    inter = (pred * fg * valid).sum()
    union = (jnp.maximum(pred, fg) * valid).sum()
    metrics = {
        "loss": loss,
        "pixel_acc": ((pred == fg) * valid).sum() / n_valid,
        "fg_iou": inter / jnp.maximum(union, 1.0),
    }
    return loss, metrics

  # ---------------------------------------------------------------------------------------------
  # Inference.

  def predict(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
    query = batch["query_image"]
    supports, masks = batch["support_images"], batch["support_masks"]
    b, k = supports.shape[:2]
    size = query.shape[1:3]
    if k == 1:
      logits = self.logits(params, frozen, query, supports[:, 0], masks[:, 0])
      if logits.shape[1:3] != size:
        logits = resize_bilinear(logits, size, axes=(1, 2), align_corners=True)
      return logits[..., 1] - logits[..., 0]
    # K one-shot predictions in one batched pass, then the published vote.
    logits = self.logits(params, frozen, jnp.repeat(query, k, axis=0),
                         supports.reshape((-1,) + supports.shape[2:]),
                         masks.reshape((-1,) + masks.shape[2:]))
    if logits.shape[1:3] != size:
      logits = resize_bilinear(logits, size, axes=(1, 2), align_corners=True)
    votes = (logits[..., 1] > logits[..., 0]).astype(jnp.float32).reshape((b, k) + tuple(size))
    votes = votes.sum(axis=1)
    max_vote = jnp.maximum(votes.reshape(b, -1).max(axis=1), 1.0)[:, None, None]
    return votes / max_vote - 0.5 + 1.0 / (4 * k)


METHOD = HSNet
