"""Transforms and the grain pipelines: determinism, workers, checkpointing, sharding, eval."""

import grain
import numpy as np
import pytest
from etils import epath

from fssjax import configlib
from fssjax.data import episodes as ep
from fssjax.data import pipeline
from fssjax.data import transforms as T
from fssjax.data.base import IGNORE, DataError
from fssjax.data.memory import InMemorySource

SIZE = 32
KEYS = ("query_image", "query_mask", "support_images", "support_masks", "class_id")


def _make_source() -> InMemorySource:
  rng = np.random.default_rng(0)
  images, labels = [], []
  for i in range(24):
    h, w = 20 + i % 5, 28 - i % 4
    images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    label = np.zeros((h, w), np.uint8)
    label[2:10, 3:12] = 1 + i % 4
    label[12:18, 5:20] = 1 + (i + 1) % 4
    label[-1, :] = IGNORE
    labels.append(label)
  return InMemorySource(images, labels, ["a", "b", "c", "d"], name="toy")


@pytest.fixture(scope="module")
def source():
  return _make_source()


def _config(**data):
  c = configlib.base_config()
  c.data.image_size = SIZE
  c.train.num_steps = 100
  c.data.update(data)
  return c


def _loader(source, config=None, **kw):
  args = dict(normalization="imagenet", seed=3, global_batch_size=4, process_index=0,
              process_count=1, worker_count=0)
  args.update(kw)
  return pipeline.train_loader(config or _config(), source, [0, 1, 2, 3], **args)


def _assert_same(a, b):
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------- transforms


def _nearest_reference(mask, oh, ow):
  """Straightforward PyTorch 'nearest' rule: src = min(floor(dst * in / out), in - 1)."""
  h, w = mask.shape
  out = np.zeros((oh, ow), mask.dtype)
  for y in range(oh):
    for x in range(ow):
      out[y, x] = mask[min(int(np.floor(y * h / oh)), h - 1), min(int(np.floor(x * w / ow)), w - 1)]
  return out


def test_nearest_mask_resize_keeps_label_values():
  rng = np.random.default_rng(0)
  mask = rng.choice(np.array([0, 1, IGNORE], np.uint8), size=(37, 23))
  for oh, ow in [(32, 32), (50, 17), (37, 23), (11, 64)]:
    out = T.resize_nearest(mask, oh, ow)
    np.testing.assert_array_equal(out, _nearest_reference(mask, oh, ow))
    assert set(np.unique(out)) <= {0, 1, IGNORE}
  image = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
  _, m, _ = T.resize_pair(image, mask, 32, "square")
  assert m.shape == (32, 32) and set(np.unique(m)) <= {0, 1, IGNORE}


def test_normalization_values():
  px = np.array([[[0, 128, 255]]], np.uint8)
  np.testing.assert_allclose(
      T.normalize(px, "imagenet")[0, 0],
      (np.array([0, 128, 255]) / 255 - np.array([0.485, 0.456, 0.406])) /
      np.array([0.229, 0.224, 0.225]), rtol=1e-6)
  np.testing.assert_allclose(T.normalize(px, "minus_one_one")[0, 0], [-1, 128 / 127.5 - 1, 1],
                             atol=1e-6)
  with pytest.raises(ValueError, match="normalization='zero_one'"):
    T.normalize(px, "zero_one")


def test_pad_mode_marks_padding_ignore_and_zero():
  image = np.full((40, 20, 3), 200, np.uint8)
  mask = np.ones((40, 20), np.uint8)
  spec = T.TransformSpec(image_size=32, resize="pad", normalization="imagenet")
  out, m = T.prepare(image, mask, spec)
  assert out.shape == (32, 32, 3) and out.dtype == np.float32 and m.shape == (32, 32)
  assert np.all(m[:, 16:] == IGNORE) and np.all(m[:, :16] == 1)
  assert np.all(out[:, 16:] == 0.0)
  np.testing.assert_allclose(out[:, :16], T.normalize(np.full((32, 16, 3), 200, np.uint8),
                                                      "imagenet"), rtol=1e-6)
  out, m = T.prepare(image, mask, T.TransformSpec(image_size=32, resize="square"))
  assert np.all(m == 1)


def test_augmentation_is_deterministic_and_keeps_labels():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
  mask = np.zeros((30, 30), np.uint8)
  mask[:, :10] = 1
  mask[0] = IGNORE
  spec = T.TransformSpec(image_size=32, augment=True)
  a = T.prepare(image, mask, spec, np.random.default_rng(5))
  b = T.prepare(image, mask, spec, np.random.default_rng(5))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  flipped = 0
  for seed in range(20):
    _, m = T.prepare(image, mask, spec, np.random.default_rng(seed))
    assert set(np.unique(m)) <= {0, 1, IGNORE}
    flipped += int(m[16, -1] == 1)  # the foreground band moved to the right edge
  assert 0 < flipped < 20


def test_pad_original_mask():
  mask = np.ones((5, 7), np.uint8)
  out, size = T.pad_original_mask(mask, 8)
  assert out.shape == (8, 8) and size.tolist() == [5, 7] and size.dtype == np.int32
  assert np.all(out[:5, :7] == 1) and np.all(out[5:] == IGNORE) and np.all(out[:, 7:] == IGNORE)
  with pytest.raises(DataError, match="max_original_size=6"):
    T.pad_original_mask(mask, 6)


# ---------------------------------------------------------------------------- training


def test_train_batch_shapes_and_values(source):
  batch = next(iter(_loader(source)))
  assert batch["query_image"].shape == (4, SIZE, SIZE, 3)
  assert batch["query_image"].dtype == np.float32
  assert batch["query_mask"].shape == (4, SIZE, SIZE) and batch["query_mask"].dtype == np.uint8
  assert batch["support_images"].shape == (4, 1, SIZE, SIZE, 3)
  assert batch["support_masks"].shape == (4, 1, SIZE, SIZE)
  assert batch["class_id"].dtype == np.int32 and set(batch["class_id"]) <= {0, 1, 2, 3}
  for i in range(4):
    for m in (batch["query_mask"][i], batch["support_masks"][i, 0]):
      assert (m == 1).any() and set(np.unique(m)) <= {0, 1, IGNORE}


def test_workers_restore_and_worker_independence(source, tmp_path):
  """2 workers == 0 workers; a restored iterator (any worker count) continues exactly."""
  ref = _loader(source, worker_count=0)
  ref_it = iter(ref)
  expected = [next(ref_it) for _ in range(5)]

  it = iter(_loader(source, worker_count=2))
  try:
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    got += [next(it) for _ in range(2)]
  finally:
    it.close()
  for a, b in zip(expected, got):
    _assert_same(a, b)
  # evaluation batches are the same with workers too
  eps = ep.test_episodes("coco20i", source, [0, 1, 2, 3], 7, 1, seed=0)
  kw = dict(normalization="imagenet", global_batch_size=4, shot=1, process_index=0,
            process_count=1)
  eval_ref = list(pipeline.eval_loader(_config(), source, eps, worker_count=0, **kw))
  eval_mp = list(pipeline.eval_loader(_config(), source, eps, worker_count=2, **kw))
  assert len(eval_mp) == len(eval_ref) == 2
  for a, b in zip(eval_ref, eval_mp):
    _assert_same(a, b)

  restored = iter(_loader(source, worker_count=0))
  restored.set_state(state)
  for want in expected[3:]:
    _assert_same(want, next(restored))

  # grain's orbax handler (one JSON file per process) round-trips the state too
  handler = grain.checkpoint.CheckpointHandler()
  it0 = iter(_loader(source))
  for _ in range(3):
    next(it0)
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it0))
  again = iter(_loader(source))
  handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(again))
  assert again.next_step == 3
  _assert_same(expected[3], next(again))


def test_start_step_and_state_validation(source):
  it = iter(_loader(source, start_step=4))
  ref = _loader(source)
  _assert_same(next(it), ref.batch_at(4))
  state = it.get_state()
  other = iter(_loader(source, seed=4))
  with pytest.raises(ValueError, match="seed=3 but this loader has seed=4"):
    other.set_state(state)
  # the stream changes with the seed
  assert not np.array_equal(ref.batch_at(0)["query_image"], _loader(source, seed=4).batch_at(0)[
      "query_image"])


def test_process_sharding(source):
  full = _loader(source, global_batch_size=4).batch_at(7)
  halves = [_loader(source, global_batch_size=4, process_index=p, process_count=2).batch_at(7)
            for p in (0, 1)]
  for k in KEYS:
    assert halves[0][k].shape[0] == 2
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[k], err_msg=k)
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    _loader(source, global_batch_size=4, process_index=0, process_count=3)


def test_random_shots_per_step(source):
  loader = _loader(source, config=_config(train_shot_max=3))
  shots = []
  for step in range(12):
    batch = loader.batch_at(step)
    k = batch["support_images"].shape[1]
    assert batch["support_masks"].shape[:2] == (4, k)
    assert k == ep.step_shot(3, step, 1, 3)
    shots.append(k)
  assert set(shots) <= {1, 2, 3} and len(set(shots)) > 1


def test_augmented_stream_is_deterministic(source):
  config = _config(augment=True)
  a = _loader(source, config=config).batch_at(2)
  b = _loader(source, config=config).batch_at(2)
  _assert_same(a, b)
  plain = _loader(source).batch_at(2)
  np.testing.assert_array_equal(a["class_id"], plain["class_id"])  # same episodes
  assert not np.array_equal(a["query_image"], plain["query_image"])


# ---------------------------------------------------------------------------- evaluation


def test_eval_loader_order_padding_and_original_masks(source):
  eps = ep.test_episodes("coco20i", source, [0, 1, 2, 3], 7, 2, seed=0)
  config = _config(eval_resolution="original", max_original_size=32)
  kw = dict(normalization="imagenet", global_batch_size=4, shot=2, worker_count=0)
  full = list(pipeline.eval_loader(config, source, eps, process_index=0, process_count=1, **kw))
  assert len(full) == 2
  valid = np.concatenate([b["valid"] for b in full])
  index = np.concatenate([b["episode_index"] for b in full])
  assert valid.tolist() == [True] * 7 + [False]
  assert index.tolist() == list(range(7)) + [-1]
  last = full[1]
  assert np.all(last["query_mask"][3] == IGNORE) and np.all(last["query_image"][3] == 0)
  for b in full:
    for i in np.flatnonzero(b["valid"]):
      e = eps[b["episode_index"][i]]
      assert b["class_id"][i] == e.class_id
      _, mask = source.load(e.query, e.class_id)
      h, w = mask.shape
      assert b["query_size"][i].tolist() == [h, w]
      np.testing.assert_array_equal(b["query_mask_orig"][i, :h, :w], mask)
      assert np.all(b["query_mask_orig"][i, h:] == IGNORE)
      assert np.all(b["query_mask_orig"][i, :, w:] == IGNORE)
  # two processes: each gets its half of every global batch
  parts = [list(pipeline.eval_loader(config, source, eps, process_index=p, process_count=2, **kw))
           for p in (0, 1)]
  for g in range(2):
    for k in full[g]:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][g][k], parts[1][g][k]]), full[g][k], err_msg=k)
  # the network-resolution batch has no original-resolution keys
  plain = next(iter(pipeline.eval_loader(_config(), source, eps, process_index=0,
                                         process_count=1, **kw)))
  assert "query_mask_orig" not in plain and "query_size" not in plain
  with pytest.raises(ValueError, match="has 2 supports, expected shot=1"):
    pipeline.eval_loader(config, source, eps, **{**kw, "shot": 1}, process_index=0,
                         process_count=1)


# ---------------------------------------------------------------------------- integration


def test_loaders_read_a_generated_coco_format_set(tmp_path):
  """Train and eval batches from the synthetic benchmark's COCO files (CocoSource)."""
  from fssjax.data import sources, synthetic

  root = str(tmp_path / "synth")
  synthetic.generate(root, train=60, val=60, size=64, seed=3, workers=1)
  config = _config(dataset="synthetic", root=root, eval_resolution="original",
                   max_original_size=64, resize="pad")
  cache = str(tmp_path / "cache")
  test_src = sources.build_source(config.data, "test", cache_dir=cache)
  test_classes = sources.fold_classes_for(config.data, "test", source=test_src)
  eps = ep.test_episodes("synthetic", test_src, test_classes, 6, 1, seed=0)
  batches = list(pipeline.eval_loader(config, test_src, eps, normalization="minus_one_one",
                                      global_batch_size=4, shot=1, process_index=0,
                                      process_count=1, worker_count=0))
  assert len(batches) == 2
  for b in batches:
    assert b["query_image"].shape == (4, SIZE, SIZE, 3)
    for i in np.flatnonzero(b["valid"]):
      e = eps[b["episode_index"][i]]
      image, mask = test_src.load(e.query, e.class_id)
      np.testing.assert_array_equal(b["query_mask_orig"][i], mask)  # 64x64 fills the canvas
      np.testing.assert_allclose(b["query_image"][i],
                                 T.normalize(T.resize_image(image, SIZE, SIZE), "minus_one_one"))
      assert (b["query_mask"][i] == 1).any() and (b["support_masks"][i, 0] == 1).any()
  train_src = sources.build_source(config.data, "train", cache_dir=cache)
  train_classes = sources.fold_classes_for(config.data, "train", source=train_src)
  loader = pipeline.train_loader(config, train_src, train_classes, normalization="imagenet",
                                 seed=0, global_batch_size=2, process_index=0, process_count=1)
  batch = next(iter(loader))
  assert set(batch["class_id"]) <= set(train_classes)
  assert all((batch["query_mask"][i] == 1).any() for i in range(2))


# ---------------------------------------------------------------------------- empty supports


def _tiny_object_source() -> InMemorySource:
  """64x64 images of class 'a': records 0..5 hold a 2x2 object at rows / cols 1..2 (empty at
  16x16 with HSNet's aligned-corner bilinear resize), records 6..11 a 12x12 object."""
  rng = np.random.default_rng(5)
  images, labels = [], []
  for i in range(12):
    images.append(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    label = np.zeros((64, 64), np.uint8)
    if i < 6:
      label[1:3, 1:3] = 1
    else:
      label[20:32, 20:32] = 1
    labels.append(label)
  return InMemorySource(images, labels, ["a"], name="tiny")


def test_support_is_empty_follows_the_methods_mask_resize():
  import jax.numpy as jnp
  from fssjax.nn.ops import resize_bilinear

  for r0, size, expected in ((1, 16, True), (4, 16, False), (1, 64, False), (1, 0, False)):
    mask = np.zeros((64, 64), np.uint8)
    mask[r0:r0 + 2, r0:r0 + 2] = 1
    mask[40, 40] = IGNORE  # ignore is background for the check
    assert T.support_is_empty(mask, size) == expected, (r0, size)
    if size:
      fg = jnp.asarray((mask == 1).astype(np.float32))[None, :, :, None]
      ref = resize_bilinear(fg, (size, size), axes=(1, 2), align_corners=True)
      assert bool((np.asarray(ref) > 0).any()) != expected
  assert T.support_is_empty(np.zeros((8, 8), np.uint8), 4)


def test_training_redraws_empty_supports_and_evaluation_counts_them():
  src = _tiny_object_source()
  config = _config(support_check_size=16)
  config.data.image_size = 64
  checked = pipeline.train_loader(config, src, [0], normalization="imagenet", seed=1,
                                  global_batch_size=8, process_index=0, process_count=1,
                                  worker_count=0)
  plain_config = _config()
  plain_config.data.image_size = 64
  plain = pipeline.train_loader(plain_config, src, [0], normalization="imagenet", seed=1,
                                global_batch_size=8, process_index=0, process_count=1,
                                worker_count=0)
  redrawn = 0
  for step in range(3):
    a, b = checked.batch_at(step), plain.batch_at(step)
    assert "support_empty" not in b and a["support_empty"].shape == (8, 1)
    assert not a["support_empty"].any()
    for i in range(8):
      assert not T.support_is_empty(a["support_masks"][i, 0], 16)
      np.testing.assert_array_equal(a["query_image"][i], b["query_image"][i])  # same query
      if T.support_is_empty(b["support_masks"][i, 0], 16):
        redrawn += 1
    _assert_same(a, checked.batch_at(step))  # deterministic
  assert redrawn > 3  # half the images are tiny: many supports were redrawn

  eps = [ep.Episode(0, 6, (0,)), ep.Episode(0, 7, (8,)), ep.Episode(0, 0, (1,))]
  batch = next(iter(pipeline.eval_loader(config, src, eps, normalization="imagenet",
                                         global_batch_size=4, shot=1, process_index=0,
                                         process_count=1, worker_count=0)))
  assert batch["support_empty"][:, 0].tolist() == [True, False, True, False]
  with pytest.raises(ValueError, match="support_check_size must be >= 0"):
    pipeline.eval_loader(_config(support_check_size=-1), src, eps, normalization="imagenet",
                         global_batch_size=4, shot=1, process_index=0, process_count=1)
