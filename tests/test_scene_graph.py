"""Scene-graph priors: spaCy (en_core_web_sm) + SceneGraphParser, and their MiniLM embeddings.

Fixed sentences with the objects, attributes and relations a reader would write down.
"""

from __future__ import annotations

import numpy as np
import pytest

from fssjax.priors.scene_graph import (Relation, SceneGraphParser, SceneObject, ScenePriors,
                                       embed_priors)
from fssjax.priors.text_encoder import SentenceEncoder

CASES = [
    ("A small red striped circle is left of a large blue dotted square.",
     [("circle", ("small", "red", "striped")), ("square", ("large", "blue", "dotted"))],
     [(0, "left of", 1)]),
    ("A traffic light is next to a big tree, and a red car is on top of the road.",
     [("traffic light", ()), ("tree", ("big",)), ("car", ("red",)), ("road", ())],
     [(0, "next to", 1), (2, "on top of", 3)]),
    ("A small striped star overlaps a large bullseye ring. The gridded cross is red and "
     "checkered.",
     [("star", ("small", "striped")), ("bullseye ring", ("large",)),
      ("cross", ("gridded", "red", "checkered"))],
     [(0, "overlaps", 1)]),
    ("A man with a black hat is riding a brown horse on the beach.",
     [("man", ()), ("hat", ("black",)), ("horse", ("brown",)), ("beach", ())],
     [(0, "with", 1), (0, "riding", 2), (0, "on", 3)]),
    ("Two small cats are sleeping under the wooden table.",
     [("cat", ("two", "small")), ("table", ("wooden",))], [(0, "under", 1)]),
    ("There is a small red and blue striped star. The small red and blue striped star is left "
     "of a large green dotted circle.",  # spaCy cuts 'The small red and' off the second chunk
     [("star", ("small", "red", "blue", "striped")), ("circle", ("large", "green", "dotted"))],
     [(0, "left of", 1)]),
    ("The zigzag L-shape lies below the dotted heart.",
     [("zigzag l-shape", ()), ("heart", ("dotted",))], [(0, "below", 1)]),
]


@pytest.fixture(scope="module")
def parser():
  return SceneGraphParser()


@pytest.mark.parametrize("text,objects,relations", CASES)
def test_parse_fixed_sentences(parser, text, objects, relations):
  priors = parser.parse(text)
  assert [(o.name, o.attributes) for o in priors.objects] == objects
  assert [(r.subject, r.relation, r.object) for r in priors.relations] == relations
  assert ScenePriors.from_json(priors.to_json()) == priors


def test_pronouns_dropped_and_json_errors(parser):
  priors = parser.parse("The square is above the triangle and it is green.")
  assert priors.object_names() == ("square", "triangle")
  assert priors.relation_texts() == ("square above triangle",)
  with pytest.raises(ValueError, match="outside"):
    ScenePriors.from_json({"objects": [{"name": "a"}],
                           "relations": [{"subject": 0, "relation": "on", "object": 3}]})
  with pytest.raises(TypeError):
    parser.parse(None)


def test_repeated_mentions_ordinals_and_attribute_words(parser):
  text = ("There is a lime square. There is a lime square. The second lime square is above "
          "the first lime square. The lime square is left of a bullseye ring.")
  priors = parser.parse(text)
  # 'lime' is a colour (an attribute word by default), not part of the name.
  assert [(o.name, o.attributes) for o in priors.objects] == [
      ("square", ("lime",)), ("square", ("lime",)), ("bullseye ring", ())]
  assert set(priors.relations) == {Relation(1, "above", 0), Relation(0, "left of", 2)}
  # Coordinated colours (spaCy splits such chunks in subject / object position); the colour
  # order tells two otherwise equal objects apart.
  priors = parser.parse("There is a small yellow and brown checkered triangle. There is a small "
                        "brown and yellow checkered triangle. The small brown and yellow "
                        "checkered triangle is above the small yellow and brown checkered "
                        "triangle.")
  assert [o.attributes for o in priors.objects] == [("small", "yellow", "brown", "checkered"),
                                                     ("small", "brown", "yellow", "checkered")]
  assert priors.relations == (Relation(1, "above", 0),)
  textures = SceneGraphParser(attribute_words={"bullseye", "lime"})
  assert textures.parse("A bullseye ring.").objects[0].name == "ring"


def test_embed_priors_with_minilm():
  priors = ScenePriors(
      objects=(SceneObject("star", ("small", "striped")), SceneObject("horse", ("brown",))),
      relations=(Relation(0, "left of", 1),))
  enc = SentenceEncoder.minilm(batch_size=8)
  emb = embed_priors(priors, enc)
  assert emb.objects.shape == (2, 384) and emb.phrases.shape == (2, 384)
  assert emb.attributes.shape == (3, 384) and emb.relations.shape == (1, 384)
  np.testing.assert_array_equal(emb.attribute_owner, [0, 0, 1])
  np.testing.assert_array_equal(emb.relation_pairs, [[0, 1]])
  np.testing.assert_allclose(np.linalg.norm(emb.phrases, axis=1), 1.0, atol=1e-5)
  # The same texts embedded directly; and a phrase is nearer its own object than the other.
  direct = enc.encode(["small striped star", "star left of horse"])
  np.testing.assert_allclose(emb.phrases[0], direct[0], atol=1e-5)
  np.testing.assert_allclose(emb.relations[0], direct[1], atol=1e-5)
  sim = emb.phrases @ emb.objects.T
  assert sim[0, 0] > sim[0, 1] and sim[1, 1] > sim[1, 0]
  empty = embed_priors(ScenePriors(), enc)
  assert empty.objects.shape == (0, 384) and empty.relation_pairs.shape == (0, 2)
