"""Evaluators chosen by the config (`config.evals`): episodic few-shot and dense semantic.

`config.evals` is a ConfigDict of named evaluators, each a ConfigDict with a `type`:

  evals.fewshot = dict(type='episodic', every=-1, prefix='eval')
  evals.ade150 = dict(type='dense', every=0, prefix='ade150',
                      data=dict(dataset='ade20k_150', root='/data/ADEChallengeData2016',
                                image_size=640))

(a dense `data.dataset` is a source registered with `register_dense_source`, or a few-shot
data set of `fssjax.data.sources` seen as semantic segmentation: `SemanticFromFewShot`).

Common keys: `every` (-1 or absent: `train.eval_every`; N > 0: every N steps and after the
last; 0: after the last step only; < -1: never), `prefix` (TensorBoard tag prefix; default the
evaluator's name), `batch_size` (global; default `eval.batch_size`), `data` (overrides of
`config.data` for this evaluator), `model` (overrides of `config.model` for this evaluator:
the same trained params evaluated under another inference setting, for example a prompt-mode
ablation `model=dict(eval_prompt_mode='visual')`; unknown keys are refused). Without `config.evals` there is one episodic evaluator,
`fewshot`, exactly as before (prefix 'eval', cadence `train.eval_every`). `eval.primary`
names the evaluator whose mIoU is the run's headline (results.json's 'results', the best
checkpoint); default: the first of `config.evals` (a ConfigDict lists its keys sorted).

  * `episodic` (`EpisodicEvaluator`): the published few-shot protocol on the fixed test
    episodes of `config.data` (`fssjax.evaluate.evaluate`, unchanged numbers). The headline
    mIoU averages over the fold classes that could be evaluated; the classes left out (fewer
    than K + 1 images: no episode) are listed and the published logger's mean over all fold
    classes is reported beside it (`miou_all_classes`). Extra key: `num_summary_images`.
  * `dense` (`DenseEvaluator`): semantic segmentation with the open-vocabulary protocol
    (whole image, shorter side `data.image_size` (640), longer side capped by `data.max_size`
    (2560), batches padded to a common size that is never scored, scores resized back to
    each label map; the method's per-image inputs such as priors), scored as detectron2's
    `SemSegEvaluator`; extra keys `candidates` ('dataset' (default): the set's class names;
    'description': the names each image's description gives) and `num_summary_images`
    (pictures of image | truth | prediction in a fixed palette): one confusion matrix over
    the split, accumulated on the devices over the global batch (so over all devices and
    hosts), IoU per class, mIoU and mean accuracy over the classes present in the ground
    truth, frequency-weighted IoU, pixel accuracy, an ignore label per data set (255; 65535
    for the 16-bit label maps of ADE20K-847 and PASCAL-Context-459). The method must implement `predict_dense` (see
    `DenseMethod`); the data come from a `DenseSource` (see `dense_source`).
  * `retrieval` (`fssjax.methods.retrieval.make_evaluator`): LLM-guided support retrieval on
    the same queries as `episodic`: true novel-class supports, then supports from base classes
    ranked by each of `rankers` ('random', 'embedding', 'llm'); keys `top_r`, `llm`,
    `descriptions`, `seed`, `similarity` ('foreground' (default): candidate supports scored by
    their object's features against the query; 'global': whole-image pooled features). The method must implement `image_features`.

A method lists the evaluator types it supports in its class attribute `evaluators` (default
('episodic',)); `from_config` refuses a config that asks for another.

Use:

  suite = evaluators.from_config(config, method, mesh)   # builds each evaluator's test data
  if suite.due(step, is_last):
    results = suite.run(params, frozen, step, writer)    # {evaluator name: results dict}
    best = suite.headline(results)                        # the primary evaluator's mIoU
    logging.info("%s", suite.summary_line(results))
    suite.write_results(outdir, "train", step, results, config)  # fssjax.results files
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import time
import weakref
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from fssjax import evaluate
from fssjax import metrics
from fssjax import monitoring
from fssjax.data.base import DataError, Episode, SegmentationSource

PyTree = Any

EVALUATOR_TYPES = ("episodic", "dense", "retrieval")
DEFAULT_NAME = "fewshot"
_COMMON_KEYS = ("type", "every", "prefix", "batch_size", "data", "model")
_KEYS = {"episodic": _COMMON_KEYS + ("num_summary_images",),
         "dense": _COMMON_KEYS + ("candidates", "num_summary_images"),
         "retrieval": _COMMON_KEYS + ("num_summary_images", "rankers", "top_r", "llm",
                                      "descriptions", "seed", "similarity")}

# Ignore labels of the open-vocabulary benchmarks (detectron2 / CAT-Seg / SAN registrations):
# 255 for the 8-bit label maps, 65535 for the 16-bit TIFFs of the large vocabularies.
DENSE_IGNORE_LABELS = {
    "ade20k_150": 255,
    "ade20k_847": 65535,
    "pascal_context_59": 255,
    "pascal_context_459": 65535,
    "pascal_voc_20": 255,
    "coco_stuff_171": 255,
}


def _supported(method) -> tuple[str, ...]:
  return tuple(getattr(method, "evaluators", ("episodic",)))


def _resolve_every(every: int, config: ml_collections.ConfigDict) -> int:
  every = int(every)
  if every == -1:
    return int(config.train.eval_every)
  return every


def _due(every: int, step: int, is_last: bool) -> bool:
  if every < 0:
    return False
  return bool(is_last) or (every > 0 and step % every == 0)


def _method_variant(config: ml_collections.ConfigDict, method, name: str,
                    overrides: Mapping[str, Any] | None):
  """`method`, or a method of the same class built from `config` with `config.model` updated
  by `overrides` (an evaluator's `model` block: evaluate one trained model under another
  inference setting, e.g. a prompt-mode ablation, on the same episodes). The variant reads
  the same params and frozen trees, so the overrides may only change inference behaviour.

  Raises:
    ValueError: an override key the method does not know (named, with the method's keys).
  """
  if not overrides:
    return method
  cfg = ml_collections.ConfigDict(config.to_dict())
  if "model" not in cfg:
    cfg.model = ml_collections.ConfigDict()
  known = set(getattr(type(method), "MODEL_DEFAULTS", {})) | {"trainable"}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"evals.{name}.model: unknown model keys {unknown} for method "
                     f"{config.get('method', '')!r}; its keys: {sorted(known)}")
  for key, value in dict(overrides).items():
    cfg.model[key] = value
  return type(method)(cfg)


def _config_with_data(config: ml_collections.ConfigDict,
                      overrides: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  """A copy of `config` whose `data` block is updated by `overrides` (keys must exist)."""
  if not overrides:
    return config
  out = ml_collections.ConfigDict(config.to_dict())
  unknown = sorted(set(overrides) - set(out.data.keys()))
  if unknown:
    raise ValueError(f"evals.*.data: unknown data keys {unknown}; the data block has "
                     f"{sorted(out.data.keys())}")
  out.data.update(dict(overrides))
  return out


# ----------------------------------------------------------------------------------------
# The evaluator interface.


class Evaluator(abc.ABC):
  """One named evaluator of a run (see the module docstring)."""

  type: str = ""

  def __init__(self, name: str, *, every: int, prefix: str):
    self.name = str(name)
    self.every = int(every)
    self.prefix = str(prefix)

  @property
  def enabled(self) -> bool:
    return self.every >= 0

  def due(self, step: int, is_last: bool) -> bool:
    """Whether this evaluator runs after training step `step` (`is_last`: the final step)."""
    return _due(self.every, step, is_last)

  @abc.abstractmethod
  def run(self, method, params: PyTree, frozen: PyTree, step: int | None = None,
          writer=None) -> dict:
    """Evaluates; writes scalars (and pictures) to `writer` at `step` when given."""

  def headline(self, results: Mapping[str, Any]) -> float:
    return float(results["miou"])

  def summary_line(self, results: Mapping[str, Any]) -> str:
    """One line of the headline numbers; with the candidate mode when the protocol has one
    (a dense evaluator's `candidates`: 'dataset' or 'description')."""
    line = monitoring.summary_line(results)
    candidates = (results.get("protocol") or {}).get("candidates")
    return f"{line} (candidates: {candidates})" if candidates else line

  @abc.abstractmethod
  def protocol(self) -> dict:
    """What was evaluated (episodes, resolution, manifest hash, ...), for results files."""

  @abc.abstractmethod
  def example_batch(self, method) -> dict[str, np.ndarray]:
    """An input batch of this evaluator (one example), for `Method.init` shapes."""


# ----------------------------------------------------------------------------------------
# Episodic.


@dataclasses.dataclass
class EpisodicData:
  """The fixed test episodes of a data config.

  Attributes:
    benchmark: `fssjax.data.folds` benchmark name.
    source: the test split.
    class_ids: the fold's test classes.
    episodes: the fixed episode list (`fssjax.data.episodes.test_episodes`).
    shot: K.
    test_seed: the seed of the episode list.
    left_out: fold classes with fewer than K + 1 distinct images (no episode can be drawn).
    policy: the support policy ('random': the published rule; 'ranked').
  """

  benchmark: str
  source: SegmentationSource
  class_ids: list[int]
  episodes: list[Episode]
  shot: int
  test_seed: int
  left_out: tuple[int, ...]
  policy: str = "random"
  _sha256: str | None = None

  @classmethod
  def from_source(cls, benchmark: str, source: SegmentationSource, class_ids: Sequence[int],
                  *, shot: int, num_episodes: int | None, test_seed: int,
                  policy: str = "random", ranker=None) -> "EpisodicData":
    """`fssjax.data.episodes.test_episodes` of `source` (policy / ranker: the support policy);
    the left-out classes are those of the episode sampler's rule."""
    from fssjax.data import episodes as episodes_lib  # pylint: disable=g-import-not-at-top
    class_ids = [int(c) for c in class_ids]
    eps = episodes_lib.test_episodes(benchmark, source, class_ids, num_episodes or None,
                                     int(shot), int(test_seed), policy=policy, ranker=ranker)
    sampler = episodes_lib.EpisodeSampler(source, class_ids, int(shot))
    return cls(benchmark=benchmark, source=source, class_ids=class_ids, episodes=list(eps),
               shot=int(shot), test_seed=int(test_seed),
               left_out=tuple(sampler.left_out_classes(int(shot))), policy=policy)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, policy: str = "random",
                  ranker=None) -> "EpisodicData":
    """Test source, fold classes and episodes of `config.data` (what the trainer used to
    build as its test data)."""
    from fssjax.data import sources  # pylint: disable=g-import-not-at-top
    data = config.data
    benchmark = sources.benchmark_of(data)
    source = sources.build_source(data, "test")
    class_ids = sources.fold_classes_for(data, "test", source)
    return cls.from_source(benchmark, source, class_ids, shot=int(data.shot),
                           num_episodes=data.test_episodes or None,
                           test_seed=int(data.test_seed), policy=policy, ranker=ranker)

  @property
  def manifest_sha256(self) -> str:
    """`fssjax.data.episodes.episodes_sha256` of the episode list (computed once)."""
    if self._sha256 is None:
      from fssjax.data import episodes as episodes_lib  # pylint: disable=g-import-not-at-top
      self._sha256 = episodes_lib.episodes_sha256(self.episodes, self.source)
    return self._sha256


class EpisodicEvaluator(Evaluator):
  """The published few-shot protocol on fixed test episodes (`fssjax.evaluate.evaluate`)."""

  type = "episodic"

  def __init__(self, name: str, config: ml_collections.ConfigDict, *, every: int,
               prefix: str, batch_size: int, num_summary: int, mesh=None,
               data: EpisodicData | None = None):
    """`config`: the run's config with this evaluator's data overrides applied; `data`:
    prebuilt test data (default: built from `config.data` when the evaluator is enabled)."""
    super().__init__(name, every=every, prefix=prefix)
    self.config = config
    self.batch_size = int(batch_size)
    self.num_summary = int(num_summary)
    self.mesh = mesh
    self._data = data
    if self.batch_size < 1:
      raise ValueError(f"evals.{name}.batch_size={batch_size} must be >= 1")

  @property
  def data(self) -> EpisodicData:
    if self._data is None:
      self._data = EpisodicData.from_config(self.config)
    return self._data

  def loader(self, method, episodes: Sequence[Episode] | None = None, *,
             global_batch_size: int | None = None, single_process: bool = False):
    from fssjax.data import pipeline  # pylint: disable=g-import-not-at-top
    data = self.data
    kw = dict(process_index=0, process_count=1) if single_process else dict(
        process_index=jax.process_index(), process_count=jax.process_count())
    views = method.views() if hasattr(method, "views") else []
    texts = method.texts() if hasattr(method, "texts") else []
    return pipeline.eval_loader(
        self.config, data.source, data.episodes if episodes is None else episodes,
        normalization=method.normalization,
        global_batch_size=global_batch_size or self.batch_size, shot=data.shot, views=views,
        texts=texts, **kw)

  def example_batch(self, method) -> dict[str, np.ndarray]:
    """One test episode (batch of 1) without the bookkeeping and original-size keys: an
    example for `Method.init` shapes when there is no training batch (evaluation only)."""
    batch = next(iter(self.loader(method, self.data.episodes[:1], global_batch_size=1,
                                  single_process=True)))
    drop = ("valid", "episode_index", "support_empty", "masks_resized", "query_mask_orig",
            "query_size")
    return {k: v for k, v in batch.items() if k not in drop}

  def run(self, method, params, frozen, step=None, writer=None) -> dict:
    data = self.data
    start = time.perf_counter()
    results = evaluate.evaluate(
        method, params, frozen, self.loader(method), data.class_ids, mesh=self.mesh,
        class_names=list(data.source.class_names), num_summary=self.num_summary,
        total_episodes=len(data.episodes), left_out=data.left_out)
    results.update(evaluator="episodic", name=self.name, prefix=self.prefix,
                   wall_time_s=time.perf_counter() - start, protocol=self.protocol())
    if hasattr(method, "generation_stats"):  # methods that generate text (LLaFS): parse
      results["generation"] = method.generation_stats()  # counts, tokens/s
    if writer is not None and step is not None and jax.process_index() == 0:
      monitoring.write_eval(writer, step, results, prefix=self.prefix)
    return results

  def protocol(self) -> dict:
    data = self.data
    d = self.config.data
    resolution = ("original" if str(d.get("eval_resolution", "resized")) == "original"
                  else f"{int(d.image_size)}x{int(d.image_size)}")
    from fssjax.data import sources  # pylint: disable=g-import-not-at-top
    out = dict(evaluator="episodic", benchmark=data.benchmark, dataset=str(d.dataset),
               fold=int(d.fold), episodes=len(data.episodes), resolution=resolution,
               manifest_sha256=data.manifest_sha256, test_seed=data.test_seed,
               kshot=data.shot, class_ids=list(data.class_ids),
               left_out_classes=list(data.left_out), support_policy=data.policy)
    out.update(sources.cross_domain_protocol(d))  # the removed classes of a cross-domain run
    return out


# ----------------------------------------------------------------------------------------
# Dense.


@runtime_checkable
class DenseSource(Protocol):
  """A semantic segmentation split: images with one label map each.

  Attributes:
    name: the source's name.
    class_names: the C class names; label value c is class_names[c].
    ignore_label: the label value that is not scored (255; 65535 for 16-bit label maps).
  """

  name: str
  class_names: Sequence[str]
  ignore_label: int

  def __len__(self) -> int:
    """Number of images."""

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], label map integer [H, W] with values in [0, C) or ignore)."""


@runtime_checkable
class DenseMethod(Protocol):
  """What the dense evaluator needs from a method (besides `evaluators` containing 'dense').

  `predict_dense(params, frozen, batch, class_names)` gets `batch['image']` [B, Hp, Wp, 3]
  float32 normalised by `method.normalization` (each whole image resized per the protocol of
  `DenseEvaluator` and zero-padded bottom / right to the batch's common size), the rows of
  the method's per-image arrays (`Method.dense_inputs(source, 'eval').per_image`, e.g.
  priors) and the class names as a static tuple of str (text can be tokenised and embedded
  at trace time), and returns scores [B, h, w, C] (C = len(class_names)) over the padded
  input at any resolution; the evaluator maps them back to each image's label size
  (`protocol_matrix`) and takes the argmax.

  The candidate-free mode (`candidates='description'`) also needs
  `class_embeddings(names) -> [K, D]` and `dense_inputs(...).candidates`; `predict_dense`
  then receives `batch['class_embeddings']` [B, K, D] (each image's candidates) and must
  return [B, h, w, K], one column per candidate.
  """

  normalization: str

  def predict_dense(self, params: PyTree, frozen: PyTree, batch: Mapping[str, jax.Array],
                    class_names: tuple[str, ...]) -> jax.Array:
    ...


class InMemoryDenseSource:
  """A `DenseSource` over numpy arrays (tests, notebooks, small sets)."""

  def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
               class_names: Sequence[str], *, ignore_label: int = 255, name: str = "memory"):
    self.name = str(name)
    self.class_names = tuple(str(c) for c in class_names)
    self.ignore_label = int(ignore_label)
    if len(images) != len(labels):
      raise DataError(f"InMemoryDenseSource {name!r}: {len(images)} images but {len(labels)} "
                      "label maps")
    self._images = [np.asarray(i) for i in images]
    self._labels = [np.asarray(l) for l in labels]
    for i, (image, label) in enumerate(zip(self._images, self._labels)):
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(f"InMemoryDenseSource {name!r} image {i}: expected uint8 [H,W,3], got "
                        f"{image.dtype} {list(image.shape)}")
      if label.shape != image.shape[:2] or label.dtype.kind not in "iu":
        raise DataError(f"InMemoryDenseSource {name!r} label map {i}: expected integers "
                        f"{list(image.shape[:2])}, got {label.dtype} {list(label.shape)}")

  def __len__(self) -> int:
    return len(self._images)

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    return self._images[index], self._labels[index]


class SemanticFromFewShot:
  """A `DenseSource` view of a few-shot `SegmentationSource` (for example the generated
  benchmark): label map = the class index of each annotated pixel, 0 ('background') elsewhere
  when `background`, else the ignore label; pixels ignored in any class mask are ignored.
  Classes are the source's classes (shifted by one with a background class)."""

  def __init__(self, source: SegmentationSource, *, background: bool = True,
               max_images: int = 0):
    self.source = source
    self.name = f"{getattr(source, 'name', 'source')}-semantic"
    self.background = bool(background)
    names = tuple(source.class_names)
    self.class_names = (("background",) + names) if background else names
    self.ignore_label = 255 if len(self.class_names) < 255 else 65535
    members: dict[int, list[int]] = {}
    for c in range(len(names)):
      for i in np.asarray(source.images_with_class(c)):
        members.setdefault(int(i), []).append(c)
    self._classes = members
    n = len(source)
    self._n = min(n, int(max_images)) if max_images else n

  def __len__(self) -> int:
    return self._n

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    classes = self._classes.get(int(index), [])
    shift = 1 if self.background else 0
    image, mask = self.source.load(int(index), classes[0] if classes else 0)
    label = np.full(mask.shape, 0 if self.background else self.ignore_label, np.int32)
    ignored = np.zeros(mask.shape, bool)
    for k, c in enumerate(classes):
      if k:
        mask = self.source.load(int(index), c)[1]
      label[mask == 1] = c + shift
      ignored |= mask == 255
    # Ignored in some class mask (a crowd region, a PASCAL boundary) and no class's object.
    fg = label != (0 if self.background else self.ignore_label)
    label[ignored & ~fg] = self.ignore_label
    return image, label


DenseSourceFactory = Callable[[ml_collections.ConfigDict], DenseSource]
DENSE_SOURCES: dict[str, DenseSourceFactory] = {}


def register_dense_source(name: str, factory: DenseSourceFactory) -> None:
  """Makes `data.dataset = name` of a dense evaluator build its source with `factory(data)`."""
  DENSE_SOURCES[str(name)] = factory


def dense_source(data: ml_collections.ConfigDict) -> DenseSource:
  """The `DenseSource` of a dense evaluator's data block.

  `data.dataset`: a name registered with `register_dense_source`, or one of the few-shot data
  sets of `fssjax.data.sources` (then the test split, as `SemanticFromFewShot` with a
  background class; `data.max_images` > 0 keeps the first images only).
  """
  # Registers the open-vocabulary benchmarks (ade20k_150 ... coco_stuff_171).
  from fssjax.data import dense as _dense  # pylint: disable=g-import-not-at-top,unused-import
  # ... and the embedded benchmark's dense labels (synthetic_dense).
  from fssjax.data import synthetic_dense as _sd  # pylint: disable=g-import-not-at-top,unused-import
  name = str(data.get("dataset", ""))
  if name in DENSE_SOURCES:
    return DENSE_SOURCES[name](data)
  from fssjax.data import sources  # pylint: disable=g-import-not-at-top
  if name in sources.DATASETS:
    return SemanticFromFewShot(sources.build_source(data, "test"),
                               max_images=int(data.get("max_images", 0) or 0))
  raise ValueError(f"dense evaluator: data.dataset={name!r} is neither a registered dense "
                   f"source {sorted(DENSE_SOURCES)} nor a few-shot data set "
                   f"{list(sources.DATASETS)}")


_DENSE_PREDICT: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _dense_predict(method, names: tuple[str, ...]):
  """The jitted `predict_dense` of `method` for `names`, kept so evaluations do not recompile."""
  per_method = _DENSE_PREDICT.setdefault(method, {})
  if names not in per_method:
    per_method[names] = jax.jit(lambda p, f, b: method.predict_dense(p, f, b, names))
  return per_method[names]


def _dense_labels(logits, interp_h, interp_w, column_valid=None, class_map=None):
  """Predicted label maps [B, Hb, Wb] int32: logits [B, h, w, K] resized by the per-image
  matrices interp_h [B, Hb, h] and interp_w [B, Wb, w], argmax over the valid columns
  (`column_valid` [B, K]), mapped to data set classes by `class_map` [B, K] when given."""
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("bih,bhwc->biwc", interp_h, logits.astype(jnp.float32), precision=hi)
  x = jnp.einsum("bjw,biwc->bijc", interp_w, x, precision=hi)
  if column_valid is not None:
    x = jnp.where(column_valid[:, None, None, :], x, -jnp.inf)
  pred = jnp.argmax(x, axis=-1).astype(jnp.int32)
  if class_map is not None:
    pred = jnp.take_along_axis(class_map, pred.reshape(pred.shape[0], -1), axis=1).reshape(
        pred.shape)
  return pred


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore"))
def _dense_confusion(logits, labels, interp_h, interp_w, sizes, column_valid=None,
                     class_map=None, *, num_classes: int, ignore: int):
  """Upsampled argmax vs truth -> confusion matrix [C, C] int32 summed over the global batch.

  logits [B, h, w, K]; labels [B, Hb, Wb] int32 (ignore outside each image); interp_h
  [B, Hb, h], interp_w [B, Wb, w] zero-padded interpolation matrices; sizes [B, 2] (0 for
  padding rows); column_valid / class_map as in `_dense_labels`.
  """
  pred = _dense_labels(logits, interp_h, interp_w, column_valid, class_map)
  hb, wb = labels.shape[1:]
  rows = jnp.arange(hb)[None, :, None] < sizes[:, 0, None, None]
  cols = jnp.arange(wb)[None, None, :] < sizes[:, 1, None, None]
  labels = jnp.where(rows & cols, labels, ignore)
  return metrics.confusion_matrix(pred, labels, num_classes, ignore=ignore)


_dense_labels_jit = jax.jit(_dense_labels)

DENSE_RESIZES = ("shortest_edge", "square")
DENSE_CANDIDATES = ("dataset", "description")
# Keys of a dense evaluator's `data` block that set the protocol (the rest build the source).
DENSE_PROTOCOL_KEYS = ("image_size", "max_size", "resize", "size_divisibility",
                       "max_original_size", "ignore_label")


def palette(n: int = 256) -> np.ndarray:
  """The fixed label-map palette: PASCAL VOC's bit-interleaved colour map (uint8 [n, 3])."""
  out = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    out[i] = (r, g, b)
  return out


def colorize(label: np.ndarray, ignore: int = 255) -> np.ndarray:
  """Label map [H, W] -> uint8 [H, W, 3] in the fixed palette: class k has VOC colour k + 1
  (modulo 256), ignored pixels are white."""
  pal = palette(256)
  label = np.asarray(label).astype(np.int64)
  out = pal[np.where(label == ignore, 0, (label + 1) % 256)]
  out[label == ignore] = 255
  return out


def example_picture(examples, ignore: int = 255) -> np.ndarray:
  """Rows of [image | truth | prediction] (fixed palette) as one uint8 [H, W, 3] picture
  (rows of different widths padded white on the right)."""
  rows = [np.concatenate([np.asarray(image, np.uint8), colorize(truth, ignore),
                          colorize(pred, ignore)], 1) for image, truth, pred in examples]
  if not rows:
    return np.zeros((8, 8, 3), np.uint8)
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
          for r in rows]
  return np.concatenate(rows, 0)


def protocol_matrix(logit_size: int, input_size: int, resized: int, label_size: int,
                    shortest_edge: bool = True) -> np.ndarray:
  """[label_size, logit_size] float32: the linear map from one axis of a prediction's scores
  to the label map (half-pixel bilinear, PyTorch `F.interpolate(align_corners=False)`).

  shortest_edge: detectron2 / Mask2Former inference on a padded batch: the scores are
  upsampled to the padded input size `input_size`, cropped to the resized image
  (`resized` pixels, at the top / left), and that crop resized to `label_size`
  (`sem_seg_postprocess`). Otherwise (a whole image resized to a square input) the scores
  are resized to `label_size` directly.
  """
  if not shortest_edge:
    return evaluate._interp(logit_size, label_size, False)  # pylint: disable=protected-access
  up = evaluate._interp(logit_size, input_size, False)[:resized]  # pylint: disable=protected-access
  back = evaluate._interp(resized, label_size, False)  # pylint: disable=protected-access
  return (back.astype(np.float64) @ up.astype(np.float64)).astype(np.float32)


def _allgather_max(values: np.ndarray) -> np.ndarray:
  """Elementwise max of a small int array over all processes (identity with one process)."""
  values = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)


_DENSE_INPUTS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


class DenseEvaluator(Evaluator):
  """Semantic segmentation scores of `method.predict_dense` on a `DenseSource`, with the
  open-vocabulary protocol (detectron2's inference as used by MaskFormer / Mask2Former,
  FC-CLIP, CAT-Seg, SAN).

  Data keys (the evaluator's `data` block; the others build the source):
    image_size: the shorter side of the network input (default 640).
    max_size: the cap on the longer side (default 2560, detectron2's `ResizeShortestEdge`).
    resize: 'shortest_edge' (default, the protocol: `fssjax.data.dense.resize_for_eval`,
      PIL bilinear) or 'square' (the whole image to image_size x image_size, for methods
      with a fixed square input; scores resized straight to the label size).
    size_divisibility: the batch's padded input is a multiple of it (default 32).
    ignore_label: overrides the source's.

  Per global batch, every image is resized, normalised by `method.normalization` and padded
  bottom / right with zeros to the largest resized size in the batch (rounded up to
  `size_divisibility`); the method sees `batch['image']` [B, Hp, Wp, 3] plus the rows of its
  per-image arrays (`method.dense_inputs(source, 'eval').per_image`, e.g. LLMFormer's
  priors). Its scores [B, h, w, K] are upsampled to the padded input, cropped to each image
  and resized to the label's size (`protocol_matrix`, one matrix per axis and image: the
  padding is never scored), and the argmax is scored by detectron2's `SemSegEvaluator`
  rule (`fssjax.metrics.DenseAccumulator`). The scores are resized after the method's
  semantic inference (Mask2Former resizes the mask logits first).

  candidates: 'dataset' (the evaluated set's class names) or 'description' (no list given:
  each image's candidates are the names its description gives,
  `method.dense_inputs(...).candidates`; `batch['class_embeddings']` [B, K, D] carries their
  embeddings (`method.class_embeddings`, padded; padded columns never win), and each
  candidate's pixels are scored as the data set class whose name embedding is nearest
  (cosine). An image whose description names nothing is predicted as class 0.
  """

  type = "dense"

  def __init__(self, name: str, data_config: ml_collections.ConfigDict, *, every: int,
               prefix: str, batch_size: int, mesh=None, source: DenseSource | None = None,
               candidates: str = "dataset", num_summary: int = 0, inputs=None):
    """`source`: prebuilt (default: built from `data_config`); `inputs`: prebuilt per-image
    inputs (`fssjax.methods.base.DenseInputs`; default: `method.dense_inputs(source, 'eval')`);
    `num_summary`: images kept for the picture (`last_examples`, and TensorBoard)."""
    super().__init__(name, every=every, prefix=prefix)
    self._inputs = inputs
    self.last_examples: list = []
    self.data_config = data_config
    self.batch_size = int(batch_size)
    self.image_size = int(data_config.get("image_size", 640))
    self.max_size = int(data_config.get("max_size", 2560))
    self.resize = str(data_config.get("resize", "shortest_edge"))
    self.size_divisibility = int(data_config.get("size_divisibility", 32))
    self.candidates = str(candidates or "dataset")
    self.num_summary = int(num_summary)
    self.mesh = mesh
    self._source = source
    if self.batch_size < 1:
      raise ValueError(f"evals.{name}.batch_size={batch_size} must be >= 1")
    if self.resize not in DENSE_RESIZES:
      raise ValueError(f"evals.{name}.data.resize={self.resize!r}; expected one of "
                       f"{list(DENSE_RESIZES)}")
    if self.candidates not in DENSE_CANDIDATES:
      raise ValueError(f"evals.{name}.candidates={self.candidates!r}; expected one of "
                       f"{list(DENSE_CANDIDATES)}")
    if self.image_size < 1 or self.size_divisibility < 1:
      raise ValueError(f"evals.{name}.data: image_size={self.image_size} and "
                       f"size_divisibility={self.size_divisibility} must be >= 1")

  @property
  def source(self) -> DenseSource:
    if self._source is None:
      block = ml_collections.ConfigDict({k: v for k, v in self.data_config.items()
                                         if k not in DENSE_PROTOCOL_KEYS})
      self._source = dense_source(block)
    return self._source

  @property
  def ignore_label(self) -> int:
    explicit = self.data_config.get("ignore_label", None)
    if explicit is not None:
      return int(explicit)
    return int(getattr(self.source, "ignore_label",
                       DENSE_IGNORE_LABELS.get(str(self.data_config.get("dataset", "")), 255)))

  def inputs(self, method):
    """`method.dense_inputs(source, 'eval')`, computed once per method."""
    from fssjax.methods.base import DenseInputs  # pylint: disable=g-import-not-at-top
    if self._inputs is not None:
      return self._inputs
    per_method = _DENSE_INPUTS.setdefault(method, {})
    if id(self) not in per_method:
      fn = getattr(method, "dense_inputs", None)
      per_method[id(self)] = fn(self.source, "eval") if fn is not None else DenseInputs()
    return per_method[id(self)]

  def resized_shape(self, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the network input of an image of `height` x `width` (before padding)."""
    from fssjax.data import dense  # pylint: disable=g-import-not-at-top
    if self.resize == "square":
      return self.image_size, self.image_size
    return dense.shortest_edge_size(height, width, self.image_size, self.max_size)

  def _load(self, index: int, normalization: str):
    from fssjax.data import dense, transforms  # pylint: disable=g-import-not-at-top
    src = self.source
    image, label = src.load(index)
    image, label = np.asarray(image), np.asarray(label)
    if label.shape != image.shape[:2]:
      raise DataError(f"{src.name} record {index}: label map {list(label.shape)} and image "
                      f"{list(image.shape[:2])} differ in size")
    if self.resize == "square":
      small = transforms.resize_image(image, self.image_size, self.image_size)
    else:
      small = dense.resize_for_eval(image, self.image_size, self.max_size)
    return image, label, transforms.normalize(small, normalization)

  def _batches(self, method, local_b: int, first_row: int, rows: int) -> Iterator[dict]:
    """This process's rows of each global batch: `local_b` images from global row
    `first_row`, padded to `rows` rows (padding rows: size 0, nothing counted)."""
    src = self.source
    inputs = self.inputs(method)
    n = len(src)
    for g in range(-(-n // self.batch_size)):
      loaded, index = [], np.full((rows,), -1, np.int64)
      for i in range(local_b):
        j = g * self.batch_size + first_row + i
        if j < n:
          loaded.append(self._load(j, method.normalization))
          index[i] = j
      shapes = np.asarray([[x.shape[0], x.shape[1], l.shape[0], l.shape[1]]
                           for _, l, x in loaded] or [[1, 1, 1, 1]], np.int64).max(0)
      shapes = _allgather_max(shapes)
      d = self.size_divisibility
      if self.resize == "square":
        hp = wp = self.image_size
      else:
        hp, wp = evaluate.round_up(int(shapes[0]), d), evaluate.round_up(int(shapes[1]), d)
      images = np.zeros((rows, hp, wp, 3), np.float32)
      labels = np.full((rows, int(shapes[2]), int(shapes[3])), self.ignore_label, np.int64)
      sizes = np.zeros((rows, 2), np.int32)      # label sizes
      resized = np.zeros((rows, 2), np.int32)    # input sizes before padding
      originals = []
      for i, (image, label, x) in enumerate(loaded):
        images[i, :x.shape[0], :x.shape[1]] = x
        labels[i, :label.shape[0], :label.shape[1]] = label
        sizes[i], resized[i] = label.shape, x.shape[:2]
        originals.append(image)
      batch = {"image": images}
      for key, value in dict(inputs.per_image).items():
        value = np.asarray(value)
        out = np.zeros((rows,) + value.shape[1:], value.dtype)
        out[index >= 0] = value[index[index >= 0]]
        batch[key] = out
      yield dict(inputs=batch, labels=labels, sizes=sizes, resized=resized, index=index,
                 originals=originals)

  def _candidate_arrays(self, method, index: np.ndarray, name_emb: np.ndarray):
    """(class_embeddings [B, K, D], column_valid [B, K], class_map [B, K]) of the rows'
    description candidates (K: the most candidates of an image in the global batch)."""
    cands = self.inputs(method).candidates
    if cands is None:
      raise ValueError(f"evals.{self.name}.candidates='description': "
                       f"{type(method).__name__}.dense_inputs gives no per-image candidate "
                       "names for this source (an image description per image is needed)")
    lists = [tuple(cands[j]) if j >= 0 else () for j in index]
    k = int(_allgather_max(np.asarray([max([len(c) for c in lists] + [1])]))[0])
    d = name_emb.shape[1]
    emb = np.zeros((len(lists), k, d), np.float32)
    valid = np.zeros((len(lists), k), bool)
    cmap = np.zeros((len(lists), k), np.int32)
    for i, names in enumerate(lists):
      if not names:
        emb[i] = name_emb[0]
        continue
      e = np.asarray(method.class_embeddings(list(names)), np.float32)
      emb[i, :len(names)] = e
      emb[i, len(names):] = e[0]
      valid[i, :len(names)] = True
      cmap[i, :len(names)] = np.argmax(_unit(e) @ _unit(name_emb).T, -1)
    return emb, valid, cmap

  def run(self, method, params, frozen, step=None, writer=None) -> dict:
    if not hasattr(method, "predict_dense"):
      raise TypeError(f"{type(method).__name__} has no predict_dense; the dense evaluator "
                      "needs it (see fssjax.evaluators.DenseMethod)")
    src = self.source
    names = tuple(src.class_names)
    c = len(names)
    ignore = self.ignore_label
    acc = metrics.DenseAccumulator(c, ignore=ignore)
    mesh = self.mesh
    params = evaluate.place_params(params, mesh)
    frozen = evaluate.place_params(frozen, mesh)
    nproc, pidx = jax.process_count(), jax.process_index()
    if self.batch_size % nproc:
      raise ValueError(f"evals.{self.name}.batch_size={self.batch_size} must be divisible by "
                       f"the process count {nproc}")
    local_b = self.batch_size // nproc
    multiple = evaluate.local_data_shards(mesh) if mesh is not None else 1
    pad = (-local_b) % multiple
    sharding = NamedSharding(mesh, P("data")) if mesh is not None else None
    predict = _dense_predict(method, names)
    describe = self.candidates == "description"
    name_emb = np.asarray(method.class_embeddings(list(names)), np.float32) if describe else None
    shortest = self.resize == "shortest_edge"
    start = time.perf_counter()
    n_images = 0
    shown = []
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
      rows = local_b + pad
      for batch in self._batches(method, local_b, pidx * local_b, rows):
        sizes, resized = batch["sizes"], batch["resized"]
        n_images += int((sizes[:, 0] > 0).sum())
        inputs = dict(batch["inputs"])
        column = cmap = None
        if describe:
          inputs["class_embeddings"], column, cmap = self._candidate_arrays(
              method, batch["index"], name_emb)
        if sharding is not None:
          inputs = {k: jax.make_array_from_process_local_data(sharding, v)
                    for k, v in inputs.items()}
        logits = predict(params, frozen, inputs)
        k = column.shape[1] if describe else c
        if logits.ndim != 4 or logits.shape[-1] != k:
          raise ValueError(f"{type(method).__name__}.predict_dense returned {logits.shape}; "
                           f"expected [B, h, w, K={k}]"
                           + (" (candidates='description': one column per candidate of "
                              "batch['class_embeddings'])" if describe else ""))
        h, w = logits.shape[1:3]
        hp, wp = inputs["image"].shape[1:3]
        hb, wb = batch["labels"].shape[1:]
        mh = np.zeros((rows, hb, h), np.float32)
        mw = np.zeros((rows, wb, w), np.float32)
        for i in range(rows):
          if sizes[i, 0] > 0:
            mh[i, :sizes[i, 0]] = protocol_matrix(h, hp, int(resized[i, 0]), int(sizes[i, 0]),
                                                  shortest)
            mw[i, :sizes[i, 1]] = protocol_matrix(w, wp, int(resized[i, 1]), int(sizes[i, 1]),
                                                  shortest)
        extras = [batch["labels"].astype(np.int32), mh, mw, sizes]
        if describe:
          extras += [column, cmap]
        if sharding is not None:
          extras = [jax.make_array_from_process_local_data(sharding, x) for x in extras]
        # The matrix is a sum over the global batch, replicated: complete on every process.
        matrix = _dense_confusion(logits, *extras, num_classes=c, ignore=ignore)
        acc.update_matrix(np.asarray(matrix.addressable_data(0)))
        if len(shown) < self.num_summary and pidx == 0:
          pred = evaluate._local_rows(_dense_labels_jit(logits, *extras[1:3], *extras[4:]))  # pylint: disable=protected-access
          for i, image in enumerate(batch["originals"]):
            if len(shown) < self.num_summary:
              hh, ww = sizes[i]
              shown.append((image, batch["labels"][i, :hh, :ww], pred[i, :hh, :ww]))
    n_images = int(metrics.sum_across_processes([np.asarray(n_images, np.int64)])[0])
    self.last_examples = shown
    res = acc.result()
    results = dict(res, evaluator="dense", name=self.name, prefix=self.prefix,
                   class_names=dict(enumerate(names)), n_images=n_images,
                   resolution=self._resolution_text(), ignore_label=ignore,
                   wall_time_s=time.perf_counter() - start, confusion_matrix=acc.matrix,
                   protocol=self.protocol())
    if writer is not None and step is not None and pidx == 0:
      monitoring.write_eval(writer, step, results, prefix=self.prefix)
      if shown:
        writer.write_images(step, {f"{self.prefix}/image_truth_prediction":
                                   example_picture(shown, ignore)[None]})
    return results

  def _resolution_text(self) -> str:
    if self.resize == "square":
      return f"{self.image_size}x{self.image_size} input, scored at label size"
    return (f"shorter side {self.image_size} (longer <= {self.max_size}), padded to "
            f"/{self.size_divisibility}, scored at label size")

  def example_batch(self, method) -> dict[str, np.ndarray]:
    """{'image': zeros [1, S, S, 3]}: the input of `predict_dense`, for shapes."""
    del method
    return {"image": np.zeros((1, self.image_size, self.image_size, 3), np.float32)}

  def protocol(self) -> dict:
    return dict(evaluator="dense", dataset=str(self.data_config.get("dataset", "")),
                source=getattr(self.source, "name", ""), images=len(self.source),
                resolution=(f"{self.image_size}x{self.image_size}" if self.resize == "square"
                            else f"shortest_edge {self.image_size}"),
                resize=self.resize, max_size=self.max_size,
                size_divisibility=self.size_divisibility, candidates=self.candidates,
                ignore_label=self.ignore_label, num_classes=len(self.source.class_names))


def _unit(x: np.ndarray) -> np.ndarray:
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


# ----------------------------------------------------------------------------------------
# The suite.


class Suite:
  """The evaluators of a run, in config order. The primary one (`primary`, from the config
  key `eval.primary`; default the first) gives the headline: results.json's 'results' and
  the checkpoint's 'best' metric.

  Raises:
    ConfigError: `primary` names no evaluator of the suite (the message lists them).
  """

  def __init__(self, evaluators: Sequence[Evaluator], method, primary: str = ""):
    if not evaluators:
      raise ValueError("an evaluator suite needs at least one evaluator")
    self.evaluators = list(evaluators)
    self.method = method
    self._due: tuple[int, tuple[str, ...]] | None = None
    names = [e.name for e in self.evaluators]
    if primary and primary not in names:
      from fssjax.methods.base import ConfigError  # pylint: disable=g-import-not-at-top
      raise ConfigError(f"eval.primary={primary!r} names no evaluator of this config; its "
                       f"evaluators (config.evals): {names}")
    self.primary = primary or names[0]

  def _ordered(self) -> list[Evaluator]:
    """The primary evaluator first, then the others in config order."""
    return sorted(self.evaluators, key=lambda e: e.name != self.primary)

  def primary_results(self, results: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any]:
    """The primary evaluator's results; the first present one when it did not run."""
    for e in self._ordered():
      if e.name in results:
        return results[e.name]
    raise ValueError("primary_results: no evaluator results given")

  def __getitem__(self, name: str) -> Evaluator:
    for e in self.evaluators:
      if e.name == name:
        return e
    raise KeyError(f"no evaluator {name!r}; the suite has {[e.name for e in self.evaluators]}")

  @property
  def enabled(self) -> bool:
    return any(e.enabled for e in self.evaluators)

  def example_batch(self, method=None) -> dict[str, np.ndarray]:
    """An episode batch (one episode) of the first episodic evaluator, else the first
    evaluator's example: shapes for `Method.init` when there is no training batch."""
    method = method or self.method
    for e in self.evaluators:
      if isinstance(e, EpisodicEvaluator):
        return e.example_batch(method)
    return self.evaluators[0].example_batch(method)

  def due(self, step: int, is_last: bool) -> bool:
    """Whether any evaluator runs after step `step`; the next `run(..., step)` runs those."""
    names = tuple(e.name for e in self.evaluators if e.due(step, is_last))
    self._due = (int(step), names)
    return bool(names)

  def run(self, params: PyTree, frozen: PyTree, step: int, writer=None, *,
          names: Sequence[str] | None = None) -> dict[str, dict]:
    """{name: results} of the evaluators due at `step` (per the last `due` call for this
    step), or of `names`, or else of every enabled evaluator. Scalars and pictures go to
    `writer` (lead process) under each evaluator's prefix."""
    if names is None:
      if self._due is not None and self._due[0] == int(step):
        names = self._due[1]
      else:
        names = [e.name for e in self.evaluators if e.enabled]
    out = {}
    for name in names:
      evaluator = self[name]
      method = getattr(evaluator, "method_variant", None) or self.method
      res = evaluator.run(method, params, frozen, step, writer)
      logging.info("step %s, %s: %s", step, name, evaluator.summary_line(res))
      out[name] = res
    return out

  def headline(self, results: Mapping[str, Mapping[str, Any]]) -> float:
    """The primary evaluator's mIoU (the checkpoint's 'best' metric); the first present one
    when it did not run."""
    for e in self._ordered():
      if e.name in results:
        return e.headline(results[e.name])
    raise ValueError("headline: no evaluator results given")

  def summary_line(self, results: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for e in self.evaluators:
      if e.name in results:
        line = e.summary_line(results[e.name])
        parts.append(line if len(results) == 1 else f"{e.name}: {line}")
    return " | ".join(parts)

  def write_results(self, outdir: str, mode: str, step: int,
                    results: Mapping[str, Mapping[str, Any]], config, *,
                    warnings: Sequence[str] = ()) -> list[str]:
    """One results file per evaluator (`fssjax.results.write`); returns their paths."""
    from fssjax import results as results_lib  # pylint: disable=g-import-not-at-top
    return [results_lib.write(outdir, mode=mode, step=step, results=res, config=config,
                              method=getattr(config, "method", ""), warnings=warnings)
            for res in results.values()]


def specs(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """The evaluator specs of `config.evals` (default: one episodic 'fewshot'), validated."""
  evals = config.get("evals", None)
  if not evals:
    return {DEFAULT_NAME: dict(type="episodic", every=-1, prefix="eval")}
  out = {}
  for name, spec in evals.items():
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    kind = spec.get("type")
    if kind not in EVALUATOR_TYPES:
      raise ValueError(f"evals.{name}.type={kind!r}; expected one of {list(EVALUATOR_TYPES)}")
    unknown = sorted(set(spec) - set(_KEYS[kind]))
    if unknown:
      raise ValueError(f"evals.{name}: unknown keys {unknown} for a {kind} evaluator; known "
                       f"keys: {list(_KEYS[kind])}")
    out[str(name)] = spec
  return out


def from_config(config: ml_collections.ConfigDict, method, mesh=None, *,
                data: Mapping[str, Any] | None = None) -> Suite:
  """The evaluator suite of `config` for `method` (see the module docstring).

  Enabled evaluators build their test data here (sources indexed, episodes drawn); disabled
  ones (`every` < 0 after resolving -1 to `train.eval_every`) build nothing. `data` maps
  evaluator names to prebuilt data (`EpisodicData` or a `DenseSource`), for tests and
  notebooks.

  Raises:
    ValueError: an unknown evaluator type or key, or a type the method does not support
      (`method.evaluators`).
  """
  supported = _supported(method)
  data = dict(data or {})
  evaluators = []
  for name, spec in specs(config).items():
    kind = spec["type"]
    if kind not in supported:
      raise ValueError(f"evals.{name}: {type(method).__name__} supports the evaluators "
                       f"{list(supported)}, not {kind!r}")
    every = _resolve_every(spec.get("every", -1), config)
    prefix = str(spec.get("prefix") or name)
    batch_size = int(spec.get("batch_size") or config.eval.batch_size)
    if kind in ("episodic", "retrieval"):
      cfg = _config_with_data(config, spec.get("data"))
      num_summary = spec.get("num_summary_images")
      num_summary = int(config.eval.num_summary_images if num_summary is None else num_summary)
      if kind == "episodic":
        e = EpisodicEvaluator(name, cfg, every=every, prefix=prefix, batch_size=batch_size,
                              num_summary=num_summary, mesh=mesh, data=data.get(name))
      else:  # LLM-guided support retrieval (fssjax.methods.retrieval)
        from fssjax.methods import retrieval  # pylint: disable=g-import-not-at-top
        e = retrieval.make_evaluator(name, cfg, spec, every=every, prefix=prefix,
                                     batch_size=batch_size, num_summary=num_summary,
                                     mesh=mesh)
    else:
      if not hasattr(method, "predict_dense"):
        raise ValueError(f"evals.{name}: {type(method).__name__} lists 'dense' in its "
                         "evaluators but has no predict_dense")
      e = DenseEvaluator(name, ml_collections.ConfigDict(spec.get("data") or {}), every=every,
                         prefix=prefix, batch_size=batch_size, mesh=mesh,
                         source=data.get(name),
                         candidates=str(spec.get("candidates") or "dataset"),
                         num_summary=int(spec.get("num_summary_images") or 0))
    if e.enabled:
      if isinstance(e, EpisodicEvaluator):
        _ = e.data
      else:
        _ = e.source
    e.method_variant = _method_variant(config, method, name, spec.get("model"))
    evaluators.append(e)
  primary = str((config.get("eval", None) or {}).get("primary", "") or "")
  suite = Suite(evaluators, method, primary=primary)
  variants = [e for e in evaluators if e.enabled and e.method_variant is not method]
  if variants:
    batch = suite.example_batch()
    for e in variants:
      _check_variant_params(e.name, method, e.method_variant, batch)
  return suite


def _check_variant_params(name: str, method, variant, batch: Mapping[str, Any]) -> None:
  """Refuses an `evals.<name>.model` override that changes the parameters (their paths or
  shapes): the variant must read the trained params as they are. Abstract (no compute).

  Raises:
    ConfigError: naming the evaluator and the first differing parameters.
  """
  from fssjax.methods.base import ConfigError  # pylint: disable=g-import-not-at-top

  def shapes(m):
    tree = jax.eval_shape(m.init, jax.random.key(0), batch)
    return {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

  want, got = shapes(method), shapes(variant)
  if want != got:
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    shown = "; ".join(f"{k}: trained {want.get(k, 'absent')}, override {got.get(k, 'absent')}"
                      for k in diff[:3])
    raise ConfigError(f"evals.{name}.model changes the model's parameters ({len(diff)} differ: "
                      f"{shown}{' ...' if len(diff) > 3 else ''}). An evaluator's model "
                      "override may only change inference settings; train a separate run for "
                      "an architecture change.")
