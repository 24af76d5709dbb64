"""Ground-truth captions of the embedded benchmark (fssjax.data.captions), for LLaFS's
alignment stage: every word checked against the annotations."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fssjax.data import synthetic
from fssjax.data.captions import (caption_for, colour_words, position_word, size_word,
                                  synthetic_caption)


def test_captions_match_the_ground_truth():
  cats = synthetic.categories()
  in_palette = total = 0
  for i in range(30):
    image, instances = synthetic.render_image(0, "train", i)
    caption = synthetic_caption(image, instances)
    assert caption == caption_for(0, "train", i)  # deterministic
    n = len(instances)
    assert caption.startswith(f"An image with {['no', 'one', 'two', 'three', 'four', 'five'][n]} "
                              f"object{'s' if n > 1 else ''}: ")
    phrases = caption[caption.index(": ") + 2:-1].split(", ")
    assert len(phrases) == n
    for cls, mask in instances:
      assert cats[cls].name in caption
      words = colour_words(image, mask)
      expected = " ".join(w for w in (size_word(mask), " and ".join(words), cats[cls].name) if w)
      assert f"a {expected} at the {position_word(mask)}" in phrases
      total += 1
      if cats[cls].texture != "gradient":  # gradients blend palette colours into others
        assert words and set(words) <= set(cats[cls].colours), (cats[cls], words)
      in_palette += bool(words) and set(words) <= set(cats[cls].colours)
  assert in_palette / total >= 0.9


def test_words():
  m = np.zeros((30, 30), bool)
  m[0:5, 0:5] = True
  assert position_word(m) == "top left" and size_word(m) == "small"  # 25 / 900 = 2.8%
  m = np.zeros((30, 30), bool)
  m[12:18, 24:30] = True
  assert position_word(m) == "right"
  m = np.zeros((30, 30), bool)
  m[5:25, 5:25] = True
  assert position_word(m) == "centre" and size_word(m) == "large"
  m[:] = False
  m[29, 14] = True
  assert position_word(m) == "bottom" and size_word(m) == "tiny"
  img = np.zeros((4, 4, 3), np.uint8)
  img[:2] = synthetic.COLOURS["red"]
  img[2:, :3] = synthetic.COLOURS["cyan"]
  img[3, 3] = synthetic.COLOURS["black"]  # 1 / 16 < 20%: not named
  assert colour_words(img, np.ones((4, 4), bool)) == ["red", "cyan"]


def test_edge_cases():
  img = np.zeros((8, 8, 3), np.uint8)
  assert synthetic_caption(img, []) == "An image with no object."
  assert synthetic_caption(img, [(0, np.zeros((8, 8), bool))]) == "An image with no object."
  one = np.zeros((8, 8), bool)
  one[:4, :4] = True
  cap = synthetic_caption(img, [(0, one)])
  assert re.fullmatch(r"An image with one object: a large black .+ at the top left\.", cap), cap
  with pytest.raises(ValueError, match="80 categories"):
    synthetic_caption(img, [(80, one)])
  with pytest.raises(ValueError, match="differs"):
    synthetic_caption(img, [(0, one[:4])])
