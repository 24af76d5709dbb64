"""Support selection as a policy: `test_episodes(..., policy='ranked', ranker=...)`."""

import json

import numpy as np
import pytest

from fssjax import configlib
from fssjax.data import episodes as ep
from fssjax.data import pipeline
from fssjax.data.base import DataError, Episode
from fssjax.data.memory import InMemorySource
from fssjax.priors import ranking


def _source() -> InMemorySource:
  """Class 0 in records 0..5 (top band), class 1 in 6..11 (bottom band), class 2 in 0..2."""
  rng = np.random.default_rng(3)
  images, labels = [], []
  for i in range(12):
    images.append(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    label = np.zeros((16, 16), np.uint8)
    label[(0 if i < 6 else 10):(4 if i < 6 else 14), :] = 1 if i < 6 else 2
    if i < 3:
      label[6:8, 6:8] = 3
    labels.append(label)
  return InMemorySource(images, labels, ["a", "b", "c"], name="policy")


class FirstOfRelatedClass:
  """A trivial ranker: support k is the k-th record of the 'related' class (1 - class_id)."""

  def __init__(self, source):
    self.source = source
    self.calls = []

  def supports(self, class_id, query, shot, rng):
    self.calls.append((class_id, query, shot, type(rng).__name__))
    other = 1 - class_id
    return [(int(r), other) for r in self.source.images_with_class(other)[:shot]]


def test_random_policy_is_the_default_and_ranked_asks_the_ranker():
  src = _source()
  base = ep.test_episodes("coco20i", src, [0, 1], 30, 2, seed=0)
  assert ep.test_episodes("coco20i", src, [0, 1], 30, 2, seed=0, policy="random") == base
  ranker = FirstOfRelatedClass(src)
  assert isinstance(ranker, ranking.SupportRanker)
  ranked = ep.test_episodes("coco20i", src, [0, 1], 30, 2, seed=0, policy="ranked",
                            ranker=ranker)
  # Same classes and queries (same draws), the ranker's supports and their classes.
  assert [(e.class_id, e.query) for e in ranked] == [(e.class_id, e.query) for e in base]
  assert len(ranker.calls) == 30 and ranker.calls[0][2:] == (2, "Generator")
  for e in ranked:
    other = 1 - e.class_id
    assert e.supports == tuple(int(r) for r in src.images_with_class(other)[:2])
    assert e.support_classes == (other, other)
    assert e.support_class(1) == other
  assert ep.episodes_sha256(ranked, src) != ep.episodes_sha256(base, src)


def test_ranked_manifest_round_trip_and_json(tmp_path):
  src = _source()
  ranked = ep.test_episodes("pascal5i", src, [0, 1], 8, 1, seed=2, policy="ranked",
                            ranker=FirstOfRelatedClass(src))
  path = str(tmp_path / "m.json")
  digest = ep.write_manifest(path, ranked, src)
  doc = json.load(open(path))
  assert doc["sha256"] == digest
  first = doc["episodes"][0]
  assert first["support_classes"] == [1 - first["class_id"]]
  assert ep.read_manifest(path)["episodes"] == ranked
  e = ranked[0]
  assert Episode.from_json(e.to_json()) == e and len(e.to_json()) == 4
  plain = Episode(0, 1, (2,))
  assert plain.to_json() == [0, 1, [2]] and Episode.from_json([0, 1, [2]]) == plain
  # A ranker that returns the episode's own class everywhere gives plain episodes.
  same = ep.test_episodes("pascal5i", src, [0, 1], 8, 1, seed=2, policy="ranked",
                          ranker=ranking.ClassPoolRanker(src))
  assert all(e.support_classes is None for e in same)
  assert all(src.image_key(e.query) != src.image_key(e.supports[0]) for e in same)


def test_pipeline_loads_each_support_mask_for_its_own_class():
  src = _source()
  episodes = [Episode(0, 0, (6, 1), (1, 2)), Episode(1, 7, (9, 10))]
  config = configlib.base_config()
  config.data.image_size = 16
  batch = next(iter(pipeline.eval_loader(config, src, episodes, normalization="imagenet",
                                         global_batch_size=2, shot=2, process_index=0,
                                         process_count=1, worker_count=0)))
  np.testing.assert_array_equal(batch["support_masks"][0, 0], src.load(6, 1)[1])
  np.testing.assert_array_equal(batch["support_masks"][0, 1], src.load(1, 2)[1])
  assert batch["support_masks"][0, 0][10:14].all() and batch["support_masks"][0, 1][6:8, 6:8].all()
  np.testing.assert_array_equal(batch["support_masks"][1, 0], src.load(9, 1)[1])
  assert batch["class_id"].tolist() == [0, 1]


def test_bad_ranker_answers_are_clear_errors():
  src = _source()

  class Fixed:
    def __init__(self, answer):
      self.answer = answer

    def supports(self, class_id, query, shot, rng):
      return self.answer(class_id, query)

  cases = [
      (lambda c, q: [], "returned 0 supports, expected 1"),
      (lambda c, q: [(q, c)], "is the query's own image"),
      (lambda c, q: [(99, c)], r"support record 99 outside \[0, 12\)"),
      (lambda c, q: [(6 if q < 6 else 0, 7)], r"support class 7 outside \[0, 3\)"),
      (lambda c, q: ["x"], "expected .record index, class id. pairs"),
  ]
  for answer, message in cases:
    with pytest.raises(DataError, match=message):
      ep.test_episodes("coco20i", src, [0, 1], 3, 1, seed=0, policy="ranked",
                       ranker=Fixed(answer))
  with pytest.raises(DataError, match="used twice"):
    ep.test_episodes("coco20i", src, [0, 1], 3, 2, seed=0, policy="ranked",
                     ranker=Fixed(lambda c, q: [(11, 1), (11, 1)] if q != 11 else [(0, 0)] * 2))
  with pytest.raises(ValueError, match="needs a ranker"):
    ep.test_episodes("coco20i", src, [0, 1], 3, 1, seed=0, policy="ranked")
  with pytest.raises(ValueError, match="Unknown support policy 'best'"):
    ep.test_episodes("coco20i", src, [0, 1], 3, 1, seed=0, policy="best")
