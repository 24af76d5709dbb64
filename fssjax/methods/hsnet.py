"""HSNet as an fssjax method (Min, Kang, Cho: Hypercorrelation Squeeze for Few-Shot
Segmentation, ICCV 2021; published code juhongm999/hsnet).

Config keys (`config.model`, all optional; defaults in brackets):
  backbone ['resnet50']: resnet50 | resnet101 | vgg16 | resnet_tiny (small, GroupNorm, for
    from-scratch CPU demos).
  backbone_weights ['']: torchvision ImageNet state dict (safetensors; see
    fssjax.weights.torchvision). Empty: random init (a warning is logged unless the backbone
    is trainable, as for the from-scratch demo).
  allow_pickle_weights [False]: allow a pickled .pth for backbone_weights (imports torch).
  trainable [('params/learner/.*',)]: regular expressions over the variable paths
    ('params/learner/...', 'params/backbone/...', 'batch_stats/backbone/...'). Published HSNet
    trains the learner only (the backbone and its BatchNorm statistics are frozen);
    the from-scratch demo adds 'params/backbone/.*'. BatchNorm always runs in inference mode.
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
published (`fssjax.metrics.vote`: foreground where votes / max(max votes in the image, 1)
>= 0.5); the returned scores are +0.5 there and -0.5 elsewhere. (The evaluator runs K one-shot
passes itself and votes at the scored resolution.)

Support masks: pixels equal to 1 are foreground; 0 and 255 are background for the support
(as published, where the boundary becomes 0).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fssjax import metrics
from fssjax.data.base import IGNORE
from fssjax.methods import base
from fssjax.methods.base import Method, compute_dtype
from fssjax.nn.hsnet import HSNet as HSNetModule
from fssjax.nn.ops import resize_bilinear
from fssjax.weights import torchvision as tv_weights

PyTree = Any

_DEFAULTS = dict(
    backbone="resnet50",
    backbone_weights="",
    allow_pickle_weights=False,
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

  MODEL_DEFAULTS = _DEFAULTS
  TRAINABLE = ("params/learner/.*",)
  kshot = "vote"
  threshold = 0.0
  normalization = "imagenet"
  align_corners = True
  evaluators = ("episodic", "retrieval")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    if self.opts["loss_boundary"] not in ("ignore", "background"):
      raise base.ConfigError(f"config.model.loss_boundary={self.opts['loss_boundary']!r}; "
                             "expected 'ignore' or 'background'")
    if self.opts["train_support"] not in ("first", "all"):
      raise base.ConfigError(f"config.model.train_support={self.opts['train_support']!r}; "
                             "expected 'first' or 'all'")
    # Frozen backbone leaves are constants of the differentiated function, so no gradient
    # reaches them whether or not the features pass through stop_gradient.
    self.model = HSNetModule(
        backbone_name=self.opts["backbone"],
        learner_channels=tuple(self.opts["learner_channels"]),
        backbone_trainable=True,
        dtype=compute_dtype(config),
    )

  @classmethod
  def missing_inputs(cls, config: ml_collections.ConfigDict) -> list[str]:
    path = config.model.get("backbone_weights", "")
    if path and not os.path.isfile(path):
      return [f"model.backbone_weights = {path!r}: no such file ({os.path.abspath(path)}); "
              "expected a torchvision ImageNet state dict saved as safetensors"]
    trainable = config.model.get("trainable", None) or cls.TRAINABLE
    trainable = [trainable] if isinstance(trainable, str) else list(trainable)
    backbone = config.model.get("backbone", _DEFAULTS["backbone"])
    # A frozen random ImageNet backbone (resnet50 / resnet101 / vgg16) is never meant: stop.
    # (resnet_tiny has no published weights; tests and demos use it from scratch.)
    if (not path and backbone != "resnet_tiny"
        and not any(re.fullmatch(str(p), "params/backbone/x") for p in trainable)):
      return [f"model.backbone_weights is empty, but the {backbone} backbone is frozen "
              f"(model.trainable = {trainable}): HSNet as published needs ImageNet weights (a "
              "torchvision state dict saved as safetensors; config argument weights=PATH). To "
              "train the backbone from scratch instead, add 'params/backbone/.*' to "
              "model.trainable"]
    return []

  # ---------------------------------------------------------------------------------------------
  # Parameters.

  def _shapes(self, rng: jax.Array, hw: tuple[int, int]) -> PyTree:
    q = jax.ShapeDtypeStruct((1,) + tuple(hw) + (3,), jnp.float32)
    m = jax.ShapeDtypeStruct((1,) + tuple(hw), jnp.float32)
    return jax.eval_shape(self.model.init, rng, q, q, m)

  def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> dict:
    """{'params': {'backbone', 'learner'}, 'batch_stats': {'backbone'}} (BatchNorm backbones).

    The values are `pytorch_default_init`'s (NumPy, seeded by `rng`'s bits), computed in a
    `jax.pure_callback`, so `init` traces: under `jax.jit` with output shardings the arrays
    are created where they live.
    """
    shapes = self._shapes(rng, tuple(batch["query_image"].shape[1:3]))
    leaves, treedef = jax.tree.flatten(shapes)
    key = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng

    def host(key_bits):
      return [np.asarray(x, np.float32) for x in
              jax.tree.leaves(pytorch_default_init(shapes, np.asarray(key_bits)))]

    values = jax.pure_callback(
        host, [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in leaves], key)
    return jax.tree.unflatten(treedef, values)

  def load_pretrained(self, params: PyTree | None, frozen: PyTree) -> tuple[Any, Any]:
    """The torchvision backbone of `model.backbone_weights`, tensor by tensor."""
    path = self.opts["backbone_weights"]
    name = self.opts["backbone"]
    if not path:
      frozen_backbone = "backbone" in (frozen.get("params") or {})
      if frozen_backbone:
        logging.warning(
            "HSNet: config.model.backbone_weights is empty: the FROZEN %s backbone is randomly "
            "initialised. Published results need ImageNet weights (a torchvision state dict as "
            "safetensors).", name)
      else:
        logging.info("HSNet: training the %s backbone from scratch (no backbone_weights).", name)
      return params, frozen
    size = int(self.config.data.image_size)
    shapes = self._shapes(jax.random.PRNGKey(0), (size, size))
    template = {c: tree["backbone"] for c, tree in shapes.items() if "backbone" in tree}
    files = tv_weights.read_state_dict(path, bool(self.opts["allow_pickle_weights"]))
    items = tv_weights.plan_backbone(files, template, source=path)
    params, frozen = base.replace_leaves(
        params, frozen, [(f"{p[0]}/backbone/{'/'.join(p[1:])}", thunk) for p, thunk in items])
    logging.info("HSNet: loaded %s backbone weights from %s", name, path)
    return params, frozen

  def _variables(self, params: PyTree, frozen: PyTree) -> dict[str, PyTree]:
    return base.merge(params, frozen)

  def logits(self, params: PyTree, frozen: PyTree, query_image: jax.Array,
             support_image: jax.Array, support_mask: jax.Array) -> jax.Array:
    """One-shot logits [B, H, W, 2] (float32) for query [B,H,W,3], one support each.

    support_mask: [B, H, W] uint8 (1 foreground; 0 and 255 background).
    """
    fg = (support_mask == 1).astype(jnp.float32)
    return self.model.apply(self._variables(params, frozen), query_image, support_image, fg)

  def image_features(self, params: PyTree, frozen: PyTree, images: jax.Array) -> jax.Array:
    """Backbone feature maps [N, h, w, C] float32 of images [N, H, W, 3] (normalised as the
    method's input): the first tap at stride 16 (h = the tap size nearest H / 16; ResNet's
    first stage-3 tap). The visual similarity of LLM-guided support retrieval
    (`fssjax.methods.retrieval`) pools these maps itself: over a candidate support's mask,
    and per location for the query.

    Stride 16 rather than the last tap: on the embedded benchmark the deepest (stride-32)
    tap of the demo's backbone barely separates objects at all (docs/language.md), and a
    stride-16 map still has several locations per object, so a support's object can be
    matched to one object of a query that holds several.
    """
    feats = self.model.apply(self._variables(params, frozen), images,
                             method=lambda m, x: m.features(x))
    target = images.shape[1] / 16
    tap = min(range(len(feats)), key=lambda i: (abs(feats[i].shape[1] - target), i))
    return feats[tap].astype(jnp.float32)

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
    fg = (logits[..., 1] > logits[..., 0]).reshape((b, k) + tuple(size))
    return jnp.where(metrics.vote(fg), 0.5, -0.5)


METHOD = HSNet
