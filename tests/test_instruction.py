"""LLaFS instruction builder (fssjax.priors.instruction): exact prompt text and placeholder
order, attribute sources (embedded benchmark, LLM client through its cache), shared-attribute
removal, SLIC superpixels and the region-attribute table with an injected similarity."""

from __future__ import annotations

import numpy as np
import pytest

from fssjax.data import synthetic
from fssjax.data.pseudo_samples import make_pseudo_sample
from fssjax.priors.instruction import (SPECIAL_TOKENS, LLMAttributes, Placeholder,
                                       RegionAttributes, StaticAttributes, SupportExample,
                                       SyntheticAttributes, build_instruction,
                                       embedding_similarity, expand_placeholders,
                                       masked_crops, splice, split_placeholders,
                                       region_attribute_table, remove_shared, superpixels)
from fssjax.priors.llm import LLMClient
from fssjax.priors.polygons import parse_polygons

SQ = np.array([[0, 0], [8, 0], [8, 8], [0, 8]] * 4, np.int32)
SQ_TEXT = "(" + ",".join(["(0,0),(8,0),(8,8),(0,8)"] * 4) + ")"

EXPECTED = (
    "Segment every striped star in the query image. For each striped star, write one polygon "
    "of 16 points (x,y) that follows its outline in clockwise order, with integer coordinates "
    "within the image size (0 <= x < width, 0 <= y < height). Answer with a tuple of objects, "
    "each written as ((x1,y1),(x2,y2),...,(x16,y16)), and nothing else.\n"
    "Striped star has red colour; a star.\n"
    f"Example 1: in the image <support_image> (width 40, height 32) the striped star is "
    f"({SQ_TEXT}).\n"
    "Region-attribute table of example 1:\n"
    "region 2 <region>: red colour\n"
    "region 5 <region>: a star; stripes\n"
    f"Example 2: in the image <support_image> (width 20, height 16) the striped star is "
    f"({SQ_TEXT},{SQ_TEXT}).\n"
    "Query: the image <query_image> (width 30, height 24). Segment the striped star.\n"
    "The first 3 points of the first striped star are ((0,0),(8,0),(8,8)).")


def test_exact_prompt_and_placeholders():
  table = [RegionAttributes(2, None, ["red colour"], [0.9]),
           RegionAttributes(5, None, ["a star", "stripes"], [0.5, 0.4])]
  ins = build_instruction(
      "striped star", ["red colour", "a star"],
      [SupportExample((32, 40), [SQ], table), SupportExample((16, 20), [SQ, SQ])],
      query_size=(24, 30), given_points=SQ[:3], query_polygons=[SQ])
  assert ins.text == EXPECTED
  assert ins.placeholders == [Placeholder("support_image", 0), Placeholder("region", 0, 2),
                              Placeholder("region", 0, 5), Placeholder("support_image", 1),
                              Placeholder("query_image")]
  # parts alternate text and placeholders (adjacent text merged), and rebuild the text.
  assert all(isinstance(a, str) != isinstance(b, str) for a, b in zip(ins.parts, ins.parts[1:]))
  assert "".join(p if isinstance(p, str) else p.token for p in ins.parts) == ins.text
  assert ins.answer == f"({SQ_TEXT})"
  assert [p.token for p in ins.placeholders].count("<region>") == 2
  assert set(SPECIAL_TOKENS) == {"<support_image>", "<query_image>", "<region>"}
  # The answer parses back to the query polygons; no attributes / no table / no given points.
  np.testing.assert_array_equal(parse_polygons(ins.answer, 24, 30).polygons[0], SQ)
  bare = build_instruction("cat", [], [SupportExample((8, 8), [])], (8, 8))
  assert " has " not in bare.text and "is ()." in bare.text and bare.answer is None
  assert bare.text.endswith("Segment the cat.")
  with pytest.raises(ValueError, match="support"):
    build_instruction("cat", [], [], (8, 8))


def test_attribute_sources(tmp_path):
  attrs = SyntheticAttributes().attributes("striped star")
  cat = next(c for c in synthetic.categories() if c.name == "striped star")
  assert attrs == (["the shape of a five-pointed star",
                    "a surface painted with parallel straight stripes of two alternating "
                    "colours"] + [f"{c} colour" for c in cat.colours] + [f"a {cat.size} size"])
  ring = SyntheticAttributes().attributes("solid ring")
  assert ring[0] == "the shape of an annulus"
  with pytest.raises(KeyError, match="embedded benchmark"):
    SyntheticAttributes().attributes("zebra")
  assert StaticAttributes({"zebra": ["stripes"]}).attributes("zebra") == ["stripes"]
  with pytest.raises(KeyError, match="zebra"):
    StaticAttributes({"zebra": ["stripes"]}).attributes("horse")

  class Backend:
    name, model = "fake", "fake-1"
    calls = []

    def complete(self, messages, sampling):
      self.calls.append(messages[-1]["content"])
      return '["black and white stripes", " four legs ", "", "a mane", "hooves", "tail", "ears"]'

  backend = Backend()
  client = LLMClient(backend, cache_dir=str(tmp_path))
  src = LLMAttributes(client, max_attributes=4)
  assert src.attributes("zebra") == ["black and white stripes", "four legs", "a mane", "hooves"]
  assert "zebra" in backend.calls[0] and "at most 4" in backend.calls[0]
  assert src.attributes("zebra") == ["black and white stripes", "four legs", "a mane", "hooves"]
  assert len(backend.calls) == 1 and client.stats["cache_hits"] == 1


def test_remove_shared():
  mine = ["Black and white stripes", "four legs", "a mane", "four legs"]
  others = [["four  legs.", "hooves"], ["a tail"]]
  assert remove_shared(mine, others) == ["Black and white stripes", "a mane"]
  assert remove_shared(mine, []) == ["Black and white stripes", "four legs", "a mane"]


def _two_colour_object():
  """A 32 x 32 image: a red left half and a blue right half of a centred square object."""
  img = np.full((32, 32, 3), 128, np.uint8)
  mask = np.zeros((32, 32), np.uint8)
  mask[6:26, 6:26] = 1
  img[6:26, 6:16] = (220, 30, 30)
  img[6:26, 16:26] = (30, 30, 220)
  return img, mask


COLOURS = {"red colour": (220, 30, 30), "blue colour": (30, 30, 220)}


def colour_similarity(image, regions, attributes):
  """Injected similarity of the test: -distance of the region's mean colour to the named
  colour (scaled to [0, 1]); attributes naming no colour score 0.1 everywhere."""
  out = np.zeros((len(regions), len(attributes)))
  for k, r in enumerate(regions):
    mean = image[r].astype(float).mean(0)
    for a, attr in enumerate(attributes):
      out[k, a] = (1 - np.linalg.norm(mean - COLOURS[attr]) / 441.0) if attr in COLOURS else 0.1
  return out


def test_superpixels_and_table():
  img, mask = _two_colour_object()
  labels = superpixels(img, mask, n_segments=4)
  assert labels.dtype == np.int32 and (labels[mask == 0] == 0).all() and (labels[mask == 1] > 0).all()
  ids = np.unique(labels[labels > 0])
  assert ids.tolist() == list(range(1, len(ids) + 1)) and len(ids) >= 2
  # SLIC respects the colour edge: no superpixel spans both halves.
  for r in ids:
    cols = np.nonzero(labels == r)[1]
    assert cols.max() < 16 or cols.min() >= 16
  table = region_attribute_table(img, mask, ["blue colour", "a square", "red colour"],
                                 colour_similarity, labels=labels)
  by_attr = {a: row for row in table for a in row.attributes}
  assert set(by_attr) == {"blue colour", "a square", "red colour"}
  assert np.nonzero(by_attr["red colour"].mask)[1].max() < 16
  assert np.nonzero(by_attr["blue colour"].mask)[1].min() >= 16
  assert by_attr["a square"].region == 1  # a tie goes to the lowest region id
  assert [row.region for row in table] == sorted(row.region for row in table)
  red = by_attr["red colour"]
  assert red.scores[red.attributes.index("red colour")] == pytest.approx(1.0)
  # min_similarity leaves the uninformative attribute out.
  table = region_attribute_table(img, mask, ["a square", "red colour"], colour_similarity,
                                 labels=labels, min_similarity=0.5)
  assert [a for row in table for a in row.attributes] == ["red colour"]
  assert region_attribute_table(img, np.zeros_like(mask), ["red colour"], colour_similarity) == []
  with pytest.raises(ValueError, match=r"\[regions, attributes\]"):
    region_attribute_table(img, mask, ["red colour"], lambda i, r, a: np.zeros((1, 5)),
                           labels=labels)
  with pytest.raises(ValueError, match="same"):
    superpixels(img, mask[:10])


def test_masked_crops_and_embedding_similarity():
  img, mask = _two_colour_object()
  left = np.zeros((32, 32), bool)
  left[6:26, 6:16] = True
  right = np.zeros((32, 32), bool)
  right[10:12, 20:30] = True
  crops = masked_crops(img, np.stack([left, right]), size=16)
  assert crops.shape == (2, 16, 16, 3) and crops.dtype == np.uint8
  # The left half (20 x 10) becomes a square crop 20 x 20 around its centre: red in the
  # middle, the mean colour outside the region.
  mean = img.reshape(-1, 3).mean(0).astype(np.uint8)
  np.testing.assert_array_equal(crops[0, 8, 8], (220, 30, 30))
  np.testing.assert_allclose(crops[0, 8, 0], mean, atol=1)
  np.testing.assert_array_equal(crops[1, 8, 8], (30, 30, 220))
  with pytest.raises(ValueError, match="empty region"):
    masked_crops(img, np.zeros((1, 32, 32), bool))

  # Toy encoders into RGB space: an image's embedding is its mean colour minus grey, a
  # text's the colour it names.
  def image_encoder(batch):
    return batch.reshape(len(batch), -1, 3).mean(1) - 128.0

  def text_encoder(texts):
    return np.array([np.array(COLOURS[t], float) - 128.0 for t in texts])

  sim = embedding_similarity(image_encoder, text_encoder, size=16)
  scores = sim(img, np.stack([left, right]), ["red colour", "blue colour"])
  assert scores.shape == (2, 2) and np.all(np.abs(scores) <= 1 + 1e-9)
  assert scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0]
  table = region_attribute_table(img, mask, ["red colour", "blue colour"], sim,
                                 labels=superpixels(img, mask, n_segments=4))
  for row in table:
    cols = np.nonzero(row.mask)[1]
    for a in row.attributes:
      assert (cols.max() < 16) if a == "red colour" else (cols.min() >= 16)


def test_pseudo_sample_instruction_round_trip():
  s = make_pseudo_sample(4, 0.4)
  ins = build_instruction("object", [], [SupportExample((64, 64), s.support_polygons)],
                          (64, 64), query_polygons=s.query_polygons, given_points=s.given_points)
  assert f"The first {s.given_vertices} points" in ins.text
  r = parse_polygons(ins.answer, 64, 64)
  assert r.status == "ok"
  np.testing.assert_array_equal(r.polygons[0], s.query_polygons[0])


def test_split_expand_and_splice():
  ins = build_instruction("cat", ["fur"], [SupportExample(
      (8, 8), [SQ], [RegionAttributes(1, None, ["fur"], [1.0])])], (8, 8))
  # A chat template around the text: the parts come back with the placeholders in order.
  rendered = "<|user|>\n" + ins.text + "<|end|>\n<|assistant|>\n"
  parts = split_placeholders(rendered, ins.placeholders)
  assert [p for p in parts if isinstance(p, Placeholder)] == ins.placeholders
  assert parts[0].startswith("<|user|>") and parts[-1].endswith("<|assistant|>\n")
  with pytest.raises(ValueError, match="special tokens"):
    split_placeholders(rendered, ins.placeholders[::-1])
  # A toy byte tokenizer: one id per character (+ 10).
  encode = lambda s: [ord(c) + 10 for c in s]  # noqa: E731
  ids, slots = expand_placeholders(parts, encode, pad_id=0,
                                   lengths={"support_image": 3, "query_image": 3, "region": 1})
  text_len = sum(len(p) for p in parts if isinstance(p, str))
  assert ids.dtype == np.int32 and len(ids) == text_len + 3 + 1 + 3
  assert [s.placeholder.kind for s in slots] == ["support_image", "region", "query_image"]
  for s in slots:
    assert (ids[s.start:s.start + s.length] == 0).all()
  assert (ids[ids != 0] >= 10).all() and (ids == 0).sum() == 7
  # The text between slots is the encoded text.
  first = parts[0]
  assert ids[:len(first)].tolist() == encode(first) and slots[0].start == len(first)
  with pytest.raises(KeyError, match="region"):
    expand_placeholders(parts, encode, pad_id=0, lengths={"support_image": 3, "query_image": 3})
  emb = np.zeros((len(ids), 4), np.float32)
  visual = [np.full((3, 4), 1.0), np.full((1, 4), 2.0), np.full((3, 4), 3.0)]
  out = np.asarray(splice(emb, slots, visual))
  for s, v in zip(slots, visual):
    np.testing.assert_array_equal(out[s.start:s.start + s.length], v)
  assert (out.sum(1) > 0).sum() == 7
  batched = np.asarray(splice(np.zeros((2, len(ids), 4)), slots,
                              [np.ones((2, 3, 4)), np.ones((2, 1, 4)), np.ones((2, 3, 4))]))
  assert batched.shape == (2, len(ids), 4) and batched.sum() == 2 * 7 * 4
  with pytest.raises(ValueError, match="expected"):
    splice(emb, slots, [np.ones((2, 4))] + visual[1:])
  with pytest.raises(ValueError, match="3 slots"):
    splice(emb, slots, visual[:2])


def test_table_from_scores_and_max_regions():
  from fssjax.priors.instruction import table_from_scores
  scores = np.array([[0.1, 0.9, 0.5], [0.8, 0.2, 0.5]])  # regions 3 and 7
  rows = table_from_scores(scores, ["a", "b", "c"], [3, 7])
  assert [(r.region, r.attributes) for r in rows] == [(3, ["b", "c"]), (7, ["a"])]  # tie: 3
  assert rows[0].mask is None and rows[0].scores == [0.9, 0.5]
  assert [r.attributes for r in table_from_scores(scores, ["a", "b", "c"], [3, 7],
                                                  min_similarity=0.6)] == [["b"], ["a"]]
  assert table_from_scores(np.zeros((0, 2)), ["a", "b"], []) == []
  with pytest.raises(ValueError, match="expected"):
    table_from_scores(scores, ["a", "b"], [3, 7])
  img, mask = _two_colour_object()
  full = superpixels(img, mask, n_segments=8)
  assert full.max() > 2
  two = superpixels(img, mask, n_segments=8, max_regions=2)
  assert two.max() == 2 and set(np.unique(two)) == {0, 1, 2}
  # The two largest superpixels are kept, in their original order.
  sizes = sorted(((full == r).sum(), -r) for r in range(1, full.max() + 1))[::-1][:2]
  kept = sorted(-r for _, r in sizes)
  for new, old in enumerate(kept, 1):
    np.testing.assert_array_equal(two == new, full == old)
