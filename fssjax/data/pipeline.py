"""grain input pipelines: the checkpointable training stream and the fixed evaluation batches.

Training. `train_loader(config, source, class_ids, ...)` returns a `TrainLoader`. Its grain
record i is global step i; a map transform builds this process's share of the global batch of
that step (`fssjax.data.episodes` makes every episode a pure function of (seed, step, slot)):

  ds = grain.MapDataset.range(start, num_steps).map(build_batch)   # record = global step
  ds = ds.to_iter_dataset(ReadOptions(...)).mp_prefetch(MultiprocessingOptions(workers))

so grain workers parallelise over batches and the stream is the same for any worker count.
Process p of P receives slots p*b .. (p+1)*b - 1 of every global batch (b = global / P).

Batch keys (S = data.image_size, the scored view; K = shot; NHWC):

  always (training and evaluation):
    query_image     float32 [b, S, S, 3]     normalised by the method's `normalization`
                                             (see fssjax.data.transforms); 0 on padding
    query_mask      uint8   [b, S, S]        0 background, 1 the episode's class, 255 ignore
    support_images  float32 [b, K, S, S, 3]
    support_masks   uint8   [b, K, S, S]     support j's mask is of class
                                             `Episode.support_class(j)` (the episode's class
                                             unless a ranked support policy chose another)
    class_id        int32   [b]              the episode's (query's) class id
  evaluation only:
    valid           bool    [b]              False on padding slots (images 0, masks 255)
    episode_index   int32   [b]              index into the episode list; -1 on padding
    masks_resized   int32   [b]              masks of the episode (query + supports) whose
                                             size differed from their image and were resized
                                             (fssjax.data.imageio.fit_mask); the evaluator
                                             sums and reports them
  evaluation with data.eval_resolution == 'original':
    query_mask_orig uint8   [b, M, M]        the original query mask, 255 outside it
                                             (M = data.max_original_size, default 1024)
    query_size      int32   [b, 2]           (h, w) of the original query
  with data.support_check_size = c > 0 (default 0: no check, no key):
    support_empty   bool    [b, K]           support j's mask has no foreground at c x c
                                             (`transforms.support_is_empty`: HSNet's bilinear
                                             resize with aligned corners, > 0). Training
                                             redraws such supports (other images of the class,
                                             from the slot's generator stream 2), so True
                                             there only when no replacement was found;
                                             evaluation keeps them and the evaluator counts
  per extra view `name` (`views=`, fssjax.data.views.ViewSpec, size s):
    query_image@{name}    float32 [b, s, s, 3]
    support_images@{name} float32 [b, K, s, s, 3]
    query_size@{name}     int32   [b, 2]     (h, w) of the resized image inside the view
    support_size@{name}   int32   [b, K, 2]
  per text field `name` (`texts=`, fssjax.data.views.TextSpec, L = max_length):
    text@{name}           int32   [b, L]     token ids of the episode class's text, padded
    text_mask@{name}      uint8   [b, L]     1 on tokens, 0 on padding

Without views, texts and support check the training batch is exactly that of earlier
versions. With `data.train_shot_max = N > 0`, K is drawn from 1..N per global step (one K per
global batch, so shapes are uniform within a batch and vary across steps).

Checkpointing. `iter(loader)` gives a `TrainIterator` with grain's iterator checkpoint API:

  it = iter(loader); state = it.get_state()   # bytes (JSON): the next global step + checks
  ...; it.set_state(state)                    # continues with exactly the batch that was next

The state is the next global step, so it restores with any worker count and any process
layout (the seed, global batch size and shot settings must match; a mismatch is a ValueError
naming the field). It works with grain's orbax handler, which saves one file per process:

  import grain, orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(dir, item_names=("state", "data"), item_handlers=dict(
      data=grain.checkpoint.CheckpointHandler()))     # = grain.python.PyGrainCheckpointHandler
  mngr.save(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it)))
  mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it), ...))

Without a saved state, `train_loader(..., start_step=s)` starts at global step s with the
same batches (the stream depends on the step only). Call `it.close()` to stop workers.

Dense training (methods with `train_data = 'dense'`, `fssjax.methods.base.DenseInputs`).
`dense_train_loader(config, source, inputs, ...)` returns a `TrainLoader` of whole images of
a `fssjax.evaluators.DenseSource` (the data block `config.data.train`), with the same record
= global step design, iterator state and any-worker-count determinism as the episodic stream.
Global sample p = step * B + slot is image `order(epoch)[p mod n]`, epoch = p div n, where
`order(epoch)` is a seeded permutation of the n images (detectron2's `TrainingSampler`: an
infinite stream of shuffled passes). Each image is resized to S x S (S = data.image_size;
bilinear, label maps nearest; ours: Mask2Former's recipe crops large-scale-jittered images),
flipped left-right with probability 1/2 when data.augment (slot generator stream 1).

  image           float32 [b, S, S, 3]     normalised by the method's `normalization`
  image_index     int32   [b]              the image's index in the source
  label           int32   [b, S, S]        class index or the source's ignore label (only
                                           when `inputs.targets` is None)
  <target keys>                            `inputs.targets(label, ignore)` per sample
                                           (LLMFormer: target_classes int32 [b, T],
                                           target_masks float32 [b, T, S, S])
  <per-image keys>                         `inputs.per_image[key][image_index]`
  <shared keys>                            `inputs.shared[key]` in every row

Evaluation. `eval_loader(config, source, episodes, ...)` returns an `EvalLoader`: an iterable
(re-iterable, `len` = number of batches) over the episodes in order; global batch g holds
episodes g*B .. g*B + B - 1, the last one padded. Each process gets its slice with the
evaluation keys above. The evaluator sums its counts across processes.

Worker processes. `worker_count` defaults to `config.data.workers` (0 = in-process, with a
couple of reading threads). grain starts workers with the 'spawn' method and they read absl
flags: under pytest tests/conftest.py marks flags parsed; command-line entry points parse
flags with absl.app. Sources must be picklable (cloudpickle) to reach the workers.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

from absl import logging
import grain
import numpy as np

from fssjax.data import episodes as episodes_lib
from fssjax.data import imageio, transforms
from fssjax.data import views as views_lib
from fssjax.data.base import IGNORE, DataError, Episode, SegmentationSource

STATE_VERSION = 1
MAX_REDRAWS = 20  # with data.skip_corrupt: redraws of an episode whose files fail to load
EVAL_RESOLUTIONS = ("resized", "original")


# ---------------------------------------------------------------------------- helpers


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  process_index, process_count = int(process_index), int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  return process_index, process_count


def _per_process_batch(global_batch_size: int, process_count: int) -> int:
  global_batch_size = int(global_batch_size)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                     f"process count {process_count}")
  return global_batch_size // process_count


def transform_spec(config, normalization: str, *, train: bool) -> transforms.TransformSpec:
  """The `TransformSpec` of config.data (augmentation and `train_image_interpolation` only for
  training; evaluation images are always resized bilinearly)."""
  data = config.data
  return transforms.TransformSpec(
      image_size=int(data.image_size),
      resize=str(data.resize),
      normalization=normalization,
      augment=bool(data.get("augment", False)) and train,
      max_original_size=int(data.get("max_original_size", transforms.DEFAULT_MAX_ORIGINAL_SIZE)),
      interpolation=str(data.get("train_image_interpolation", "bilinear")) if train
      else "bilinear",
  )


def _support_check_size(data) -> int:
  value = data.get("support_check_size", 0) if hasattr(data, "get") else 0
  value = int(value or 0)
  if value < 0:
    raise ValueError(f"data.support_check_size must be >= 0 (0: no check), got {value}")
  return value


def _read_options(worker_count: int) -> grain.ReadOptions:
  # Every element is a whole batch: keep the buffers small. In-process, two threads overlap
  # decoding with the training step; inside worker processes one thread each.
  threads = 2 if worker_count == 0 else 1
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)


def _build_iter(ds: grain.MapDataset, worker_count: int):
  it_ds = ds.to_iter_dataset(_read_options(worker_count))
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2))
  return iter(it_ds)


class _Extras:
  """What a batch holds beyond the default keys: views, text tables, the support check."""

  def __init__(self, views: Sequence[views_lib.ViewSpec] = (),
               text_tables: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
               support_check_size: int = 0, count_resized: bool = False):
    self.views = tuple(views)
    self.text_tables = dict(text_tables or {})
    self.support_check_size = int(support_check_size)
    self.count_resized = bool(count_resized)

  def add_keys(self, batch: dict[str, np.ndarray], b: int, k: int) -> None:
    for v in self.views:
      s = int(v.size)
      batch[f"query_image@{v.name}"] = np.zeros((b, s, s, 3), np.float32)
      batch[f"support_images@{v.name}"] = np.zeros((b, k, s, s, 3), np.float32)
      batch[f"query_size@{v.name}"] = np.zeros((b, 2), np.int32)
      batch[f"support_size@{v.name}"] = np.zeros((b, k, 2), np.int32)
    for name, (ids, _) in self.text_tables.items():
      batch[f"text@{name}"] = np.zeros((b, ids.shape[1]), np.int32)
      batch[f"text_mask@{name}"] = np.zeros((b, ids.shape[1]), np.uint8)
    if self.support_check_size > 0:
      batch["support_empty"] = np.zeros((b, k), bool)
    if self.count_resized:
      batch["masks_resized"] = np.zeros((b,), np.int32)


_NO_EXTRAS = _Extras()


def _fill_query(source: SegmentationSource, episode: Episode, spec: transforms.TransformSpec,
                aug_rng: np.random.Generator | None, batch: dict[str, np.ndarray], i: int,
                extras: _Extras) -> None:
  image, mask = source.load(episode.query, episode.class_id)
  if "query_mask_orig" in batch:
    batch["query_mask_orig"][i], batch["query_size"][i] = transforms.pad_original_mask(
        np.asarray(mask), spec.max_original_size)
  _, batch["query_mask"][i], params = transforms.prepare_with_params(
      image, mask, spec, aug_rng, out=batch["query_image"][i])
  for v in extras.views:
    batch[f"query_size@{v.name}"][i] = views_lib.make_view(
        image, v, batch[f"query_image@{v.name}"][i], spec, params)


def _fill_support(source: SegmentationSource, record: int, class_id: int,
                  spec: transforms.TransformSpec, aug_rng: np.random.Generator | None,
                  batch: dict[str, np.ndarray], i: int, j: int, extras: _Extras) -> bool:
  """Loads support j of slot i (mask of `class_id`); returns whether it is empty at
  `extras.support_check_size` (False without a check)."""
  image, mask = source.load(record, class_id)
  _, batch["support_masks"][i, j], params = transforms.prepare_with_params(
      image, mask, spec, aug_rng, out=batch["support_images"][i, j])
  for v in extras.views:
    batch[f"support_size@{v.name}"][i, j] = views_lib.make_view(
        image, v, batch[f"support_images@{v.name}"][i, j], spec, params)
  empty = transforms.support_is_empty(batch["support_masks"][i, j], extras.support_check_size)
  if "support_empty" in batch:
    batch["support_empty"][i, j] = empty
  return empty


def _fill_episode(source: SegmentationSource, episode: Episode, spec: transforms.TransformSpec,
                  aug_rng: np.random.Generator | None, batch: dict[str, np.ndarray],
                  i: int, extras: _Extras = _NO_EXTRAS) -> list[int]:
  """Loads and transforms one episode (query + supports) into slot `i` of `batch`.

  Writes query_image / query_mask / support_images / support_masks / class_id, and
  query_mask_orig / query_size, views, texts, support_empty and masks_resized when `batch`
  has them. Each support's mask is of its own class (`Episode.support_class`). Returns the
  indices of the supports that are empty at the check size. Raises DataError on unreadable
  data (the slot may then be partly written).
  """
  resized_before = imageio.resized_mask_count()
  _fill_query(source, episode, spec, aug_rng, batch, i, extras)
  empty = []
  for j, s in enumerate(episode.supports):
    if _fill_support(source, s, episode.support_class(j), spec, aug_rng, batch, i, j, extras):
      empty.append(j)
  batch["class_id"][i] = episode.class_id
  for name, (ids, mask) in extras.text_tables.items():
    batch[f"text@{name}"][i] = ids[episode.class_id]
    batch[f"text_mask@{name}"][i] = mask[episode.class_id]
  if "masks_resized" in batch:
    batch["masks_resized"][i] = imageio.resized_mask_count() - resized_before
  return empty


def _clear_slot(batch: dict[str, np.ndarray], i: int) -> None:
  """Resets slot `i` to padding (images 0, masks 255, class 0)."""
  for key, value in batch.items():
    if key in ("query_mask", "support_masks", "query_mask_orig"):
      value[i] = IGNORE
    elif key == "episode_index":
      value[i] = -1
    else:
      value[i] = 0


def _empty_batch(b: int, k: int, size: int, extras: _Extras = _NO_EXTRAS) -> dict[str, np.ndarray]:
  batch = dict(
      query_image=np.zeros((b, size, size, 3), np.float32),
      query_mask=np.full((b, size, size), IGNORE, np.uint8),
      support_images=np.zeros((b, k, size, size, 3), np.float32),
      support_masks=np.full((b, k, size, size), IGNORE, np.uint8),
      class_id=np.zeros((b,), np.int32),
  )
  extras.add_keys(batch, b, k)
  return batch


# ---------------------------------------------------------------------------- training


class _TrainBatch:
  """grain map transform: global step -> this process's slice of that step's global batch."""

  def __init__(self, source: SegmentationSource, sampler: episodes_lib.EpisodeSampler,
               spec: transforms.TransformSpec, seed: int, first_slot: int, batch_size: int,
               shot: int, shot_max: int, skip_corrupt: bool, extras: _Extras = _NO_EXTRAS):
    self.extras = extras
    self.source = source
    self.sampler = sampler
    self.spec = spec
    self.seed = int(seed)
    self.first_slot = int(first_slot)
    self.batch_size = int(batch_size)
    self.shot = int(shot)
    self.shot_max = int(shot_max)
    self.skip_corrupt = bool(skip_corrupt)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    k = episodes_lib.step_shot(self.seed, step, self.shot, self.shot_max)
    batch = _empty_batch(self.batch_size, k, self.spec.image_size, self.extras)
    for i in range(self.batch_size):
      slot = self.first_slot + i
      ep_rng = episodes_lib.slot_rng(self.seed, step, slot, 0)
      for attempt in range(MAX_REDRAWS):
        episode = self.sampler.episode(ep_rng, k)
        aug_rng = episodes_lib.slot_rng(self.seed, step, slot, 1) if self.spec.augment else None
        try:
          empty = _fill_episode(self.source, episode, self.spec, aug_rng, batch, i, self.extras)
          if empty:
            self._redraw_empty(episode, empty, aug_rng, batch, step, slot, i)
          break
        except DataError as e:
          if not self.skip_corrupt:
            raise DataError(f"step {step} slot {slot}: {e} (set data.skip_corrupt=True to "
                            f"skip unreadable records)") from e
          logging.warning("step %d slot %d: skipping episode %s (attempt %d): %s", step, slot,
                          episode, attempt + 1, e)
      else:
        raise DataError(f"step {step} slot {slot}: {MAX_REDRAWS} episodes in a row failed to "
                        f"load; the data set looks broken")
    return batch

  def _redraw_empty(self, episode: Episode, empty: list[int],
                    aug_rng: np.random.Generator | None, batch: dict[str, np.ndarray], step: int,
                    slot: int, i: int) -> None:
    """Replaces the supports of slot i that are empty at the check size.

    Replacements are other images of the class (not the query's, not another support's), drawn
    from the slot's own generator stream 2, so the batch stays a pure function of (seed, step,
    slot). A support that cannot be replaced by a non-empty one within MAX_REDRAWS draws stays
    (flagged in `support_empty`, logged).
    """
    rng = episodes_lib.slot_rng(self.seed, step, slot, 2)
    chosen = list(episode.supports)
    for j in empty:
      tried = set(chosen)
      for _ in range(MAX_REDRAWS):
        cands = self.sampler.support_candidates(episode.class_id, episode.query,
                                                exclude=tried)
        if cands.size == 0:
          break
        r = int(cands[int(rng.integers(cands.size))])
        tried.add(r)
        chosen[j] = r
        if not _fill_support(self.source, r, episode.class_id, self.spec, aug_rng, batch, i, j,
                             self.extras):
          break
      if batch["support_empty"][i, j]:
        logging.warning("step %d slot %d: support %d of class %d is empty at %dx%d and no "
                        "non-empty replacement was found", step, slot, j, episode.class_id,
                        self.extras.support_check_size, self.extras.support_check_size)


class TrainIterator(Iterator[dict]):
  """Iterator over per-process training batches, with get_state / set_state (bytes).

  Compatible with grain's orbax handler (`grain.checkpoint.CheckpointHandler`), which calls
  `get_state`, `set_state` and `start_prefetch`.
  """

  def __init__(self, loader: "TrainLoader", next_step: int):
    self._loader = loader
    self._next_step = int(next_step)
    self._it = None

  @property
  def next_step(self) -> int:
    """The global step whose batch `next()` returns."""
    return self._next_step

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self._loader._grain_iter(self._next_step)  # pylint: disable=protected-access
    batch = next(self._it)
    self._next_step += 1
    return batch

  def start_prefetch(self) -> None:
    """Starts the workers / reading threads ahead of the first `next()`."""
    if self._it is None:
      self._it = self._loader._grain_iter(self._next_step)  # pylint: disable=protected-access
    if hasattr(self._it, "start_prefetch"):
      self._it.start_prefetch()

  def get_state(self) -> bytes:
    return json.dumps(dict(version=STATE_VERSION, next_step=self._next_step,
                           **self._loader.fingerprint), indent=1).encode()

  def set_state(self, state: bytes | str) -> None:
    """Restores a state from `get_state` (of this or an identically configured loader)."""
    try:
      doc = json.loads(state.decode() if isinstance(state, bytes) else state)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"not a fssjax train-iterator state: {e}") from e
    version = doc.get("version") if isinstance(doc, dict) else None
    if version != STATE_VERSION:
      raise ValueError(f"train-iterator state version {version!r}, expected {STATE_VERSION}")
    for key, value in self._loader.fingerprint.items():
      if doc.get(key) != value:
        raise ValueError(f"train-iterator state was saved with {key}={doc.get(key)!r} but this "
                         f"loader has {key}={value!r}")
    self.close()
    self._next_step = int(doc["next_step"])

  def close(self) -> None:
    """Stops the worker processes (if any); the iterator can still be restored / resumed."""
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None


class TrainLoader:
  """The training stream of one process (see the module docstring)."""

  def __init__(self, builder: _TrainBatch, num_steps: int, start_step: int, worker_count: int,
               fingerprint: dict[str, Any]):
    self._builder = builder
    self.num_steps = int(num_steps)
    self.start_step = int(start_step)
    self.worker_count = int(worker_count)
    self.fingerprint = fingerprint
    self.batch_size = builder.batch_size

  def _grain_iter(self, start: int):
    ds = grain.MapDataset.range(start, max(start, self.num_steps)).map(self._builder)
    return _build_iter(ds, self.worker_count)

  def __iter__(self) -> TrainIterator:
    return TrainIterator(self, self.start_step)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The batch of global step `step`, built in this process (for inspection and tests)."""
    return self._builder(step)


def train_loader(config, source: SegmentationSource, class_ids: Sequence[int], *,
                 normalization: str, seed: int, global_batch_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 worker_count: int | None = None, start_step: int = 0,
                 views: Sequence[views_lib.ViewSpec] = (),
                 texts: Sequence[views_lib.TextSpec] = ()) -> TrainLoader:
  """The per-process training stream of `config` (see the module docstring).

  Args:
    config: the run config (reads data.shot, data.train_shot_max, data.image_size,
      data.resize, data.augment, data.workers, data.skip_corrupt, data.support_check_size,
      train.num_steps).
    source: the training split.
    class_ids: the fold's training classes.
    normalization: the method's image normalisation ('imagenet' | 'minus_one_one').
    seed: the stream seed (config.seed).
    global_batch_size: episodes per global step (all processes together).
    process_index, process_count: this process and the count (default: jax's).
    worker_count: grain worker processes (default config.data.workers).
    start_step: first global step when no iterator state is restored.
    views: the method's extra image views (`fssjax.data.views.ViewSpec`); default none.
    texts: the method's text fields (`fssjax.data.views.TextSpec`); default none.
  """
  views_lib.check_specs(views, texts)
  process_index, process_count = _process_layout(process_index, process_count)
  b = _per_process_batch(global_batch_size, process_count)
  data = config.data
  shot = int(data.shot)
  shot_max = int(data.get("train_shot_max", 0) or 0)
  if shot_max > 0:
    sampler = episodes_lib.EpisodeSampler(source, class_ids, shot_max, min_shot=1)
  else:
    sampler = episodes_lib.EpisodeSampler(source, class_ids, shot)
  spec = transform_spec(config, normalization, train=True)
  check = _support_check_size(data)
  extras = _Extras(views, views_lib.text_tables(source, sampler.class_ids, texts), check)
  builder = _TrainBatch(source, sampler, spec, seed, process_index * b, b, shot, shot_max,
                        bool(data.get("skip_corrupt", False)), extras)
  workers = int(data.workers if worker_count is None else worker_count)
  if workers < 0:
    raise ValueError(f"worker count must be >= 0, got {workers}")
  fingerprint = dict(seed=int(seed), global_batch_size=int(global_batch_size), shot=shot,
                     shot_max=shot_max, image_size=spec.image_size, resize=spec.resize,
                     augment=spec.augment, source=str(getattr(source, "name", "")))
  if check:
    fingerprint["support_check_size"] = check
  return TrainLoader(builder, int(config.train.num_steps), start_step, workers, fingerprint)


# ---------------------------------------------------------------------------- dense training


class _DenseTrainBatch:
  """grain map transform: global step -> this process's rows of that step's dense batch."""

  def __init__(self, source, inputs, *, image_size: int, normalization: str, augment: bool,
               seed: int, first_slot: int, batch_size: int, global_batch_size: int,
               skip_corrupt: bool):
    self.source = source
    self.per_image = {k: np.asarray(v) for k, v in dict(inputs.per_image).items()}
    self.shared = {k: np.asarray(v) for k, v in dict(inputs.shared).items()}
    self.targets = inputs.targets
    self.size = int(image_size)
    self.normalization = str(normalization)
    self.augment = bool(augment)
    self.seed = int(seed)
    self.first_slot = int(first_slot)
    self.batch_size = int(batch_size)
    self.global_batch_size = int(global_batch_size)
    self.skip_corrupt = bool(skip_corrupt)
    self.ignore = int(getattr(source, "ignore_label", IGNORE))
    self.n = len(source)
    for key, value in self.per_image.items():
      if value.shape[:1] != (self.n,):
        raise ValueError(f"dense inputs: per-image {key!r} has {value.shape[0]} rows but the "
                         f"source {getattr(source, 'name', '')!r} has {self.n} images")
    self._orders: dict[int, np.ndarray] = {}

  def order(self, epoch: int) -> np.ndarray:
    """The image order of pass `epoch` (a permutation of 0..n-1, a function of seed, epoch)."""
    epoch = int(epoch)
    if epoch not in self._orders:
      if len(self._orders) > 2:
        self._orders.pop(min(self._orders))
      self._orders[epoch] = np.random.default_rng(
          [episodes_lib._seed_entropy(self.seed), epoch, 0x5E6]).permutation(self.n)  # pylint: disable=protected-access
    return self._orders[epoch]

  def index_at(self, position: int) -> int:
    """The image index of global sample `position` (= step * global batch + slot)."""
    epoch, pos = divmod(int(position), self.n)
    return int(self.order(epoch)[pos])

  def sample(self, index: int, flip: bool) -> dict[str, np.ndarray]:
    """One training sample of image `index` (without the per-image and shared keys)."""
    image, label = self.source.load(int(index))
    image, label = np.asarray(image), np.asarray(label)
    if label.shape != image.shape[:2]:
      raise DataError(f"{getattr(self.source, 'name', 'source')} image {index}: label map "
                       f"{list(label.shape)} and image {list(image.shape[:2])} differ in size")
    s = self.size
    image = transforms.resize_image(image, s, s)
    label = transforms.resize_nearest(label, s, s).astype(np.int32)
    if flip:
      image, label = image[:, ::-1], label[:, ::-1]
    out = {"image": transforms.normalize(np.ascontiguousarray(image), self.normalization)}
    if self.targets is None:
      out["label"] = np.ascontiguousarray(label)
    else:
      out.update({k: np.asarray(v) for k, v in self.targets(label, self.ignore).items()})
    return out

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    rows, indices = [], []
    for i in range(self.batch_size):
      slot = self.first_slot + i
      position = step * self.global_batch_size + slot
      flip = self.augment and bool(episodes_lib.slot_rng(self.seed, step, slot, 1).random() < 0.5)
      for attempt in range(MAX_REDRAWS):
        index = self.index_at(position + attempt * self.global_batch_size)
        try:
          rows.append(self.sample(index, flip))
          indices.append(index)
          break
        except DataError as e:
          if not self.skip_corrupt:
            raise DataError(f"step {step} slot {slot}: {e} (set data.skip_corrupt=True to "
                            "skip unreadable records)") from e
          logging.warning("step %d slot %d: skipping image %d (attempt %d): %s", step, slot,
                          index, attempt + 1, e)
      else:
        raise DataError(f"step {step} slot {slot}: {MAX_REDRAWS} images in a row failed to "
                        "load; the data set looks broken")
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    idx = np.asarray(indices, np.int64)
    batch["image_index"] = idx.astype(np.int32)
    for key, value in self.per_image.items():
      batch[key] = value[idx]
    for key, value in self.shared.items():
      batch[key] = np.broadcast_to(value, (len(rows),) + value.shape).copy()
    return batch


def dense_train_loader(config, source, inputs=None, *, normalization: str, seed: int,
                       global_batch_size: int, process_index: int | None = None,
                       process_count: int | None = None, worker_count: int | None = None,
                       start_step: int = 0) -> TrainLoader:
  """The per-process dense training stream (see "Dense training" in the module docstring).

  Args:
    config: the run config (reads data.image_size, data.augment, data.workers,
      data.skip_corrupt, train.num_steps).
    source: the training split, a `fssjax.evaluators.DenseSource`.
    inputs: the method's `fssjax.methods.base.DenseInputs` for `source` (default none).
    normalization, seed, global_batch_size, process_index, process_count, worker_count,
    start_step: as in `train_loader`.

  Raises:
    ValueError: an empty source, per-image arrays whose length is not the source's, a batch
      size that does not split over the processes, a negative worker count.
  """
  from fssjax.methods.base import DenseInputs  # pylint: disable=g-import-not-at-top
  inputs = inputs if inputs is not None else DenseInputs()
  process_index, process_count = _process_layout(process_index, process_count)
  b = _per_process_batch(global_batch_size, process_count)
  if len(source) < 1:
    raise ValueError(f"dense training source {getattr(source, 'name', '')!r} has no images")
  data = config.data
  size = int(data.image_size)
  augment = bool(data.get("augment", False))
  builder = _DenseTrainBatch(
      source, inputs, image_size=size, normalization=normalization, augment=augment,
      seed=seed, first_slot=process_index * b, batch_size=b,
      global_batch_size=int(global_batch_size), skip_corrupt=bool(data.get("skip_corrupt",
                                                                            False)))
  workers = int(data.workers if worker_count is None else worker_count)
  if workers < 0:
    raise ValueError(f"worker count must be >= 0, got {workers}")
  fingerprint = dict(kind="dense", seed=int(seed), global_batch_size=int(global_batch_size),
                     image_size=size, augment=augment, images=len(source),
                     source=str(getattr(source, "name", "")))
  return TrainLoader(builder, int(config.train.num_steps), start_step, workers, fingerprint)


# ---------------------------------------------------------------------------- evaluation


class _EvalBatch:
  """grain map transform: global eval batch g -> this process's slice of it."""

  def __init__(self, source: SegmentationSource, episodes: Sequence[Episode],
               spec: transforms.TransformSpec, global_batch_size: int, first_slot: int,
               batch_size: int, shot: int, keep_original: bool, skip_corrupt: bool,
               extras: _Extras = _NO_EXTRAS):
    self.extras = extras
    self.source = source
    self.episodes = tuple(episodes)
    self.spec = spec
    self.global_batch_size = int(global_batch_size)
    self.first_slot = int(first_slot)
    self.batch_size = int(batch_size)
    self.shot = int(shot)
    self.keep_original = bool(keep_original)
    self.skip_corrupt = bool(skip_corrupt)

  def __call__(self, g: int) -> dict[str, np.ndarray]:
    b, size = self.batch_size, self.spec.image_size
    batch = _empty_batch(b, self.shot, size, self.extras)
    batch["valid"] = np.zeros((b,), bool)
    batch["episode_index"] = np.full((b,), -1, np.int32)
    if self.keep_original:
      m = self.spec.max_original_size
      batch["query_mask_orig"] = np.full((b, m, m), IGNORE, np.uint8)
      batch["query_size"] = np.zeros((b, 2), np.int32)
    for i in range(b):
      index = int(g) * self.global_batch_size + self.first_slot + i
      if index >= len(self.episodes):
        continue
      episode = self.episodes[index]
      try:
        _fill_episode(self.source, episode, self.spec, None, batch, i, self.extras)
      except DataError as e:
        if not self.skip_corrupt:
          raise DataError(f"test episode {index} ({episode}): {e}") from e
        logging.warning("skipping test episode %d (%s): %s", index, episode, e)
        _clear_slot(batch, i)
        continue
      batch["valid"][i] = True
      batch["episode_index"][i] = index
    return batch


class EvalLoader:
  """Re-iterable evaluation batches of one process; `len()` is the number of batches."""

  def __init__(self, builder: _EvalBatch, num_batches: int, worker_count: int):
    self._builder = builder
    self.num_batches = int(num_batches)
    self.worker_count = int(worker_count)
    self.batch_size = builder.batch_size

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    ds = grain.MapDataset.range(self.num_batches).map(self._builder)
    return _build_iter(ds, self.worker_count)


def eval_loader(config, source: SegmentationSource, episodes: Sequence[Episode], *,
                normalization: str, global_batch_size: int, shot: int,
                process_index: int | None = None, process_count: int | None = None,
                worker_count: int | None = None, views: Sequence[views_lib.ViewSpec] = (),
                texts: Sequence[views_lib.TextSpec] = ()) -> EvalLoader:
  """Batches of the fixed test `episodes`, in order (see the module docstring).

  Reads data.image_size, data.resize, data.eval_resolution, data.max_original_size,
  data.skip_corrupt, data.support_check_size and data.workers; `views` / `texts` as in
  `train_loader`. Supports that are empty at the check size are kept and flagged in
  `support_empty` (the evaluator counts them); `masks_resized` counts each episode's masks
  that were resized to their image.

  Raises:
    ValueError: an episode whose support count differs from `shot`, a bad
      data.eval_resolution, or a global batch size not divisible by the process count.
  """
  process_index, process_count = _process_layout(process_index, process_count)
  b = _per_process_batch(global_batch_size, process_count)
  resolution = str(config.data.get("eval_resolution", "resized"))
  if resolution not in EVAL_RESOLUTIONS:
    raise ValueError(f"data.eval_resolution={resolution!r}; expected one of "
                     f"{list(EVAL_RESOLUTIONS)}")
  for i, e in enumerate(episodes):
    if len(e.supports) != shot:
      raise ValueError(f"test episode {i} has {len(e.supports)} supports, expected shot={shot}")
  views_lib.check_specs(views, texts)
  spec = transform_spec(config, normalization, train=False)
  extras = _Extras(views, views_lib.text_tables(source, {e.class_id for e in episodes}, texts),
                   _support_check_size(config.data), count_resized=True)
  builder = _EvalBatch(source, episodes, spec, global_batch_size, process_index * b, b, shot,
                       resolution == "original", bool(config.data.get("skip_corrupt", False)),
                       extras)
  num_batches = -(-len(episodes) // int(global_batch_size))
  workers = int(config.data.workers if worker_count is None else worker_count)
  return EvalLoader(builder, num_batches, workers)
