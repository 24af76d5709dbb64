"""Episodic sampling: the training episode stream and the fixed test episode lists.

Training. `EpisodeSampler` indexes a source once (class -> images) and keeps, for every shot
count K it may be asked for, the classes with at least K + 1 images (a query plus K distinct
supports); the classes left out are logged once with the reason, so a run never fails
mid-way on a rare class. The training stream is a pure function of (seed, global step):

  * K of step s (random 1..N shots, `data.train_shot_max = N > 0`) comes from
    `np.random.default_rng([seed, s])`, so every episode of one global batch has the same K;
  * the episode in slot j of step s comes from `np.random.default_rng([seed, s, j, 0])` (and
    its augmentation from `[seed, s, j, 1]`, see `fssjax.data.pipeline`).

Hence the stream is identical for any number of grain workers or hosts, and resuming at step
s continues exactly.

Test episodes. `test_episodes(benchmark, source, class_ids, n, shot, seed)` follows the
published sampling rule of each benchmark (HSNet, juhongm999/hsnet data/*.py; LVIS-92i from
Matcher's data/lvis.py); episode i draws from `np.random.default_rng([seed, i])`, so the list is
identical on any machine and its first m episodes do not depend on n:

  * 'coco20i', 'coco20i_contiguous', 'synthetic' (HSNet COCO rule): a uniform random class of
    the fold's test classes, a uniform random query among its images, K random supports;
  * 'pascal5i' (HSNet PASCAL rule): the (query image, class) pairs of the test classes in a
    fixed order (record index, then class id); episode i uses pair i % n_pairs, K random
    supports;
  * 'fss1000' (HSNet FSS rule): every test image is the query exactly once (class by class in
    `class_ids` order, images in record order); n defaults to the number of test images
    (2400 on the real split);
  * 'lvis92i' (Matcher rule): class = usable test classes[i % n_classes], random query, K
    random supports; n defaults to 2300.

Supports are always K distinct images other than the query. (The published samplers draw
each support independently, so a support could repeat; here they are distinct, as the
task definition asks.) "Image" means the underlying image, not the record: records with one
`fssjax.data.base.image_key` (a file listed twice, two equal arrays) are one image, so a
query is never its own support even when a data set lists its image twice (logged when the
sampler finds such records). Default n: 1000 for COCO / PASCAL / synthetic.

Support policy. `test_episodes(..., policy='random')` is the rule above (the published one);
`policy='ranked'` keeps each episode's class and query and asks a
`fssjax.priors.ranking.SupportRanker` for the K supports and the class of each support's mask
(`Episode.support_classes`). The 'random' episodes and their manifest hashes are those of
earlier versions, bit for bit.

Manifests. `write_manifest(path, episodes, source, meta)` writes the list as JSON (class id and
name, query key, support keys) and returns a sha256 of a canonical serialisation of the keys,
so two machines can compare episode lists. Command line:

  python -m fssjax.data.episodes --config=configs/hsnet_coco.py:fold=0 --out=manifest.json
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from absl import logging
import numpy as np

from fssjax import utils
from fssjax.data.base import DataError, Episode, SegmentationSource, image_key

if TYPE_CHECKING:
  from fssjax.priors.ranking import SupportRanker

COCO_RULE = ("coco20i", "coco20i_contiguous", "synthetic")
BENCHMARKS = COCO_RULE + ("pascal5i", "fss1000", "lvis92i")
DEFAULT_TEST_EPISODES = {"coco20i": 1000, "coco20i_contiguous": 1000, "synthetic": 1000,
                         "pascal5i": 1000, "lvis92i": 2300}  # fss1000: all test images
MANIFEST_VERSION = 1


def _seed_entropy(seed: int) -> int:
  """Maps any Python int seed to the non-negative entropy numpy's SeedSequence needs."""
  return int(seed) % (1 << 64)


def step_rng(seed: int, step: int) -> np.random.Generator:
  """The generator of global step `step` (draws the shot count K of the step)."""
  return np.random.default_rng([_seed_entropy(seed), int(step)])


def slot_rng(seed: int, step: int, slot: int, stream: int = 0) -> np.random.Generator:
  """The generator of global batch slot `slot` of step `step`; stream 0 episode, 1 augmentation."""
  return np.random.default_rng([_seed_entropy(seed), int(step), int(slot), int(stream)])


def step_shot(seed: int, step: int, shot: int, shot_max: int = 0) -> int:
  """K of global step `step`: `shot` when `shot_max <= 0`, else uniform in 1..shot_max."""
  if shot_max and shot_max > 0:
    return int(step_rng(seed, step).integers(1, shot_max + 1))
  return int(shot)


def _support_candidates(pool: np.ndarray, query: int, groups: Mapping[int, int] | None
                        ) -> np.ndarray:
  """The records of `pool` whose image differs from the query's image, one record per image
  (the first in record order). With one record per image this is `pool[pool != query]`."""
  if groups is None:
    return pool[pool != query]
  g = np.fromiter((groups[int(r)] for r in pool), np.int64, pool.size)
  gq = groups.get(int(query))
  keep = g != gq if gq is not None else np.ones(pool.size, bool)
  others, g = pool[keep], g[keep]
  _, first = np.unique(g, return_index=True)
  if first.size == others.size:
    return others
  return others[np.sort(first)]


def _draw_supports(rng: np.random.Generator, pool: np.ndarray, query: int, shot: int,
                   groups: Mapping[int, int] | None = None) -> tuple:
  """K record indices from `pool` (sorted int64) of K distinct images, none the query's image.

  `groups` maps each record to its image (see `image_groups`); None: one record per image.
  """
  others = _support_candidates(pool, query, groups)
  if others.size < shot:
    raise DataError(f"cannot draw {shot} supports other than record {query}: the class has "
                    f"only {others.size} other images")
  return tuple(int(x) for x in rng.choice(others, size=shot, replace=False))


def image_groups(source: SegmentationSource, records: Iterable[int]) -> dict[int, int] | None:
  """record -> image group id (records of one underlying image share an id), by
  `fssjax.data.base.image_key`; None when every record is its own image (the common case)."""
  keys: dict[str, int] = {}
  out: dict[int, int] = {}
  for r in sorted({int(r) for r in records}):
    out[r] = keys.setdefault(image_key(source, r), len(keys))
  return None if len(keys) == len(out) else out


class EpisodeSampler:
  """Samples training episodes from a fixed set of classes of a source.

  The class -> images index is computed once at construction. For each shot count K the
  usable classes are those with >= K + 1 images; classes left out are logged once.
  """

  def __init__(self, source: SegmentationSource, class_ids: Iterable[int], max_shot: int,
               min_shot: int | None = None):
    """Indexes `source` for `class_ids` and shot counts min_shot..max_shot.

    Args:
      source: the split to sample from.
      class_ids: the classes episodes may use.
      max_shot: the largest K that will be asked for.
      min_shot: the smallest K (default `max_shot`, a fixed shot count).

    Raises:
      DataError: a class id out of range, or no class with `max_shot + 1` images at all
        (then no episode can be drawn; fixing the data or the fold is required).
    """
    self.source_name = getattr(source, "name", type(source).__name__)
    self.class_ids = tuple(int(c) for c in class_ids)
    self.max_shot = int(max_shot)
    self.min_shot = self.max_shot if min_shot is None else int(min_shot)
    if not 1 <= self.min_shot <= self.max_shot:
      raise ValueError(f"shot range must satisfy 1 <= min_shot <= max_shot, got "
                       f"{self.min_shot}..{self.max_shot}")
    if not self.class_ids:
      raise DataError(f"source {self.source_name!r}: no classes given to sample episodes from")
    n_classes = len(source.class_names)
    self._images: dict[int, np.ndarray] = {}
    for c in self.class_ids:
      if not 0 <= c < n_classes:
        raise DataError(f"source {self.source_name!r}: class id {c} out of range [0, {n_classes})")
      self._images[c] = np.asarray(source.images_with_class(c), np.int64)
    self.groups = image_groups(source, (r for c in self.class_ids for r in self._images[c]))
    if self.groups is not None:
      n_records = len({int(r) for c in self.class_ids for r in self._images[c]})
      logging.warning("source %r: %d records show only %d distinct images (by image key); "
                      "a query is never its own support and supports are distinct images",
                      self.source_name, n_records, len(set(self.groups.values())))
    self._n_images = {c: self._count_images(self._images[c]) for c in self.class_ids}
    self._usable: dict[int, tuple[int, ...]] = {}
    for k in range(self.min_shot, self.max_shot + 1):
      self._usable[k] = tuple(c for c in self.class_ids if self._n_images[c] >= k + 1)
      left_out = [c for c in self.class_ids if self._n_images[c] < k + 1]
      if left_out:
        names = [source.class_names[c] for c in left_out[:10]]
        logging.warning(
            "source %r, %d-shot: %d of %d classes left out because they have fewer than %d "
            "images (a query plus %d distinct supports): %s%s", self.source_name, k,
            len(left_out), len(self.class_ids), k + 1, k, names,
            " ..." if len(left_out) > 10 else "")
    if not self._usable[self.max_shot]:
      raise DataError(
          f"source {self.source_name!r}: none of the {len(self.class_ids)} classes has "
          f"{self.max_shot + 1} images, so no {self.max_shot}-shot episode can be drawn")

  def _count_images(self, pool: np.ndarray) -> int:
    if self.groups is None:
      return int(pool.size)
    return len({self.groups[int(r)] for r in pool})

  def same_image(self, a: int, b: int) -> bool:
    """Whether records a and b show the same image."""
    if self.groups is None or int(a) not in self.groups or int(b) not in self.groups:
      return int(a) == int(b)
    return self.groups[int(a)] == self.groups[int(b)]

  def support_candidates(self, class_id: int, query: int,
                         exclude: Iterable[int] = ()) -> np.ndarray:
    """Records of `class_id` usable as supports of `query`: other images than the query's and
    than those of `exclude`, one record per image."""
    pool = self._images[class_id]
    others = _support_candidates(pool, query, self.groups)
    for e in exclude:
      others = others[[not self.same_image(int(r), e) for r in others]] if others.size else others
    return others

  def usable_classes(self, shot: int) -> tuple[int, ...]:
    """Classes with at least `shot + 1` images."""
    return self._usable[self._check_shot(shot)]

  def left_out_classes(self, shot: int) -> tuple[int, ...]:
    """Classes skipped for `shot` (fewer than `shot + 1` images)."""
    usable = set(self.usable_classes(shot))
    return tuple(c for c in self.class_ids if c not in usable)

  def images_with_class(self, class_id: int) -> np.ndarray:
    return self._images[class_id]

  def _check_shot(self, shot: int) -> int:
    shot = int(shot)
    if not self.min_shot <= shot <= self.max_shot:
      raise ValueError(f"shot {shot} outside the sampler's range "
                       f"{self.min_shot}..{self.max_shot}")
    return shot

  def episode(self, rng: np.random.Generator, shot: int) -> Episode:
    """A uniform random usable class, a uniform random query, K distinct other supports."""
    usable = self.usable_classes(shot)
    class_id = usable[int(rng.integers(len(usable)))]
    pool = self._images[class_id]
    query = int(pool[int(rng.integers(pool.size))])
    return Episode(class_id, query, _draw_supports(rng, pool, query, shot, self.groups))


_SAMPLERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _cached_sampler(source: SegmentationSource, class_ids: Sequence[int],
                    shot: int) -> EpisodeSampler:
  key = (tuple(int(c) for c in class_ids), int(shot))
  try:
    per_source = _SAMPLERS.setdefault(source, {})
  except TypeError:  # not weak-referenceable or unhashable: index anew
    return EpisodeSampler(source, class_ids, shot)
  if key not in per_source:
    per_source[key] = EpisodeSampler(source, class_ids, shot)
  return per_source[key]


def train_episode(source: SegmentationSource, class_ids: Sequence[int], shot: int,
                  rng: np.random.Generator) -> Episode:
  """One training episode: random usable class, random query, K distinct supports != query.

  The class index of (`source`, `class_ids`, `shot`) is computed on the first call and cached
  (classes with fewer than shot + 1 images are left out and logged once). For a stream, use
  `EpisodeSampler` and `train_step_episodes`.
  """
  return _cached_sampler(source, class_ids, shot).episode(rng, shot)


def train_step_episodes(sampler: EpisodeSampler, seed: int, step: int, slots: Iterable[int],
                        shot: int) -> list[Episode]:
  """The episodes of the given global batch slots of global step `step` (all with K=`shot`)."""
  return [sampler.episode(slot_rng(seed, step, j), shot) for j in slots]


# ---------------------------------------------------------------------------- test episodes


def default_num_test_episodes(benchmark: str, source: SegmentationSource,
                              class_ids: Sequence[int]) -> int:
  """Published episode count: 1000 (COCO, PASCAL, synthetic), all test images (FSS-1000),
  2300 (LVIS-92i)."""
  _check_benchmark(benchmark)
  if benchmark == "fss1000":
    return sum(int(np.asarray(source.images_with_class(c)).size) for c in class_ids)
  return DEFAULT_TEST_EPISODES[benchmark]


def _check_benchmark(benchmark: str) -> None:
  if benchmark not in BENCHMARKS:
    raise ValueError(f"Unknown benchmark {benchmark!r}; expected one of {list(BENCHMARKS)}")


POLICIES = ("random", "ranked")


def test_episodes(benchmark: str, source: SegmentationSource, class_ids: Sequence[int],
                  n: int | None, shot: int, seed: int, *, policy: str = "random",
                  ranker: SupportRanker | None = None) -> list[Episode]:
  """The fixed evaluation episodes of a benchmark (see the module docstring for the rules).

  Args:
    benchmark: 'coco20i' | 'coco20i_contiguous' | 'synthetic' | 'pascal5i' | 'fss1000' |
      'lvis92i'.
    source: the test split.
    class_ids: the fold's test classes.
    n: number of episodes; None or 0 = the benchmark's default.
    shot: K.
    seed: the test seed (`data.test_seed`).
    policy: how supports are chosen. 'random' (the published rule, the default): K distinct
      random images of the class; the episodes and their manifest hash are those of every
      earlier fssjax version. 'ranked': the class and query come from the benchmark's rule as
      with 'random' (same draws), and `ranker.supports(class_id, query, shot, rng)` (see
      `fssjax.priors.ranking.SupportRanker`) names the K supports and the class of each
      support's mask, with `rng` the episode's generator after the query was drawn.
    ranker: the `SupportRanker` of the 'ranked' policy.

  Returns:
    n episodes; identical for identical arguments on any machine.

  Raises:
    DataError: when no test class has `shot + 1` images, or a ranker's answer is invalid (the
      wrong count, a record out of range, the query's own image, one image twice, a class id
      out of range).
    ValueError: an unknown policy, or 'ranked' without a ranker.
  """
  _check_benchmark(benchmark)
  shot = int(shot)
  if shot < 1:
    raise ValueError(f"shot must be >= 1, got {shot}")
  if policy not in POLICIES:
    raise ValueError(f"Unknown support policy {policy!r}; expected one of {list(POLICIES)}")
  if policy == "ranked" and ranker is None:
    raise ValueError("support policy 'ranked' needs a ranker (fssjax.priors.ranking."
                     "SupportRanker)")
  sampler = EpisodeSampler(source, class_ids, shot)
  usable = sampler.usable_classes(shot)
  if not n:
    n = default_num_test_episodes(benchmark, source, usable)
  n = int(n)
  if n < 0:
    raise ValueError(f"number of test episodes must be >= 0, got {n}")

  def rng_of(i: int) -> np.random.Generator:
    return np.random.default_rng([_seed_entropy(seed), i])

  def episode(c: int, q: int, rng: np.random.Generator) -> Episode:
    if policy == "random":
      return Episode(c, q, _draw_supports(rng, sampler.images_with_class(c), q, shot,
                                          sampler.groups))
    return _ranked_episode(ranker, source, c, q, shot, rng)

  out = []
  if benchmark in COCO_RULE:
    for i in range(n):
      rng = rng_of(i)
      c = usable[int(rng.integers(len(usable)))]
      pool = sampler.images_with_class(c)
      q = int(pool[int(rng.integers(pool.size))])
      out.append(episode(c, q, rng))
  elif benchmark == "pascal5i":
    pairs = sorted((int(q), c) for c in usable for q in sampler.images_with_class(c))
    for i in range(n):
      q, c = pairs[i % len(pairs)]
      out.append(episode(c, q, rng_of(i)))
  elif benchmark == "fss1000":
    pairs = [(int(q), c) for c in usable for q in sampler.images_with_class(c)]
    for i in range(n):
      q, c = pairs[i % len(pairs)]
      out.append(episode(c, q, rng_of(i)))
  else:  # lvis92i
    for i in range(n):
      rng = rng_of(i)
      c = usable[i % len(usable)]
      pool = sampler.images_with_class(c)
      q = int(pool[int(rng.integers(pool.size))])
      out.append(episode(c, q, rng))
  return out


def _ranked_episode(ranker: SupportRanker, source: SegmentationSource, class_id: int,
                    query: int, shot: int, rng: np.random.Generator) -> Episode:
  """The episode of the 'ranked' policy: the ranker's K (record, class) pairs, validated."""
  pairs = list(ranker.supports(int(class_id), int(query), int(shot), rng))
  where = (f"support ranker {type(ranker).__name__} for class {class_id} "
           f"({source.class_names[class_id]!r}), query record {query}")
  if len(pairs) != shot:
    raise DataError(f"{where}: returned {len(pairs)} supports, expected {shot}")
  records, classes = [], []
  n_records, n_classes = len(source), len(source.class_names)
  for item in pairs:
    try:
      r, c = (int(v) for v in item)
    except (TypeError, ValueError):
      raise DataError(f"{where}: expected (record index, class id) pairs, got {item!r}") from None
    if not 0 <= r < n_records:
      raise DataError(f"{where}: support record {r} outside [0, {n_records})")
    if not 0 <= c < n_classes:
      raise DataError(f"{where}: support class {c} outside [0, {n_classes})")
    if image_key(source, r) == image_key(source, query):
      raise DataError(f"{where}: support record {r} is the query's own image "
                      f"({source.record_key(r)!r})")
    if any(image_key(source, r) == image_key(source, x) for x in records):
      raise DataError(f"{where}: image {source.record_key(r)!r} is used twice as a support")
    records.append(r)
    classes.append(c)
  support_classes = None if all(c == class_id for c in classes) else tuple(classes)
  return Episode(int(class_id), int(query), tuple(records), support_classes)


# ---------------------------------------------------------------------------- manifests


def _canonical_items(episodes: Sequence[Episode], source: SegmentationSource) -> list:
  names = source.class_names
  items = []
  for e in episodes:
    item = [int(e.class_id), str(names[e.class_id]), source.record_key(e.query),
            [source.record_key(s) for s in e.supports]]
    if e.support_classes is not None:
      item.append([[int(c), str(names[c])] for c in e.support_classes])
    items.append(item)
  return items


def episodes_sha256(episodes: Sequence[Episode], source: SegmentationSource) -> str:
  """sha256 hex of the canonical JSON of [class id, class name, query key, support keys]
  (plus [[class id, name], ...] of the supports' masks for an episode whose `support_classes`
  is set; the hash of an episode without it is that of every earlier version)."""
  blob = json.dumps(_canonical_items(episodes, source), separators=(",", ":"),
                    ensure_ascii=True)
  return hashlib.sha256(blob.encode("ascii")).hexdigest()


def write_manifest(path: str, episodes: Sequence[Episode], source: SegmentationSource,
                   meta: Mapping[str, Any] | None = None) -> str:
  """Writes the episode list as JSON (atomically) and returns its sha256 (see above).

  The file holds {"version", "source", "meta", "num_episodes", "sha256", "episodes": [{
  "class_id", "class_name", "query", "supports", "query_index", "support_indices"} (and
  "support_classes" for an episode whose supports show other classes)]}.
  """
  items = _canonical_items(episodes, source)
  digest = episodes_sha256(episodes, source)
  doc = dict(
      version=MANIFEST_VERSION,
      source=getattr(source, "name", type(source).__name__),
      meta=dict(meta or {}),
      num_episodes=len(episodes),
      sha256=digest,
      episodes=[_manifest_entry(item, e) for item, e in zip(items, episodes)],
  )
  utils.atomic_write_json(path, doc, indent=1)
  return digest


def _manifest_entry(item: list, e: Episode) -> dict:
  c, name, q, s = item[:4]
  entry = dict(class_id=c, class_name=name, query=q, supports=s, query_index=e.query,
               support_indices=list(e.supports))
  if e.support_classes is not None:
    entry["support_classes"] = [int(x) for x in e.support_classes]
  return entry


def read_manifest(path: str) -> dict:
  """Reads a manifest written by `write_manifest`; episodes come back as `Episode`s."""
  try:
    with open(path) as f:
      doc = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"cannot read episode manifest {path}: {e}") from e
  if doc.get("version") != MANIFEST_VERSION:
    raise DataError(f"episode manifest {path}: version {doc.get('version')!r}, expected "
                    f"{MANIFEST_VERSION}")
  doc["episodes"] = [
      Episode(e["class_id"], e["query_index"], tuple(e["support_indices"]),
              tuple(e["support_classes"]) if e.get("support_classes") is not None else None)
      for e in doc["episodes"]]
  return doc


# ---------------------------------------------------------------------------- CLI


def episodes_from_config(config, *, policy: str = "random", ranker: SupportRanker | None = None
                         ) -> tuple[list[Episode], SegmentationSource, dict]:
  """Builds the test source and the fixed test episodes of `config` (config.data.*).

  Returns (episodes, source, meta); `config.data.test_episodes` 0 or None means the
  benchmark's default count. `policy` / `ranker`: the support policy (see `test_episodes`);
  meta records the policy.
  """
  from fssjax.data import sources  # pylint: disable=g-import-not-at-top

  data = config.data
  benchmark = sources.benchmark_of(data)
  source = sources.build_source(data, "test")
  class_ids = sources.fold_classes_for(data, "test", source=source)
  episodes = test_episodes(benchmark, source, class_ids, data.test_episodes or None,
                           int(data.shot), int(data.test_seed), policy=policy, ranker=ranker)
  meta = dict(benchmark=benchmark, dataset=str(data.dataset), fold=int(data.fold),
              shot=int(data.shot), test_seed=int(data.test_seed), num_episodes=len(episodes),
              num_test_classes=len(class_ids))
  if policy != "random":
    meta.update(support_policy=policy, ranker=type(ranker).__name__)
  return episodes, source, meta


def main(argv: Sequence[str]) -> None:
  del argv
  config = _CONFIG.value
  episodes, source, meta = episodes_from_config(config)
  digest = write_manifest(_OUT.value, episodes, source, meta)
  print(json.dumps(dict(manifest=_OUT.value, sha256=digest, **meta)))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                            lock_config=True)
  _OUT = flags.DEFINE_string("out", "manifest.json", "Where to write the JSON manifest.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
