"""The small interface every method implements, and the helpers it shares.

A method owns its Linen module(s), its loss and its prediction. The generic trainer
(`fssjax.train`) and the evaluators (`fssjax.evaluators`) only ever talk to this interface:

  * `init(rng, batch) -> variables`: one nested dict of every array of the model, pure and
    traceable (no file reads, no numpy conversion of traced values). The trainer runs it
    shard-first: `jax.eval_shape` for the shapes, then `jax.jit(..., out_shardings=...)`, so
    every leaf is created where it lives and no process holds a replicated copy.
  * the trainer splits the variables by `trainable_patterns()` (regular expressions over the
    '/'-joined leaf paths, `config.model.trainable`, default the method's published
    `TRAINABLE`) into two trees of the same nesting (`partition`):
      - `params`: the matched leaves; the only ones differentiated and in the optimiser state;
      - `frozen`: everything else (pretrained backbones, VAE, BatchNorm statistics, LLM base
        weights); never differentiated, never in the optimiser state, never checkpointed.
  * `load_pretrained(params, frozen) -> (params, frozen)`: the host-side second step that
    reads published weights tensor by tensor into the already sharded trees
    (`place` puts each tensor with its leaf's sharding; `params` is None when only the frozen
    leaves are wanted, on resume and evaluation where `params` come from a checkpoint).
  * `loss(params, frozen, batch, rng)` and `predict(params, frozen, batch)`; `merge(params,
    frozen)` gives the whole variables tree back.
  * `views()` / `texts()`: extra image views and text fields the method needs in its batch
    (`fssjax.data.views.ViewSpec` / `TextSpec`), built by the data pipeline's workers.
  * dense methods (semantic segmentation over whole images, `train_data = 'dense'`):
    `dense_inputs(source, split) -> DenseInputs`, what a dense sample carries beyond the
    image and its label map (per-image arrays such as LLM priors, arrays shared by every
    training sample such as class-name embeddings, training targets computed in the data
    workers, per-image candidate names); the dense batch keys are in the
    `fssjax.data.pipeline` module docstring.

Batch contract (NumPy in the loaders, global `jax.Array`s sharded over the batch dimension in
the step; every key, its shape, dtype and meaning are defined in the `fssjax.data.pipeline`
module docstring, the extra view keys in `fssjax.data.views`). B episodes, K supports,
H = W = `data.image_size`:

  query_image      float32 [B, H, W, 3]     normalised per `Method.normalization`
  query_mask       uint8   [B, H, W]        0 background, 1 the class, 255 ignore
  support_images   float32 [B, K, H, W, 3]
  support_masks    uint8   [B, K, H, W]
  class_id         int32   [B]
  support_empty    bool    [B, K]           (when `data.support_check_size` is set)
  query_image@{v}  float32 [B, s, s, 3]     per declared view v (and support_images@{v},
                                            query_size@{v}, support_size@{v})
  text@{t}         int32   [B, L]           per declared text t (and text_mask@{t} uint8)
Evaluation batches add `valid` bool [B] and `episode_index` int32 [B], and, when scoring at
the original size, `query_size` int32 [B, 2] and `query_mask_orig` uint8 [B, Hmax, Wmax].
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PyTree = Any

# The compute-precision names accepted anywhere (config.train.precision, config.model.dtype).
PRECISIONS = {"float32": None, "fp32": None, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


class ConfigError(ValueError):
  """A config value that cannot work (the message names the key, the value and what fits)."""


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """The compute dtype a method uses: config.model.dtype, else config.train.precision.

  Returns None for float32 (Flax's default) or jnp.bfloat16; parameters stay float32.

  Raises:
    ConfigError: an unknown precision name.
  """
  name = (config.get("model", {}).get("dtype", "")
          or config.get("train", {}).get("precision", "float32"))
  return precision_dtype(name, "model.dtype / train.precision")


def precision_dtype(name: str, key: str = "train.precision") -> Any:
  """None (float32) or jnp.bfloat16 for a precision name (see PRECISIONS)."""
  if name not in PRECISIONS:
    raise ConfigError(f"{key}={name!r}: unknown compute precision; expected one of "
                      f"{sorted(PRECISIONS)}")
  return PRECISIONS[name]


# ----------------------------------------------------------------------------------------
# Paths, partition by pattern, placement.


def leaf_paths(tree: PyTree) -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested dict (the '/'-joined keys the trainable patterns match)."""
  out = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k in node:
        walk(node[k], f"{prefix}/{k}" if prefix else str(k))
    else:
      out[prefix] = node

  walk(tree, "")
  return out


def _build(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    parts = path.split("/")
    node = out
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = leaf
  return out


def partition(variables: PyTree, patterns: Sequence[str]) -> tuple[dict, dict]:
  """(params, frozen): the leaves whose path fully matches one of `patterns`, and the rest.

  Both keep the nesting of `variables` (a subtree with no leaf is absent).

  Raises:
    ConfigError: a pattern that is not a valid regular expression, or that matches no leaf
      (named, with a few of the existing paths).
  """
  flat = leaf_paths(variables)
  compiled = []
  for p in patterns:
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ConfigError(f"model.trainable: {p!r} is not a regular expression ({e})") from None
  hits = {p.pattern: 0 for p in compiled}
  params, frozen = {}, {}
  for path, leaf in flat.items():
    matched = [p.pattern for p in compiled if p.fullmatch(path)]
    for m in matched:
      hits[m] += 1
    (params if matched else frozen)[path] = leaf
  unused = [p for p, n in hits.items() if n == 0]
  if unused:
    tops = sorted({path.rsplit("/", 1)[0] for path in flat})
    near = difflib.get_close_matches(unused[0].replace(".*", "").rstrip("/"), tops, n=3,
                                     cutoff=0.3)
    raise ConfigError(
        f"model.trainable: the pattern(s) {unused} match no parameter (patterns are regular "
        f"expressions that must match a whole '/'-joined path). Paths look like "
        f"{sorted(flat)[:3]}{'; near: ' + str(near) if near else ''}")
  return _build(params), _build(frozen)


def merge(params: PyTree, frozen: PyTree) -> dict:
  """The whole variables tree of two disjoint trees (the inverse of `partition`)."""
  flat = leaf_paths(frozen or {})
  flat.update(leaf_paths(params or {}))
  return _build(flat)


def tree_size(tree: PyTree) -> tuple[int, int]:
  """(number of elements, bytes) of the array (or ShapeDtypeStruct) leaves of `tree`."""
  leaves = jax.tree.leaves(tree)
  n = sum(int(np.prod(x.shape)) for x in leaves)
  b = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
  return n, b


def place(like: Any, value: np.ndarray, name: str = "") -> jax.Array:
  """`value` (host) as a jax.Array with the shape, dtype and sharding of `like`.

  Each device receives only its own slice (`jax.make_array_from_callback`), so a sharded
  leaf never exists whole on one device.

  Raises:
    ValueError: the shapes differ (naming `name`).
  """
  if tuple(value.shape) != tuple(like.shape):
    raise ValueError(f"{name or 'weight'}: shape {tuple(value.shape)} does not fit the "
                     f"model's {tuple(like.shape)}")
  value = np.asarray(value).astype(like.dtype, copy=False)
  return jax.make_array_from_callback(tuple(like.shape), like.sharding, lambda idx: value[idx])


def replace_leaves(params: PyTree | None, frozen: PyTree,
                   values: Iterable[tuple[str, Callable[[], np.ndarray]]]) -> tuple[Any, Any]:
  """Sets leaves of (params, frozen) by path, one host tensor at a time.

  `values` yields (path, thunk): the thunk reads and converts one tensor and is only called
  when the leaf is wanted (leaves of `params` are skipped when `params` is None). Every path
  must name an existing leaf of one of the trees.
  """
  p_flat = leaf_paths(params) if params is not None else {}
  f_flat = leaf_paths(frozen)
  for path, thunk in values:
    if path in p_flat:
      p_flat[path] = place(p_flat[path], thunk(), path)
    elif path in f_flat:
      f_flat[path] = place(f_flat[path], thunk(), path)
    elif params is not None:
      raise ValueError(f"load_pretrained: no parameter {path!r} in the model")
  return (_build(p_flat) if params is not None else None), _build(f_flat)


def check_model_keys(config: ml_collections.ConfigDict, defaults: Mapping[str, Any],
                     method: str) -> dict[str, Any]:
  """config.model over `defaults` (every key the method reads, with its default).

  Raises:
    ConfigError: an unknown key, naming it and the nearest known keys.
  """
  model = config.get("model", None) or ml_collections.ConfigDict()
  known = set(defaults) | {"trainable"}
  for key in model.keys():
    if key not in known:
      near = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.5)
      raise ConfigError(
          f"config.model.{key}: unknown key for method {method!r}"
          f"{' (did you mean ' + ' or '.join('model.' + n for n in near) + '?)' if near else ''}"
          f". Its keys: {sorted(known)}")
  return {k: model.get(k, v) for k, v in defaults.items()}


def initialize(method: "Method", rng: jax.Array, batch: Mapping[str, Any]
               ) -> tuple[dict, dict]:
  """(params, frozen) of `method` on the default device: init, split by the trainable
  patterns, published weights loaded. For tests and notebooks; the trainer does the same
  shard-first (`fssjax.train.init_state`)."""
  params, frozen = partition(method.init(rng, batch), method.trainable_patterns())
  return method.load_pretrained(params, frozen)


# ----------------------------------------------------------------------------------------
# The interface.


@dataclasses.dataclass
class DenseInputs:
  """What a dense method adds to the samples of one dense source (`Method.dense_inputs`).

  Attributes:
    per_image: {batch key: array [len(source), ...]}: row i travels with image i, in training
      samples and in the dense evaluator's batches (padding rows: zeros). LLMFormer: the prior
      embeddings of each image's description ('prior_objects', ...).
    shared: {batch key: array [...]}: the same array in every training sample (batch
      [B, ...]); not used by the evaluator. LLMFormer: 'class_embeddings' [K, D], the text
      embeddings of the training class names.
    targets: None (the sample carries 'label' int32 [S, S], ignore = the source's ignore
      label), or a picklable `fn(label int32 [S, S], ignore_label int) -> {batch key: array}`
      run in the data workers in its place. LLMFormer: one binary mask per class present
      (`fssjax.data.dense.semantic_targets`: 'target_classes', 'target_masks').
    candidates: None, or per image the class names read from its description (a tuple of
      str each): the dense evaluator's candidate-free mode (`candidates='description'`).
  """

  per_image: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  shared: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  targets: Callable[[np.ndarray, int], Mapping[str, np.ndarray]] | None = None
  candidates: Sequence[Sequence[str]] | None = None


class Method(abc.ABC):
  """Base class of a few-shot segmentation method.

  Class attributes:
    MODEL_DEFAULTS: every `config.model` key the method reads, with its default (plus
      `trainable`, common to all); any other key is an error.
    TRAINABLE: the published trainable leaves, as regular expressions over '/'-joined paths
      of `init`'s tree; `config.model.trainable` (a list) replaces them.
    kshot: 'vote' -- the evaluator runs K one-shot predictions and votes (HSNet rule);
      'joint' -- `predict` receives all K supports at once (for example DiffewS's K/V bank).
    threshold: foreground where `predict(...) > threshold`.
    normalization: image normalisation the data pipeline applies for this method
      (`fssjax.data.transforms.NORMALIZATIONS`, e.g. 'imagenet' or 'minus_one_one').
    align_corners: whether scores are upsampled to the scored size with corner-aligned
      bilinear interpolation (HSNet) or half-pixel centres.
    interpolation: 'bilinear' (HSNet's `F.interpolate` of its logits) or 'nearest' (DiffewS
      resizes its decoded mask image with nearest neighbours) for that upsampling.
    evaluators: the `config.evals` types the method supports ('episodic'; 'dense' needs
      `predict_dense(params, frozen, batch, class_names) -> [B, h, w, C]` logits, see
      `fssjax.evaluators.DenseMethod`; 'retrieval' needs `image_features(params, frozen,
      images [N,H,W,3]) -> [N, h, w, C]` feature maps (or pooled [N, D]; then only
      `similarity='global'`), see `fssjax.methods.retrieval`).
    train_data: what the generic trainer feeds `loss`: 'episodes' (few-shot episodes,
      `fssjax.data.pipeline.train_loader`) or 'dense' (whole images with label maps of the
      dense data block `config.data.train`, `fssjax.data.pipeline.dense_train_loader`, plus
      what `dense_inputs` declares).
  """

  MODEL_DEFAULTS: Mapping[str, Any] = {}
  TRAINABLE: tuple[str, ...] = (".*",)
  kshot: str = "vote"
  threshold: float = 0.0
  normalization: str = "imagenet"
  align_corners: bool = True
  interpolation: str = "bilinear"
  evaluators: tuple[str, ...] = ("episodic",)
  train_data: str = "episodes"
  # `model.<key>` names that only change evaluation (not the trained network): the resume /
  # `--mode=eval` config checks skip them, and results files are tagged with their values.
  evaluation_keys: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.opts = check_model_keys(config, self.MODEL_DEFAULTS, str(config.get("method", "")))

  @classmethod
  def model_keys(cls, config: ml_collections.ConfigDict) -> None:
    """Checks config.model's keys without building the method (fails on an unknown one)."""
    check_model_keys(config, cls.MODEL_DEFAULTS, str(config.get("method", "")))

  @classmethod
  def missing_inputs(cls, config: ml_collections.ConfigDict) -> list[str]:
    """Lines naming each file the method needs per `config` that does not exist (weights).

    Checked before a job starts (`fssjax.train.preflight`), so that a run without its inputs
    fails at once with one message listing all of them. Only checks paths; loading checks
    contents.
    """
    del config
    return []

  def trainable_patterns(self) -> list[str]:
    """`config.model.trainable` when set, else the published `TRAINABLE`."""
    given = self.config.get("model", {}).get("trainable", None)
    if given is None:
      return list(self.TRAINABLE)
    if isinstance(given, str):
      given = [given]
    return [str(p) for p in given]

  def views(self) -> list:
    """Extra image views (`fssjax.data.views.ViewSpec`) the batch must carry (default none)."""
    return []

  def texts(self) -> list:
    """Text fields (`fssjax.data.views.TextSpec`) the batch must carry (default none)."""
    return []

  def dense_inputs(self, source, split: str) -> DenseInputs:
    """What dense samples of `source` (a `fssjax.evaluators.DenseSource`) carry beyond the
    image and label map, for `split` 'train' (the trainer's dense pipeline) or 'eval' (the
    dense evaluator). Host-side, called once per source. Default: nothing."""
    del source, split
    return DenseInputs()

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> dict:
    """All variables for an example batch (only shapes matter); pure and traceable."""

  def load_pretrained(self, params: PyTree | None, frozen: PyTree) -> tuple[Any, Any]:
    """Published weights into the sharded (params, frozen); host-side, tensor by tensor.

    `params` None: only the frozen leaves are wanted. Default: nothing to load.
    """
    return params, frozen

  @abc.abstractmethod
  def loss(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss (scalar) and a dict of scalar metrics."""

  @abc.abstractmethod
  def predict(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
    """Foreground scores [B, h, w] float32, at the query resolution or the model's own.

    The evaluator resizes the scores once (`self.interpolation`, `self.align_corners`) to the
    resolution that is scored (the batch's query size, or each query's original size) and
    takes `scores > self.threshold` as foreground. Returning native-resolution scores
    (HSNet: a quarter of the input) keeps that a single interpolation, as published.
    """
