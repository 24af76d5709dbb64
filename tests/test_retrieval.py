"""LLM-guided support retrieval: candidates, visual K-nearest choice (global and foreground
similarity), and that the novel class's annotations are never read for a support."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fssjax import configlib
from fssjax.data import episodes as ep
from fssjax.data import pipeline
from fssjax.data import transforms
from fssjax.data.memory import InMemorySource
from fssjax.methods import retrieval

SIZE = 16


def _source():
  """4 classes: 'novel' (0) in records 0..3; base 'b1' (1) in 4..9; 'b2' (2) in 10..15;
  'b3' (3) in 16..19. Records 4 and 10 also hold the novel class. Record i's image is a
  flat colour of brightness 10 * i, so features (mean colour) order candidates by index."""
  images, labels = [], []
  for i in range(20):
    images.append(np.full((SIZE, SIZE, 3), 10 * i, np.uint8))
    label = np.zeros((SIZE, SIZE), np.uint8)
    cls = 0 if i < 4 else 1 if i < 10 else 2 if i < 16 else 3
    label[2:8, 2:8] = cls + 1
    if i in (4, 10):
      label[10:14, 10:14] = 1  # the novel class appears in two base-class images too
    labels.append(label)
  return InMemorySource(images, labels, ["novel", "b1", "b2", "b3"], name="retrieval")


class RecordingSource:
  """Wraps a source; records every (record, class id) that `load` is asked for."""

  def __init__(self, source):
    self._source = source
    self.name = source.name
    self.class_names = source.class_names
    self.loads = []

  def __len__(self):
    return len(self._source)

  def images_with_class(self, c):
    return self._source.images_with_class(c)

  def load(self, index, class_id):
    self.loads.append((int(index), int(class_id)))
    return self._source.load(index, class_id)

  def record_key(self, index):
    return self._source.record_key(index)

  def image_key(self, index):
    return self._source.image_key(index)


@jax.jit
def _mean_colour(images):
  # A jitted function, as the evaluator's: its outputs come back as read-only arrays.
  return jnp.concatenate([images.mean(axis=(1, 2)), jnp.ones((len(images), 1))], -1)


def _bank(source, embed=_mean_colour):
  spec = transforms.TransformSpec(image_size=SIZE, normalization="minus_one_one")
  return retrieval.FeatureBank(source, embed, spec, batch_size=4)


@jax.jit
def _colour_maps(images):
  # Feature maps [N, 4, 4, 4]: the mean colour of each 4 x 4 cell in [0, 1], plus a constant.
  n = images.shape[0]
  cells = (images * 0.5 + 0.5).reshape(n, 4, SIZE // 4, 4, SIZE // 4, 3).mean(axis=(2, 4))
  return jnp.concatenate([cells, jnp.full((n, 4, 4, 1), 0.1)], -1)


def test_candidates_are_top_r_base_images_without_the_query():
  src = _source()
  ranker = retrieval.RelatedClassSupports(src, {0: [2, 1, 3]}, _bank(src), top_r=2)
  cands = ranker.candidates(0, query=10)
  # b2's images first (rank 1), then b1's; record 10 is the query; none from b3 (rank 3).
  assert cands == [(r, 2) for r in range(11, 16)] + [(r, 1) for r in range(4, 10)]


def test_supports_are_the_k_visually_nearest_candidates():
  src = _source()
  ranker = retrieval.RelatedClassSupports(src, {0: [1, 2]}, _bank(src), top_r=2,
                                          similarity="global")
  # Query record 2 (brightness 20): the nearest by cosine of [mean colour, 1] are the
  # darkest candidates, records 4 and 5 of b1.
  assert ranker.supports(0, 2, 2, np.random.default_rng(0)) == [(4, 1), (5, 1)]
  # Query record 3 with b2 ranked first and top_r=1: only b2's images, darkest first.
  ranker = retrieval.RelatedClassSupports(src, {0: [2, 1]}, _bank(src), top_r=1,
                                          similarity="global")
  assert ranker.supports(0, 3, 3, np.random.default_rng(0)) == [(10, 2), (11, 2), (12, 2)]
  # The foreground similarity needs feature maps, not pooled vectors.
  ranker = retrieval.RelatedClassSupports(src, {0: [2, 1]}, _bank(src), top_r=1)
  with pytest.raises(ValueError, match="needs feature maps"):
    ranker.supports(0, 3, 1, np.random.default_rng(0))
  with pytest.raises(ValueError, match="similarity"):
    retrieval.RelatedClassSupports(src, {0: [2]}, _bank(src), similarity="local")


RED, GREEN, BLUE, YELLOW = (230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)


def _objects_source():
  """Query 0 (class 'novel'): a red object (top-left quarter) on blue. Base candidates (class 'b1'):
  record 1, a green object on blue -- the image most like the query overall, but its object
  is like nothing in the query; record 2, a red object on yellow -- unlike the query overall,
  but its object looks like the query's. Record 3 ('b2') holds a red object too, under
  another class; record 4 is a second image of the novel class."""
  def image(obj, bg, obj_cls, extra=None):
    im = np.empty((SIZE, SIZE, 3), np.uint8)
    im[:] = bg
    im[:SIZE // 2, :SIZE // 2] = obj
    lab = np.zeros((SIZE, SIZE), np.uint8)
    lab[:SIZE // 2, :SIZE // 2] = obj_cls + 1
    if extra is not None:  # a second object: the bottom quarter of the right half
      im[3 * SIZE // 4:, SIZE // 2:] = extra[0]
      lab[3 * SIZE // 4:, SIZE // 2:] = extra[1] + 1
    return im, lab
  recs = [image(RED, BLUE, 0), image(GREEN, BLUE, 1, extra=(RED, 0)), image(RED, YELLOW, 1),
          image(RED, YELLOW, 2), image(RED, BLUE, 0)]
  return RecordingSource(InMemorySource([r[0] for r in recs], [r[1] for r in recs],
                                        ["novel", "b1", "b2"], name="objects"))


def test_foreground_similarity_picks_the_support_whose_object_matches():
  src = _objects_source()
  bank = _bank(src, _colour_maps)
  glob = retrieval.RelatedClassSupports(src, {0: [1]}, bank, top_r=1, similarity="global")
  fg = retrieval.RelatedClassSupports(src, {0: [1]}, bank, top_r=1)  # the default
  assert fg.similarity == "foreground"
  rng = np.random.default_rng(0)
  # Record 1 also holds a red novel-class object, but its b1 mask covers only the green one.
  assert fg.supports(0, 0, 1, rng) == [(2, 1)]
  assert glob.supports(0, 0, 1, rng) == [(1, 1)]
  sims = fg.scores(0, [(1, 1), (2, 1)])
  np.testing.assert_allclose(sims[1], 1.0, rtol=1e-3)  # the same colour somewhere in the query
  assert sims[0] < 0.9
  # Mask-pooled features: only the masks of the candidates' own (base) classes were read.
  assert {(r, c) for r, c in src.loads if r != 0} == {(1, 1), (2, 1)}
  pooled = bank.foreground([(1, 1), (1, 0)])  # the novel-class mask of record 1, for the check
  green = np.array([*(np.array(GREEN) / 127.5 - 1) * 0.5 + 0.5, 0.1], np.float32)
  np.testing.assert_allclose(pooled[0], green / np.linalg.norm(green), atol=1e-3)
  assert np.linalg.norm(pooled[1] - pooled[0]) > 0.5
  # Each view is computed once: asking again loads nothing. A query's map is kept, a
  # candidate's only as its mask-pooled vector.
  n = len(src.loads)
  bank.get([1, 2]), bank.locations(0), bank.foreground([(2, 1), (1, 1), (1, 0)])
  assert len(src.loads) == n
  assert set(bank._raw) == {0}


def test_area_resize_is_the_foreground_fraction_per_cell():
  mask = np.zeros((8, 8), np.uint8)
  mask[:4, :2] = 1
  mask[4:, :] = 255  # ignored pixels are not foreground
  np.testing.assert_allclose(retrieval._area_resize(mask, (2, 2)), [[0.5, 0.0], [0.0, 0.0]])


def test_supports_used_records_each_class_images_and_episodes():
  src = _objects_source()
  eps = [ep.Episode(class_id=0, query=0, supports=(2,), support_classes=(1,)),
         ep.Episode(class_id=0, query=4, supports=(2,), support_classes=(1,)),
         ep.Episode(class_id=0, query=2, supports=(4,), support_classes=None)]
  used = retrieval._supports_used(src, eps)
  key = src.record_key
  assert used == {"novel": {
      "images": {key(2): ["b1", 2], key(4): ["novel", 1]},
      "episodes": [{"query": key(0), "supports": [[key(2), "b1"]]},
                   {"query": key(4), "supports": [[key(2), "b1"]]},
                   {"query": key(2), "supports": [[key(4), "novel"]]}]}}


def test_too_few_candidates_is_a_clear_error():
  src = _source()
  ranker = retrieval.RelatedClassSupports(src, {0: [3]}, _bank(src), top_r=1)
  with pytest.raises(ValueError, match="only 4 candidate supports.*top_r"):
    ranker.supports(0, 0, 5, np.random.default_rng(0))


def test_feature_bank_computes_each_record_once():
  src = RecordingSource(_source())
  bank = _bank(src)
  a = bank.get([5, 6, 5])
  n = len(src.loads)
  b = bank.get([6, 5])
  assert len(src.loads) == n == 2  # two distinct records, each loaded once
  np.testing.assert_array_equal(a[[1, 0]], b)
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)


def test_novel_class_annotations_are_never_read_for_a_support():
  src = RecordingSource(_source())
  for similarity in ("global", "foreground"):
    src.loads.clear()
    ranker = retrieval.RelatedClassSupports(src, {0: [1, 2, 3]}, _bank(src, _colour_maps),
                                            top_r=3, similarity=similarity)
    eps = ep.test_episodes("synthetic", src, [0], 8, 2, 0, policy="ranked", ranker=ranker)
    random_eps = ep.test_episodes("synthetic", src, [0], 8, 2, 0)
    # The same queries as the published (random) episodes; supports from base classes only.
    assert [(e.class_id, e.query) for e in eps] == [(e.class_id, e.query) for e in random_eps]
    assert all(c != 0 for e in eps for c in e.support_classes)
    # Choosing them read images and base-class masks; a novel-class mask only of a query
    # (loaded with its image; it scores the query and is not used to choose).
    queries = {e.query for e in eps}
    assert src.loads and all(c != 0 or r in queries for r, c in src.loads)
  src.loads.clear()
  config = configlib.base_config()
  config.data.image_size = SIZE
  batches = list(pipeline.eval_loader(config, src, eps, normalization="imagenet",
                                      global_batch_size=4, shot=2, process_index=0,
                                      process_count=1, worker_count=0))
  queries = {e.query for e in eps}
  novel_loads = [(r, c) for r, c in src.loads if c == 0]
  assert novel_loads and all(r in queries for r, _ in novel_loads)
  # Supports 4 and 10 hold the novel class too, but their masks are of their base class:
  for b in batches:
    for i in range(len(b["class_id"])):
      if not b["valid"][i]:
        continue
      e = eps[int(b["episode_index"][i])]
      for j, (r, c) in enumerate(zip(e.supports, e.support_classes)):
        expected = (np.asarray(src._source.load(r, c)[1]) == 1).sum()
        assert (b["support_masks"][i, j] == 1).sum() == expected


def test_summarize_table_lists_every_variant_and_the_baseline():
  table = retrieval.summarize({
      "true": dict(miou=50.0, fbiou=60.0, baseline_miou=7.8, baseline_fbiou=3.9),
      "llm": dict(miou=30.25, fbiou=55.0)})
  assert table.splitlines() == [
      "| supports | mIoU | FB-IoU |", "|---|---|---|", "| true | 50.0 | 60.0 |",
      "| llm | 30.2 | 55.0 |", "| all-foreground baseline | 7.8 | 3.9 |"]
