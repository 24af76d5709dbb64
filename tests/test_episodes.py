"""Episodic sampling: training episodes, the fixed test rules, manifests, InMemorySource."""

import json
import logging

import numpy as np
import pytest

from fssjax.data import episodes as ep
from fssjax.data.base import IGNORE, DataError, Episode, SegmentationSource
from fssjax.data.memory import InMemorySource

# images per class: class 5 has 1 image (never usable), class 4 has 3 (usable up to 2-shot).
_COUNTS = {0: 9, 1: 8, 2: 7, 3: 6, 4: 3, 5: 1}


def _make_source(size: int = 16) -> InMemorySource:
  """One image per (class, copy); each image holds its class and, for some, a second class."""
  rng = np.random.default_rng(1)
  images, labels = [], []
  for c, count in _COUNTS.items():
    for j in range(count):
      image = rng.integers(0, 256, (size, size + j % 3, 3), dtype=np.uint8)
      label = np.zeros(image.shape[:2], np.uint8)
      label[2:8, 2:8] = c + 1
      if c < 4 and j % 2 == 0:  # a second class in the same image
        label[10:14, 10:14] = (c + 1) % 4 + 1
      label[0, 0] = IGNORE
      images.append(image)
      labels.append(label)
  return InMemorySource(images, labels, [f"class{c}" for c in _COUNTS], name="toy")


@pytest.fixture(scope="module")
def source():
  return _make_source()


def test_in_memory_source_is_a_segmentation_source(source):
  assert isinstance(source, SegmentationSource)
  assert len(source) == sum(_COUNTS.values())
  for c in range(6):
    idx = source.images_with_class(c)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    for i in idx:
      image, mask = source.load(int(i), c)
      assert image.dtype == np.uint8 and image.shape[-1] == 3
      assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
      assert set(np.unique(mask)) <= {0, 1, IGNORE} and (mask == 1).any()
      assert mask[0, 0] == IGNORE
  # an image without the class gives an all-background mask (apart from ignore)
  absent = next(i for i in range(len(source)) if i not in set(source.images_with_class(5)))
  assert not (source.load(absent, 5)[1] == 1).any()
  assert source.record_key(3) == "toy/000003"


def test_in_memory_source_rejects_bad_labels():
  image = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(DataError, match=r"label map 1: values \[7\]"):
    InMemorySource([image, image], [np.zeros((4, 4), np.uint8), np.full((4, 4), 7, np.uint8)],
                   ["a", "b"])
  with pytest.raises(DataError, match="image 0: expected uint8"):
    InMemorySource([image.astype(np.float32)], [np.zeros((4, 4), np.uint8)], ["a"])
  with pytest.raises(DataError, match="label map 0: expected uint8 \\[H, W\\]"):
    InMemorySource([image], [np.zeros((4, 5, 2), np.uint8)], ["a"])


def test_in_memory_label_map_of_another_size_is_resized_nearest():
  """The rule of every source: a 13x14 label map of a 12x12 image is resized (nearest)."""
  image = np.zeros((12, 12, 3), np.uint8)
  label = np.zeros((13, 14), np.uint8)
  label[:, 7:] = 1  # right half
  src = InMemorySource([image], [label], ["a"])
  _, mask = src.load(0, 0)
  assert mask.shape == (12, 12) and src.resized_masks == 1
  # PyTorch 'nearest': column x reads floor(x * 14 / 12); columns 6.. read 7.. -> foreground
  assert mask[0].tolist() == [0] * 6 + [1] * 6


def test_classes_with_too_few_images_are_left_out_and_logged(source, caplog):
  with caplog.at_level(logging.WARNING):
    sampler = ep.EpisodeSampler(source, range(6), max_shot=3, min_shot=1)
  assert sampler.left_out_classes(1) == (5,)
  assert sampler.left_out_classes(2) == (5,)
  assert sampler.left_out_classes(3) == (4, 5)
  text = caplog.text
  assert "1-shot: 1 of 6 classes left out" in text and "3-shot: 2 of 6 classes left out" in text
  assert "['class4', 'class5']" in text
  rng = np.random.default_rng(0)
  drawn = {sampler.episode(rng, 3).class_id for _ in range(300)}
  assert drawn == {0, 1, 2, 3}
  drawn = {sampler.episode(rng, 2).class_id for _ in range(300)}
  assert drawn == {0, 1, 2, 3, 4}


def test_no_usable_class_is_an_error(source):
  with pytest.raises(DataError, match="none of the 2 classes has 4 images"):
    ep.EpisodeSampler(source, [4, 5], max_shot=3)


def test_train_episode_supports_distinct_and_not_query(source):
  rng = np.random.default_rng(3)
  for shot in (1, 2, 5):
    for _ in range(200):
      e = ep.train_episode(source, [0, 1, 2, 3, 4], shot, rng)
      members = set(source.images_with_class(e.class_id).tolist())
      assert len(e.supports) == shot and len(set(e.supports)) == shot
      assert e.query not in e.supports
      assert e.query in members and set(e.supports) <= members


def test_train_stream_depends_only_on_seed_step_slot(source):
  sampler = ep.EpisodeSampler(source, range(5), max_shot=2, min_shot=1)
  a = ep.train_step_episodes(sampler, seed=7, step=11, slots=range(8), shot=2)
  b = ep.train_step_episodes(sampler, seed=7, step=11, slots=range(4, 8), shot=2)
  assert a[4:] == b
  c = ep.train_step_episodes(sampler, seed=7, step=12, slots=range(8), shot=2)
  assert a != c
  shots = [ep.step_shot(7, s, shot=1, shot_max=4) for s in range(200)]
  assert set(shots) == {1, 2, 3, 4}
  assert shots == [ep.step_shot(7, s, shot=1, shot_max=4) for s in range(200)]
  assert {ep.step_shot(7, s, shot=3) for s in range(20)} == {3}


@pytest.mark.parametrize("benchmark", ["coco20i", "pascal5i", "fss1000", "lvis92i"])
def test_test_episodes_are_deterministic(source, benchmark):
  classes = [0, 1, 2, 3]
  a = ep.test_episodes(benchmark, source, classes, 50, 2, seed=0)
  b = ep.test_episodes(benchmark, source, classes, 50, 2, seed=0)
  c = ep.test_episodes(benchmark, source, classes, 50, 2, seed=1)
  assert a == b and len(a) == 50
  assert a != c
  assert ep.test_episodes(benchmark, source, classes, 20, 2, seed=0) == a[:20]
  for e in a:
    members = set(source.images_with_class(e.class_id).tolist())
    assert e.class_id in classes and e.query in members and set(e.supports) <= members
    assert len(set(e.supports)) == 2 and e.query not in e.supports


def test_coco_rule_covers_classes_uniformly(source):
  eps = ep.test_episodes("coco20i", source, [0, 1, 2, 3], 2000, 1, seed=0)
  counts = np.bincount([e.class_id for e in eps], minlength=4)
  assert counts.min() > 400  # uniform over classes (expected 500 each)
  assert ep.test_episodes("synthetic", source, [0, 1, 2, 3], 30, 1, 0) == eps[:30]
  assert len(ep.test_episodes("coco20i", source, [0, 1], None, 1, 0)) == 1000


def test_pascal_rule_cycles_the_query_class_pairs(source):
  classes = [0, 1, 2, 3, 4]
  pairs = sorted((int(q), c) for c in classes for q in source.images_with_class(c))
  n_pairs = len(pairs)
  eps = ep.test_episodes("pascal5i", source, classes, 2 * n_pairs + 5, 1, seed=0)
  assert [(e.query, e.class_id) for e in eps] == (pairs * 3)[:2 * n_pairs + 5]
  # supports are random: the second pass over the pairs draws different ones somewhere
  assert [e.supports for e in eps[:n_pairs]] != [e.supports for e in eps[n_pairs:2 * n_pairs]]


def test_fss1000_rule_uses_every_test_image_once(source):
  classes = [0, 1, 2, 3]
  eps = ep.test_episodes("fss1000", source, classes, None, 5, seed=0)
  expected = sorted((int(q), c) for c in classes for q in source.images_with_class(c))
  assert len(eps) == len(expected)
  assert sorted((e.query, e.class_id) for e in eps) == expected


def test_lvis_rule_cycles_classes(source):
  eps = ep.test_episodes("lvis92i", source, [0, 2, 3, 5], None, 1, seed=0)
  assert len(eps) == 2300
  # class 5 has a single image: it cannot form a 1-shot episode and is left out
  assert [e.class_id for e in eps[:7]] == [0, 2, 3, 0, 2, 3, 0]


def test_unknown_benchmark(source):
  with pytest.raises(ValueError, match="Unknown benchmark 'voc'"):
    ep.test_episodes("voc", source, [0], 1, 1, 0)


def test_manifest_hash_and_round_trip(source, tmp_path):
  eps = ep.test_episodes("coco20i", source, [0, 1, 2, 3], 40, 2, seed=0)
  path = str(tmp_path / "m.json")
  digest = ep.write_manifest(path, eps, source, dict(fold=0))
  assert len(digest) == 64 and digest == ep.episodes_sha256(eps, source)
  doc = json.load(open(path))
  assert doc["sha256"] == digest and doc["num_episodes"] == 40 and doc["meta"] == {"fold": 0}
  first = doc["episodes"][0]
  assert first["class_name"] == source.class_names[eps[0].class_id]
  assert first["query"] == source.record_key(eps[0].query)
  assert first["supports"] == [source.record_key(s) for s in eps[0].supports]
  assert ep.read_manifest(path)["episodes"] == eps
  # the hash is over the episodes only, and changes when any episode changes
  assert ep.write_manifest(str(tmp_path / "n.json"), eps, source, dict(other=1)) == digest
  changed = list(eps)
  changed[5] = Episode(eps[5].class_id, eps[5].query, eps[5].supports[::-1])
  assert ep.episodes_sha256(changed, source) != digest


# ---------------------------------------------------------------------------- integration


def test_cli_manifest_matches_in_process_list(tmp_path, monkeypatch):
  """`python -m fssjax.data.episodes` on a generated COCO-format set gives the same hash."""
  import os
  import subprocess
  import sys

  from fssjax import configlib
  from fssjax.data import sources, synthetic

  root = str(tmp_path / "synth")
  synthetic.generate(root, train=20, val=60, size=64, seed=3, workers=1)
  monkeypatch.setenv("FSSJAX_CACHE_DIR", str(tmp_path / "cache"))
  config_file = tmp_path / "cfg.py"
  config_file.write_text(
      "from fssjax import configlib\n\n\n"
      "def get_config(arg=None):\n"
      "  c = configlib.base_config()\n"
      f"  c.data.update(dict(dataset='synthetic', root={root!r}, fold=0, shot=1,\n"
      "                     test_episodes=25, test_seed=int(arg or 0)))\n"
      "  return c\n")
  out = tmp_path / "manifest.json"
  proc = subprocess.run(
      [sys.executable, "-m", "fssjax.data.episodes", f"--config={config_file}:5",
       f"--out={out}"], capture_output=True, text=True, timeout=300, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])

  config = configlib.base_config()
  config.data.update(dict(dataset="synthetic", root=root, fold=0, shot=1, test_episodes=25,
                          test_seed=5))
  eps, source, meta = ep.episodes_from_config(config)
  assert len(eps) == 25 and meta["benchmark"] == "synthetic"
  test_classes = set(sources.fold_classes_for(config.data, "test"))
  assert {e.class_id for e in eps} <= test_classes
  digest = ep.episodes_sha256(eps, source)
  assert printed["sha256"] == digest == json.load(open(out))["sha256"]
  assert json.load(open(out))["episodes"][0]["query"] == source.record_key(eps[0].query)


# ---------------------------------------------------------------------------- pinned episodes

# sha256 of today's episode lists, computed before the support-policy hook was added: the
# 'random' policy must keep them bit for bit (`episodes_sha256` is the manifest's hash).
PINNED_SYNTHETIC = {1: "2f8d25d202a4911726f547813298672e17f050944e6da7273ec7f0b1c724d95d",
                    5: "d6aea4e6e4cd654d022d95a3f550629de8682fb58dc7ae06eb0f6346043dfcd2"}
PINNED_TOY = {"coco20i": "473c3e1b13f8b49656d58c485c274ba305e32f3f596df8fc0414d5d81412e89a",
              "pascal5i": "39ece36a977ddc017137ac5781c1a6ca1b6f22561499cda8d4ea72035dc117f6",
              "fss1000": "0d013c4255d15453789524700950033f772095f0770f9114c31df84129ad26bb",
              "lvis92i": "7ba81e1282dc4080cfeabadbbda795711ccaafdaa62cdec4cf2b62a95df813b9"}


def test_synthetic_fold0_manifest_hash_is_pinned(tmp_path):
  from fssjax.data import coco, folds, synthetic

  root = str(tmp_path / "synth")
  synthetic.generate(root, train=1, val=240, size=64, seed=3, workers=1)
  src = coco.synthetic(root, "test", cache_dir=str(tmp_path / "cache"))
  classes = folds.fold_classes("synthetic", 0, "test")
  for shot, digest in PINNED_SYNTHETIC.items():
    eps = ep.test_episodes("synthetic", src, classes, 50, shot, seed=0)
    assert ep.write_manifest(str(tmp_path / f"m{shot}.json"), eps, src, {}) == digest
    assert eps == ep.test_episodes("synthetic", src, classes, 50, shot, seed=0,
                                   policy="random")
    assert all(e.support_classes is None for e in eps)
    assert "support_classes" not in json.load(open(tmp_path / f"m{shot}.json"))["episodes"][0]


@pytest.mark.parametrize("benchmark", sorted(PINNED_TOY))
def test_every_rule_keeps_its_pinned_episodes(source, benchmark):
  eps = ep.test_episodes(benchmark, source, [0, 1, 2, 3], 60, 2, seed=0)
  assert ep.episodes_sha256(eps, source) == PINNED_TOY[benchmark]


def test_a_query_is_never_its_own_support_in_memory():
  """A data set listing one image twice: that image never supports itself."""
  rng = np.random.default_rng(0)
  base = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
  label = np.ones((8, 8), np.uint8)
  images = [base[0], base[1], base[0].copy(), base[2]]  # records 0 and 2: one image
  src = InMemorySource(images, [label] * 4, ["a"], name="dup")
  assert src.image_key(0) == src.image_key(2) != src.image_key(1)
  for benchmark in ("coco20i", "pascal5i", "fss1000", "lvis92i"):
    for e in ep.test_episodes(benchmark, src, [0], 200, 1, seed=0):
      assert {e.query, e.supports[0]} != {0, 2}, (benchmark, e)
    eps = ep.test_episodes(benchmark, src, [0], 200, 2, seed=0)
    for e in eps:
      keys = [src.image_key(r) for r in (e.query,) + e.supports]
      assert len(set(keys)) == 3, (benchmark, e)  # query and supports: distinct images
  # Three distinct images: 3-shot is impossible although the class lists four records.
  with pytest.raises(DataError, match="none of the 1 classes has 4 images"):
    ep.test_episodes("coco20i", src, [0], 5, 3, seed=0)
  sampler = ep.EpisodeSampler(src, [0], max_shot=2)
  rng = np.random.default_rng(1)
  for _ in range(200):
    e = sampler.episode(rng, 2)
    assert len({src.image_key(r) for r in (e.query,) + e.supports}) == 3
