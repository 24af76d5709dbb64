"""Extra image views and text fields built by the data pipeline (fssjax.data.views)."""

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from fssjax import configlib
from fssjax.data import episodes as ep
from fssjax.data import pipeline
from fssjax.data import transforms as T
from fssjax.data import views as V
from fssjax.data.base import DataError
from fssjax.data.memory import InMemorySource

SIZE = 16


def _source() -> InMemorySource:
  rng = np.random.default_rng(2)
  images, labels = [], []
  for i in range(12):
    h, w = 20 + 3 * (i % 3), 30 - 2 * (i % 4)  # landscape and portrait-ish shapes
    images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    label = np.zeros((h, w), np.uint8)
    label[2:12, 3:14] = 1 + i % 2
    label[14:19, 2:9] = 1 + (i + 1) % 2
    labels.append(label)
  return InMemorySource(images, labels, ["red car", "blue bird"], name="views")


def _config(**data):
  c = configlib.base_config()
  c.data.image_size = SIZE
  c.train.num_steps = 10
  c.data.update(data)
  return c


def _tokenizer() -> Tokenizer:
  vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "photo": 3, "of": 4, "red": 5, "car": 6, "blue": 7,
           "bird": 8, ".": 9}
  tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = Whitespace()
  return tok


SAM = V.ViewSpec("sam", 40, resize="longest_side", normalization="sam")
CLIP = V.ViewSpec("clip", 24, normalization="clip", interpolation="bicubic")


def test_sam_longest_side_view_matches_the_published_preprocessing():
  """SAM's ResizeLongestSide + normalise + pad: 30x20 -> 40x27 inside a 40x40 canvas."""
  image = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
  assert V.longest_side_shape(30, 20, 40) == (40, 27)  # int(20 * 40 / 30 + 0.5) = 27
  assert V.longest_side_shape(480, 640, 1024) == (768, 1024)
  out = np.full((40, 40, 3), np.nan, np.float32)
  assert V.make_view(image, SAM, out) == (40, 27)
  resized = np.asarray(Image.fromarray(image).resize((27, 40), Image.BILINEAR), np.float32)
  sam = (resized - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
  np.testing.assert_allclose(out[:, :27], sam, rtol=1e-5, atol=1e-5)
  assert np.all(out[:, 27:] == 0.0)  # SAM pads the normalised image with 0
  padded = V.ViewSpec("p", 40, resize="longest_side", normalization="none", pad_value=-1.0)
  V.make_view(image, padded, out)
  assert np.all(out[:, 27:] == -1.0) and out[:, :27].max() <= 255 and out[:, :27].min() >= 0


def test_normalizations():
  px = np.array([[[0, 128, 255]]], np.uint8)
  clip = (np.array([0, 128, 255]) / 255 - np.array([0.48145466, 0.4578275, 0.40821073])) / \
      np.array([0.26862954, 0.26130258, 0.27577711])
  np.testing.assert_allclose(T.normalize(px, "clip")[0, 0], clip, rtol=1e-6)
  np.testing.assert_array_equal(T.normalize(px, "none")[0, 0], [0, 128, 255])
  with pytest.raises(ValueError, match="normalization='clipp'"):
    V.ViewSpec("x", 8, normalization="clipp")
  with pytest.raises(ValueError, match="resize='crop'"):
    V.ViewSpec("x", 8, resize="crop")
  with pytest.raises(ValueError, match="without '@'"):
    V.ViewSpec("a@b", 8)
  with pytest.raises(ValueError, match=r"view names used twice: \['sam'\]"):
    V.check_specs([SAM, SAM], [])


def test_default_batch_is_unchanged_and_views_and_texts_are_added():
  src = _source()
  tok = _tokenizer()
  texts = [V.TextSpec("name", tokenizer=tok, max_length=4),
           V.TextSpec("prompt", field="template", template="a photo of a {class} .",
                      tokenizer=tok, max_length=8)]
  kw = dict(normalization="imagenet", seed=0, global_batch_size=4, process_index=0,
            process_count=1, worker_count=0)
  plain = pipeline.train_loader(_config(), src, [0, 1], **kw).batch_at(3)
  extra = pipeline.train_loader(_config(), src, [0, 1], views=[SAM, CLIP], texts=texts,
                                **kw).batch_at(3)
  assert set(plain) == set(pipeline._empty_batch(1, 1, SIZE))
  for k in plain:  # the default keys are bit for bit those without views
    np.testing.assert_array_equal(plain[k], extra[k], err_msg=k)
  assert extra["query_image@sam"].shape == (4, 40, 40, 3)
  assert extra["support_images@sam"].shape == (4, 1, 40, 40, 3)
  assert extra["query_image@clip"].dtype == np.float32
  assert extra["query_size@sam"].dtype == np.int32 and extra["support_size@sam"].shape == (4, 1, 2)
  assert (extra["query_size@clip"] == 24).all()
  assert extra["text@name"].dtype == np.int32 and extra["text_mask@name"].dtype == np.uint8
  ids = {0: [5, 6, 0, 0], 1: [7, 8, 0, 0]}  # "red car", "blue bird", padded with [PAD]=0
  prompt = {0: [2, 3, 4, 2, 5, 6, 9, 0], 1: [2, 3, 4, 2, 7, 8, 9, 0]}
  for i, c in enumerate(extra["class_id"]):
    assert extra["text@name"][i].tolist() == ids[int(c)]
    assert extra["text_mask@name"][i].tolist() == [1, 1, 0, 0]
    assert extra["text@prompt"][i].tolist() == prompt[int(c)]
  # Each view is made from the source image, not from the scored view.
  eps = [ep.Episode(0, 0, (2,)), ep.Episode(1, 1, (3,))]
  batch = next(iter(pipeline.eval_loader(_config(), src, eps, views=[SAM], texts=texts[:1],
                                         normalization="imagenet", global_batch_size=2,
                                         shot=1, process_index=0, process_count=1,
                                         worker_count=0)))
  for i, e in enumerate(eps):
    image, _ = src.load(e.query, e.class_id)
    want = np.zeros((40, 40, 3), np.float32)
    size = V.make_view(image, SAM, want)
    np.testing.assert_array_equal(batch["query_image@sam"][i], want)
    assert batch["query_size@sam"][i].tolist() == list(size)
    assert batch["text@name"][i].tolist() == ids[e.class_id]


def _smooth_source() -> InMemorySource:
  """Smooth images (colour ramps), so that a sub-pixel shift changes pixels only a little."""
  images, labels = [], []
  for i in range(8):
    h, w = 24 + 4 * (i % 2), 32 - 4 * (i % 3)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy + 40 * i) % 256], -1)
    images.append(ramp.astype(np.uint8))
    label = np.zeros((h, w), np.uint8)
    label[4:16, 4:20] = 1 + i % 2
    labels.append(label)
  return InMemorySource(images, labels, ["a", "b"], name="smooth")


def test_views_follow_the_augmentation_and_any_worker_count():
  src = _smooth_source()
  cfg = _config(augment=True)
  square = V.ViewSpec("sq", SIZE, normalization="imagenet")
  kw = dict(normalization="imagenet", seed=4, global_batch_size=4, process_index=0,
            process_count=1, views=[square])
  batch = pipeline.train_loader(cfg, src, [0, 1], worker_count=0, **kw).batch_at(2)
  # A view of the scored view's size and settings shows the same flip and crop: it differs
  # from the scored view only by the rounding of the crop window to whole source pixels.
  diff = np.abs(batch["query_image@sq"] - batch["query_image"]).mean()
  unaugmented = pipeline.train_loader(_config(), src, [0, 1], worker_count=0, **kw).batch_at(2)
  far = np.abs(unaugmented["query_image@sq"] - batch["query_image"]).mean()
  assert diff < 0.06 and diff < 0.2 * far  # measured: 0.025 against 0.6
  assert np.abs(batch["support_images@sq"] - batch["support_images"]).mean() < 0.06
  it = iter(pipeline.train_loader(cfg, src, [0, 1], worker_count=2, **kw))
  try:
    for step in range(3):
      got = next(it)
      want = pipeline.train_loader(cfg, src, [0, 1], worker_count=0, **kw).batch_at(step)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  finally:
    it.close()


def test_class_descriptions_of_the_synthetic_benchmark(tmp_path):
  from fssjax.data import coco, synthetic

  root = str(tmp_path / "synth")
  synthetic.generate(root, train=1, val=4, size=32, seed=0, workers=1)
  src = coco.synthetic(root, "test", cache_dir=str(tmp_path / "cache"))
  c = int(next(c for c in range(80) if len(src.images_with_class(c))))
  spec = V.TextSpec("desc", field="class_description", tokenizer=_tokenizer())
  text = V.class_text(src, c, spec)
  assert text == synthetic.describe(synthetic.categories()[c])["description"]
  assert text.startswith(f"A {src.class_names[c]} is ")
  ids, mask = V.text_tables(src, [c], [spec])["desc"]
  assert ids.shape == (80, 64) and mask[c].sum() == min(64, len(_tokenizer().encode(text).ids))
  with pytest.raises(DataError, match="has no description of class 0 .'red car'."):
    V.class_text(_source(), 0, spec)
  with pytest.raises(ValueError, match="needs a template containing"):
    V.TextSpec("t", field="template", template="no placeholder", tokenizer=_tokenizer())
  with pytest.raises(ValueError, match="no tokenizer"):
    V.TextSpec("t")
