"""Related-class rankers (fssjax.priors.related) on the embedded benchmark's classes.

Stated expectations. The synthetic benchmark's 80 classes are 10 shapes x 8 textures, each with
a palette of 3 of 12 colours; in fold 0 (novel classes c % 4 == 0, base: the other 60) a base
class shares the novel class's shape or texture with probability 0.22 on average, and shares
0.75 palette colours on average. The embedding ranker (all-MiniLM-L6-v2) puts only such
classes in every novel class's top 5 with one embedding of "name: description" (match=
'paragraph') and of the names alone (measured: 100%, both ways), but that embedding ignores
colour (top 3 share 0.55 palette colours, below chance). Matching the descriptions sentence by
sentence (match='sentences', the default) keeps shape or texture (measured 96% of the top 5)
and adds colour (top 3 share 0.97 palette colours; 0.78-0.97 over the four folds). The random
control stays near chance (< 45% shape or texture).
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import respx

from fssjax.priors import describe, related
from fssjax.priors.text_encoder import SentenceEncoder
from llm_mock import BASE, KEY_ENV, SECRET, completion, make_client  # tests/llm_mock.py


@pytest.fixture(scope="module")
def synthetic():
  doc = describe.describe_synthetic()
  names = [c["name"] for c in doc["classes"]]
  return {
      "desc": {c["name"]: c["description"] for c in doc["classes"]},
      "fields": {c["name"]: c["fields"] for c in doc["classes"]},
      "novel": [n for i, n in enumerate(names) if i % 4 == 0],
      "base": [n for i, n in enumerate(names) if i % 4 != 0],
  }


class MemoEncoder:
  """all-MiniLM-L6-v2 that encodes each text once per test module (the tests rank the same
  descriptions several ways)."""

  def __init__(self, encoder):
    self._encoder = encoder
    self.model_id = encoder.model_id
    self._memo = {}

  def encode(self, texts):
    missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
    if missing:
      self._memo.update(zip(missing, self._encoder.encode(missing)))
    return np.stack([self._memo[t] for t in texts])


@pytest.fixture(scope="module")
def encoder():
  return MemoEncoder(SentenceEncoder.minilm())


def share_fraction(results, fields):
  """Mean over novel classes of the fraction of ranked classes sharing shape or texture."""
  out = []
  for r in results:
    f = fields[r.novel]
    out.append(np.mean([fields[b]["shape"] == f["shape"] or fields[b]["texture"] == f["texture"]
                        for b in r.ranked]))
  return float(np.mean(out))


def palette_overlap(results, fields, k=3):
  """Mean number of palette colours the top-k ranked classes share with the novel class."""
  return float(np.mean([len(set(fields[b]["colours"]) & set(fields[r.novel]["colours"]))
                        for r in results for b in r.ranked[:k]]))


def test_embedding_ranker_puts_shared_shape_or_texture_first(synthetic, encoder, tmp_path):
  s = synthetic
  every = [related.Related(n, s["base"], "all") for n in s["novel"]]
  chance = share_fraction(every, s["fields"])
  assert 0.15 < chance < 0.3
  assert 0.7 < palette_overlap(every, s["fields"], k=60) < 0.8
  for descriptions in (s["desc"], None):
    ranker = related.make_ranker("embedding", s["base"], descriptions=descriptions,
                                 encoder=encoder, match="paragraph",
                                 cache_dir=str(tmp_path / "emb"))
    results = ranker.rank_many(s["novel"], top_k=5)
    assert share_fraction(results, s["fields"]) == 1.0
    r = results[0]
    assert len(r.ranked) == 5 and r.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert r.scores == sorted(r.scores, reverse=True)
  assert palette_overlap(results, s["fields"]) < 0.8  # names say nothing of colour: chance
  names = describe.class_names("synthetic")
  ids = related.to_class_ids(results, names)
  assert sorted(ids) == list(range(0, 80, 4))  # fold 0's novel class ids
  assert ids[0] == [names.index(b) for b in results[0].ranked]
  with pytest.raises(ValueError, match="not among the class names"):
    related.to_class_ids(results, names[:40])
  full = ranker.rank(s["novel"][0])
  assert sorted(full.ranked) == sorted(s["base"])  # without top_k: every base class
  random = related.make_ranker("random", s["base"], seed=0, cache=False)
  assert share_fraction([random.rank(n, top_k=5) for n in s["novel"]], s["fields"]) < 0.45


def test_sentence_matching_adds_colour_to_shape_and_texture(synthetic, encoder, tmp_path):
  s = synthetic
  kw = dict(descriptions=s["desc"], encoder=encoder, cache_dir=str(tmp_path))
  paragraph = related.make_ranker("embedding", s["base"], match="paragraph", **kw)
  sentences = related.make_ranker("embedding", s["base"], **kw)  # the default
  assert sentences.match == "sentences"
  by_sentence = sentences.rank_many(s["novel"], top_k=5)
  by_paragraph = paragraph.rank_many(s["novel"], top_k=5)
  assert share_fraction(by_sentence, s["fields"]) >= 0.9
  assert palette_overlap(by_sentence, s["fields"]) > 0.9 > 0.6 > palette_overlap(
      by_paragraph, s["fields"])
  # Each class is its description's sentences; the score is the symmetric mean best match.
  texts = sentences.texts("dotted star")
  assert len(texts) == 5 and texts[0].startswith("A dotted star is") and texts[1].startswith(
      "It uses two different colours")
  assert paragraph.texts("dotted star") == ["dotted star: " + s["desc"]["dotted star"]]
  a = np.eye(3, dtype=np.float32)
  assert related.EmbeddingRanker.similarity(a, a[:1]) == pytest.approx(0.5 * (1 / 3 + 1))
  assert related.split_sentences("A b. C d? E!  ") == ["A b.", "C d?", "E!"]
  with pytest.raises(ValueError, match="match="):
    related.make_ranker("embedding", s["base"], match="words", encoder=encoder)


def test_embedding_ranker_on_coco_names(encoder):
  """Names alone: a giraffe looks like a horse and a zebra; a bus like a truck and a train."""
  from fssjax.data import folds
  ranker = related.make_ranker("embedding", folds.COCO_CLASS_NAMES, encoder=encoder,
                               cache=False)
  giraffe, bus = ranker.rank_many(["giraffe", "bus"], top_k=5)
  assert {"horse", "zebra"} <= set(giraffe.ranked)
  assert {"truck", "train"} <= set(bus.ranked[:3])
  assert "giraffe" not in giraffe.ranked


def test_results_are_cached(synthetic, encoder, tmp_path):
  s = synthetic
  first = related.make_ranker("embedding", s["base"], encoder=encoder,
                              cache_dir=str(tmp_path)).rank("dotted star", top_k=4)

  class NoEncoder:
    model_id = encoder.model_id

    def encode(self, texts):
      raise AssertionError("the cached ranking should not encode anything")

  again = related.make_ranker("embedding", s["base"], encoder=NoEncoder(),
                              cache_dir=str(tmp_path)).rank("dotted star", top_k=4)
  assert again == first
  # With descriptions it is another ranking (not the cached one).
  with pytest.raises(AssertionError, match="should not encode"):
    related.make_ranker("embedding", s["base"], descriptions=s["desc"], encoder=NoEncoder(),
                        cache_dir=str(tmp_path)).rank("dotted star", top_k=4)


def test_random_ranker_is_a_seeded_permutation(synthetic):
  base = synthetic["base"]
  a = related.rank_related("solid circle", base, "random", seed=1, cache=False)
  assert a == related.rank_related("solid circle", base, "random", seed=1, cache=False)
  assert sorted(a) == sorted(base) and a != base
  assert a != related.rank_related("solid circle", base, "random", seed=2, cache=False)
  # The novel class is never related to itself, even when it is in the base list.
  b = related.rank_related(base[0], base, "random", seed=1, cache=False)
  assert base[0] not in b and len(b) == len(base) - 1


def test_llm_ranker_drops_and_counts_unknown_names(synthetic, tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  base = synthetic["base"]
  assert {"solid ring", "checkered circle", "solid star"} <= set(base)
  answer = ["Solid Ring", "solid rings", "checkered_circle", "purple blob", "solid circle",
            "solid star", "giraffe"]
  router = respx.MockRouter(assert_all_called=False)
  route = router.post(f"{BASE}/chat/completions").mock(
      return_value=httpx.Response(200, json=completion(json.dumps(answer))))
  client = make_client(router, tmp_path / "llm")
  ranker = related.make_ranker("llm", base, client=client, top_k=5,
                               cache_dir=str(tmp_path / "related"))
  r = ranker.rank("solid circle")
  assert r.ranked == ["solid ring", "checkered circle", "solid star"]
  assert r.unknown == ["purple blob", "solid circle", "giraffe"]  # novel itself counts too
  assert r.repeats == ["solid rings"] and r.answer == answer and r.parsed == "json"
  assert r.model == "openai/test-model"
  prompt = json.loads(route.calls[0].request.content)["messages"][-1]["content"]
  assert "Novel class: solid circle." in prompt and "checkered circle" in prompt
  assert "solid circle," not in prompt.split("Base classes:")[1]  # not offered as its own base
  # Written to the run directory, read back equal.
  paths = related.write_related([r], str(tmp_path / "run"))
  assert paths == [str(tmp_path / "run" / "related" / "llm.json")]
  data = json.load(open(paths[0]))
  assert data["num_unknown"] == 3 and data["num_classes"] == 1
  assert related.read_related(paths[0]) == {"solid circle": r}
  # A rerun asks nothing: the result cache answers (and the LLM cache would as well).
  again = related.make_ranker("llm", base, client=make_client(router, tmp_path / "llm"),
                              top_k=5, cache_dir=str(tmp_path / "related"))
  assert again.rank("solid circle") == r and route.call_count == 1


def test_llm_ranker_reads_a_list_when_the_json_fails(synthetic, tmp_path, monkeypatch):
  """SmolLM2-135M tends to answer with a bulleted list and to echo the format on the re-ask."""
  monkeypatch.setenv(KEY_ENV, SECRET)
  base = synthetic["base"]
  assert {"solid ring", "bullseye circle"} <= set(base)
  listed = ("The base classes are:\n- solid circle\n- solid ring\n- bullseye circle\n"
            "- bullseye circle\n- purple blob")
  router = respx.MockRouter(assert_all_called=False)
  route = router.post(f"{BASE}/chat/completions").mock(side_effect=[
      httpx.Response(200, json=completion(listed)),
      httpx.Response(200, json=completion('{"items": {"type": "string}')),
  ] * 2)
  ranker = related.make_ranker("llm", base, client=make_client(router, tmp_path / "a"),
                               cache=False)
  r = ranker.rank("solid circle")
  assert r.parsed == "text" and r.answer == listed
  assert r.ranked == ["solid ring", "bullseye circle"]
  assert r.unknown == ["solid circle", "purple blob"] and r.repeats == ["bullseye circle"]
  assert route.call_count == 2
  strict = related.make_ranker("llm", base, client=make_client(router, tmp_path / "b"),
                               text_fallback=False, cache=False)
  with pytest.raises(related.llm_lib.LLMSchemaError, match="after one re-ask"):
    strict.rank("solid circle")
  # The re-ask repeats the format request.
  reask = json.loads(route.calls[1].request.content)["messages"][-1]["content"]
  assert reask.startswith("That answer is not valid") and "JSON list of 5" in reask


def test_names_from_text(synthetic):
  v = related.Vocabulary(synthetic["base"])  # fold 0: 'checkered triangle' is novel
  assert "checkered triangle" not in v.names and "bullseye triangle" in v.names
  prose = ("The base classes checkered triangle, bullseye triangle, and striped triangle are "
           "all based on the checkered triangle.")
  assert related.names_from_text(prose, v) == ["bullseye triangle", "striped triangle"]
  # A list's items come back as written (matched and counted later).
  assert related.names_from_text("1. Solid Ring\n2) purple blob.\n", v) == ["Solid Ring",
                                                                             "purple blob"]


def test_vocabulary_matching():
  from fssjax.data import folds
  v = related.Vocabulary(folds.VOC_CLASS_NAMES)
  assert v.match("Dining Table") == "diningtable"
  assert v.match("potted plants") == "pottedplant"
  assert v.match("buses") == "bus" and v.match('"Sheep".') == "sheep"
  assert v.match("giraffe") is None and v.match(3) is None
  with pytest.raises(ValueError, match="repeat"):
    related.make_ranker("random", ["cat", "cat"])
  with pytest.raises(ValueError, match="method"):
    related.make_ranker("wordnet", ["cat"])
