"""Related-class rankers: which base classes look most like a novel class.

LLM-guided support retrieval (a novel class has a name and no annotated image) takes the
annotated images of the base classes that look most like the novel class as supports. Four
rankers order the base vocabulary for a novel class:

  llm        asks an LLM (`fssjax.priors.llm.LLMClient`, cached) for a JSON list of the
             `top_k` base classes that look most like the novel class, most similar first
             (`LLMClient.chat_json`: schema check, one re-ask). Every returned name is matched
             against the base vocabulary (case, white space, '_' / '-', a plural 's' and
             run-together spellings such as 'diningtable' are forgiven); unknown names, the
             novel class itself and repeats are dropped and counted (`Related.unknown`,
             `Related.repeats`). Small local models (SmolLM2-135M) rarely write valid JSON
             but often answer with a bulleted list: with `text_fallback=True` (the default)
             an answer that fails the schema twice is read as text instead (`names_from_text`:
             the items of a bulleted / numbered list, else the base names the text mentions,
             in order), and `Related.parsed` says 'text' instead of 'json'.
  llm_score  a local LLM's log-likelihood of each base class name as the answer to "which
             object looks most like a <novel>?" (multiple-choice scoring; for small models
             that cannot follow the JSON instruction, e.g. SmolLM2-135M-Instruct).
  embedding  cosine similarity of sentence embeddings (all-MiniLM-L6-v2 via
             `fssjax.priors.text_encoder.SentenceEncoder`) of "name: description" (just the
             name when no description is given); every base class, most similar first, with
             its score.
  random     a seeded permutation of the base classes (the control); the same (seed, novel
             class) always gives the same order.

  ranked = rank_related("giraffe", base_names, method="embedding", descriptions=desc)
  ranker = make_ranker("llm", base_names, client=LLMClient.from_config({"backend": "local"}))
  results = ranker.rank_many(novel_names, top_k=5)
  write_related(results, run_dir)        # {run_dir}/related/llm.json
  ids = to_class_ids(results, class_names)  # {novel id: [base ids]} for the retrieval method

Results are cached on disk (one JSON file per (method, model, novel class, base vocabulary,
descriptions used, seed, top_k, prompt), written atomically) under `cache_dir` (default
$FSSJAX_CACHE_DIR/related, else ~/.cache/fssjax/related), so a rerun neither loads a model nor
asks one. A novel class that is also in the base vocabulary is never ranked as related to
itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fssjax import utils
from fssjax.priors import llm as llm_lib

log = logging.getLogger(__name__)

METHODS = ("llm", "llm_score", "embedding", "random")
PROMPT_VERSION = 2

SYSTEM_PROMPT = "You compare object classes by how they look in images."
USER_PROMPT = (
    "Novel class: {novel}.{description}\n"
    "Base classes: {base}.\n"
    "Which {k} base classes look most like a {novel} (overall shape, parts, texture, colour "
    "and size)? Rank them, most similar first, and write each name exactly as it appears in "
    "the base class list.")
FORMAT_INSTRUCTION = ('Answer with only a JSON list of {k} base class names, most similar '
                      'first, for example: ["name one", "name two"].')


@dataclasses.dataclass
class Related:
  """The base classes ranked for one novel class.

  Attributes:
    novel: the novel class name.
    ranked: base class names, most related first (the llm ranker: at most top_k; the others:
      every base class except the novel class itself).
    method: 'llm', 'embedding' or 'random'.
    model: the LLM or sentence encoder id (None for random).
    scores: cosine similarities aligned with `ranked` (embedding), else None.
    unknown: names the LLM gave that are not in the base vocabulary (dropped).
    repeats: names the LLM gave more than once (later copies dropped).
    answer: the LLM's parsed answer as given (JSON), or its text (parsed 'text'), else None.
    parsed: 'json' or 'text' (llm ranker), else None.
  """

  novel: str
  ranked: list[str]
  method: str
  model: Optional[str] = None
  scores: Optional[list[float]] = None
  unknown: list[str] = dataclasses.field(default_factory=list)
  repeats: list[str] = dataclasses.field(default_factory=list)
  answer: Any = None
  parsed: Optional[str] = None

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Related":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _norm(name: str) -> str:
  name = name.lower().strip().strip("\"'`.,;:!?()[]{}")
  name = re.sub(r"[\s_\-]+", " ", name)
  return name.strip()


def _depluralize(name: str) -> list[str]:
  out = []
  if name.endswith("es"):
    out.append(name[:-2])
  if name.endswith("s"):
    out.append(name[:-1])
  return out


class Vocabulary:
  """Matches free-form names to a fixed list of class names (see the module docstring)."""

  def __init__(self, names: Sequence[str]):
    self.names = list(names)
    self._index: dict[str, str] = {}
    for n in self.names:
      for key in (_norm(n), _norm(n).replace(" ", "")):
        self._index.setdefault(key, n)

  def match(self, name: str) -> Optional[str]:
    """The vocabulary name `name` stands for, or None."""
    if not isinstance(name, str):
      return None
    n = _norm(name)
    for key in [n, n.replace(" ", "")] + _depluralize(n) + [
        k.replace(" ", "") for k in _depluralize(n)]:
      if key in self._index:
        return self._index[key]
    return None


_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*(.+?)\s*$", re.MULTILINE)


def names_from_text(text: str, vocab: Vocabulary) -> list[str]:
  """Candidate names in a free-text answer, in order.

  The items of a bulleted or numbered list (one per line: '- x', '* x', '1. x', '2) x') when
  the text has one (returned as written, to be matched and counted like JSON items); else the
  vocabulary names the text mentions (whole words, longest first), by first mention.
  """
  items = [m.group(1).strip().rstrip(".,;") for m in _ITEM.finditer(text)]
  if items:
    return items
  norm = " " + re.sub(r"[^a-z0-9]+", " ", text.lower()) + " "
  found = []
  taken = [False] * len(norm)
  for name in sorted(vocab.names, key=lambda n: -len(n)):
    key = " " + re.sub(r"[^a-z0-9]+", " ", name.lower()).strip() + " "
    start = norm.find(key)
    while start >= 0 and any(taken[start + 1:start + len(key) - 1]):
      start = norm.find(key, start + 1)
    if start >= 0:
      for i in range(start + 1, start + len(key) - 1):
        taken[i] = True
      found.append((start, name))
  return [n for _, n in sorted(found)]


def _sha(obj: Any) -> str:
  blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def default_cache_dir() -> str:
  """$FSSJAX_CACHE_DIR/related, else ~/.cache/fssjax/related."""
  return os.path.join(llm_lib.cache_root(), "related")


class RelatedRanker:
  """Base class: ranks `base` for a novel class, with a result cache.

  Args:
    base: the base class names (the vocabulary answers must come from).
    descriptions: optional {class name: description} (novel and base classes).
    cache_dir: result cache directory (None: `default_cache_dir()`); cache=False: no cache.
  """

  method = ""

  def __init__(self, base: Sequence[str], *, descriptions: Optional[Mapping[str, str]] = None,
               cache_dir: Optional[str] = None, cache: bool = True):
    base = list(base)
    if not base:
      raise ValueError(f"{self.method} ranker: the base class list is empty")
    if len(set(base)) != len(base):
      dup = sorted({b for b in base if base.count(b) > 1})
      raise ValueError(f"{self.method} ranker: base class names repeat: {dup}")
    self.base = base
    self.vocab = Vocabulary(base)
    self.descriptions = dict(descriptions or {})
    self.cache_dir = (cache_dir or default_cache_dir()) if cache else None

  @property
  def model(self) -> Optional[str]:
    return None

  def _key_fields(self, novel: str, top_k: Optional[int]) -> dict:
    used = {n: self.descriptions.get(n) for n in [novel] + self.base}
    return {"method": self.method, "model": self.model, "novel": novel, "base": self.base,
            "descriptions": used, "top_k": top_k}

  def rank(self, novel: str, top_k: Optional[int] = None) -> Related:
    """Ranks the base classes for `novel` (cached).

    Args:
      novel: the novel class name.
      top_k: keep the first top_k (the llm ranker asks for this many; default 5 there).

    Returns:
      a Related.
    """
    if not isinstance(novel, str) or not novel.strip():
      raise ValueError(f"{self.method} ranker: novel class name {novel!r} is empty")
    path = None
    if self.cache_dir is not None:
      key = _sha(self._key_fields(novel, top_k))
      path = os.path.join(self.cache_dir, key[:2], key + ".json")
      try:
        with open(path, encoding="utf-8") as f:
          return Related.from_json(json.load(f))
      except FileNotFoundError:
        pass
      except (OSError, ValueError, TypeError) as e:
        log.warning("related-class cache entry %s unreadable (%s); ranking again", path, e)
    result = self._rank(novel, top_k)
    if path is not None:
      utils.atomic_write_json(path, result.to_json(), indent=1, ensure_ascii=False)
    return result

  def rank_many(self, novels: Sequence[str], top_k: Optional[int] = None) -> list[Related]:
    """`rank` for each novel class (the embedding ranker encodes all texts in one pass)."""
    return [self.rank(n, top_k) for n in novels]

  def _rank(self, novel: str, top_k: Optional[int]) -> Related:
    """The ranking itself, uncached: each ranker (random, embedding, llm, llm_score) defines
    it; `rank` adds the checks and the cache around it."""
    raise NotImplementedError(f"{type(self).__name__} does not define _rank")

  def _candidates(self, novel: str) -> list[str]:
    return [b for b in self.base if b != novel]


class RandomRanker(RelatedRanker):
  """A seeded random permutation (the control)."""

  method = "random"

  def __init__(self, base: Sequence[str], *, seed: int = 0, **kwargs):
    super().__init__(base, **kwargs)
    self.seed = int(seed)

  def _key_fields(self, novel, top_k):
    return dict(super()._key_fields(novel, top_k), seed=self.seed, descriptions=None)

  def _rank(self, novel: str, top_k: Optional[int]) -> Related:
    cands = self._candidates(novel)
    h = int(hashlib.sha256(novel.encode("utf-8")).hexdigest()[:8], 16)
    order = np.random.default_rng([self.seed, h]).permutation(len(cands))
    ranked = [cands[i] for i in order][:top_k]
    return Related(novel=novel, ranked=ranked, method=self.method)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
  """The sentences of a description (split after '.', '!' or '?' followed by white space)."""
  return [t.strip() for t in _SENTENCE_END.split(text or "") if t.strip()]


class EmbeddingRanker(RelatedRanker):
  """Text-embedding similarity (all-MiniLM-L6-v2 by default) of two classes' descriptions.

  match='sentences' (default): each class is the sentences of its description (which names
  it), each embedded on its own; the similarity of classes A and B is the symmetric mean best match
  0.5 * (mean over A's sentences of the best cosine with one of B's + the same from B to A)
  (the sentence-level form of BERTScore's greedy matching, Zhang et al., ICLR 2020). A
  description is a list of attributes (shape, parts, texture, colour, size) in separate
  sentences, and every attribute then counts; one embedding of "name: description" is
  dominated by the name, so that on the embedded benchmark it ranks by shape and texture only
  and ignores colour (docs/language.md). match='paragraph': cosine of single embeddings of
  "name: description". Without a description both are the cosine of the names.

  Args:
    encoder: a SentenceEncoder (None: all-MiniLM-L6-v2, loaded on the first cache miss).
    match: 'sentences' or 'paragraph'.
  """

  method = "embedding"
  MATCHES = ("sentences", "paragraph")

  def __init__(self, base: Sequence[str], *, encoder: Any = None, match: str = "sentences",
               **kwargs):
    super().__init__(base, **kwargs)
    if match not in self.MATCHES:
      raise ValueError(f"embedding ranker: match={match!r}; expected one of {self.MATCHES}")
    self.match = match
    self._encoder = encoder
    self._emb: dict[str, np.ndarray] = {}
    self._pending: list[str] = []

  @property
  def model(self) -> str:
    if self._encoder is not None:
      return self._encoder.model_id
    from fssjax.priors.text_encoder import MINILM_ID  # pylint: disable=import-outside-toplevel
    return MINILM_ID

  @property
  def encoder(self):
    if self._encoder is None:
      from fssjax.priors.text_encoder import (  # pylint: disable=import-outside-toplevel
          SentenceEncoder)
      self._encoder = SentenceEncoder.minilm()
    return self._encoder

  def _key_fields(self, novel, top_k):
    fields = super()._key_fields(novel, top_k)
    if self.match != "paragraph":  # paragraph: the key (and cache) of the first version
      fields["match"] = self.match
    return fields

  def text(self, name: str) -> str:
    """The 'paragraph' text of a class."""
    d = self.descriptions.get(name)
    return f"{name}: {d}" if d else name

  def texts(self, name: str) -> list[str]:
    """The texts embedded for a class: its description's sentences ('sentences'), or
    ['name: description'] ('paragraph'); [name] without a description."""
    d = self.descriptions.get(name)
    if not d:
      return [name]
    if self.match == "paragraph":
      return [self.text(name)]
    return split_sentences(d) or [name]

  def _embed(self, names: Sequence[str]) -> list[np.ndarray]:
    """Per class: its texts' embeddings [n_texts, D] (unit rows)."""
    texts = [t for n in dict.fromkeys(names) for t in self.texts(n)]
    missing = [t for t in dict.fromkeys(texts) if t not in self._emb]
    if missing:
      for t, e in zip(missing, self.encoder.encode(missing)):
        self._emb[t] = e
    return [np.stack([self._emb[t] for t in self.texts(n)]) for n in names]

  @staticmethod
  def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric mean best-match cosine of two sets of unit embeddings [n, D], [m, D]."""
    s = a @ b.T
    return 0.5 * (float(s.max(axis=1).mean()) + float(s.max(axis=0).mean()))

  def rank_many(self, novels: Sequence[str], top_k: Optional[int] = None) -> list[Related]:
    self._pending = list(novels) + self.base
    try:
      return super().rank_many(novels, top_k)
    finally:
      self._pending = []

  def _rank(self, novel: str, top_k: Optional[int]) -> Related:
    cands = self._candidates(novel)
    if self._pending:  # rank_many on a cache miss: every text it will need, in one pass
      self._embed(self._pending)
      self._pending = []
    emb = self._embed([novel] + cands)
    sims = [self.similarity(emb[0], e) for e in emb[1:]]
    order = sorted(range(len(cands)), key=lambda i: (-float(sims[i]), cands[i]))[:top_k]
    return Related(novel=novel, ranked=[cands[i] for i in order], method=self.method,
                   model=self.model, scores=[round(float(sims[i]), 6) for i in order])


class LLMRanker(RelatedRanker):
  """Asks an LLM for a ranked JSON list of base classes (see the module docstring).

  Args:
    client: an LLMClient (its own cache keeps every request and answer).
    top_k: how many classes to ask for when `rank` is called without top_k.
    text_fallback: read an answer that fails the JSON schema twice as text (see the module
      docstring); False: raise the client's LLMSchemaError.
  """

  method = "llm"

  def __init__(self, base: Sequence[str], *, client: llm_lib.LLMClient, top_k: int = 5,
               text_fallback: bool = True, **kwargs):
    super().__init__(base, **kwargs)
    if client is None:
      raise ValueError("llm ranker: an LLMClient is required (fssjax.priors.llm)")
    self.client = client
    self.top_k = int(top_k)
    self.text_fallback = bool(text_fallback)

  @property
  def model(self) -> str:
    return f"{self.client.backend.name}/{self.client.model}"

  def _key_fields(self, novel, top_k):
    return dict(super()._key_fields(novel, top_k or self.top_k), prompt=PROMPT_VERSION,
                sampling=dataclasses.asdict(self.client.sampling),
                text_fallback=self.text_fallback)

  def messages(self, novel: str, k: int) -> list[dict]:
    d = self.descriptions.get(novel)
    user = USER_PROMPT.format(novel=novel, k=k, base=", ".join(self._candidates(novel)),
                              description=f" It looks like this: {d}" if d else "")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

  def _rank(self, novel: str, top_k: Optional[int]) -> Related:
    k = int(top_k or self.top_k)
    schema = {"type": "array", "items": {"type": "string"}, "minItems": 1}
    parsed = "json"
    try:
      answer = self.client.chat_json(self.messages(novel, k), schema,
                                     instruction=FORMAT_INSTRUCTION.format(k=k))
      items = answer
    except llm_lib.LLMSchemaError as e:
      if not self.text_fallback:
        raise
      parsed = "text"
      answer, items = e.answers[0], []
      for text in e.answers:  # the reply to the question first, then to the re-ask
        items = names_from_text(text, self.vocab)
        if any(self.vocab.match(x) not in (None, novel) for x in items):
          answer = text
          break
      log.info("llm ranker: no valid JSON for %r; read %d names from the text", novel,
               len(items))
    ranked, unknown, repeats = [], [], []
    for name in items:
      m = self.vocab.match(name)
      if m is None or m == novel:
        unknown.append(name)
      elif m in ranked:
        repeats.append(name)
      else:
        ranked.append(m)
    if unknown:
      log.info("llm ranker: %d of %d names for %r are not base classes: %s", len(unknown),
               len(answer), novel, unknown)
    return Related(novel=novel, ranked=ranked[:k], method=self.method, model=self.model,
                   unknown=unknown, repeats=repeats, answer=answer, parsed=parsed)


class LLMScoreRanker(RelatedRanker):
  """Ranks every base class by the log-likelihood a local LLM gives its name as the answer.

  The multiple-choice scoring of language-model evaluations, for models too small to follow
  a "write a JSON list" instruction (SmolLM2-135M-Instruct answers such requests with
  template text): the chat prompt asks which object looks most like the novel class (with
  its description when given), the assistant turn starts "A {novel} looks most like a", and
  each base class name is scored as its continuation (summed token log-probability,
  `LocalLM.choice_logprobs`). Every base class is ranked, with its score; nothing needs
  parsing, so no name can be unknown. Needs the `local` backend (logits). Cost: one forward
  pass over (prompt + name) per base class, batched; the description is left out of the
  prompt by default (`use_descriptions`), which keeps the prompt short (a 60-class ranking
  with SmolLM2-135M takes seconds on a CPU instead of minutes).

  Args:
    client: an LLMClient with the local backend (its model is loaded on the first miss).
    use_descriptions: put the novel class's description in the question.
  """

  method = "llm_score"
  PROMPT = ("Which object looks most like a {novel}?{description} Answer with the name of "
            "one object.")
  ANSWER = "A {novel} looks most like a"

  def __init__(self, base: Sequence[str], *, client: llm_lib.LLMClient,
               use_descriptions: bool = False, **kwargs):
    super().__init__(base, **kwargs)
    self.use_descriptions = bool(use_descriptions)
    if client is None or getattr(client.backend, "name", "") != "local":
      raise ValueError("llm_score ranker: needs an LLMClient with the 'local' backend (it "
                       "scores answers with the model's own logits)")
    self.client = client

  @property
  def model(self) -> str:
    return f"{self.client.backend.name}/{self.client.model}"

  def _key_fields(self, novel, top_k):
    return dict(super()._key_fields(novel, top_k), prompt=[self.PROMPT, self.ANSWER],
                use_descriptions=self.use_descriptions)

  def _rank(self, novel: str, top_k: Optional[int]) -> Related:
    lm = self.client.backend.lm
    tok = lm.tokenizer
    d = self.descriptions.get(novel) if self.use_descriptions else None
    messages = [{"role": "user", "content": self.PROMPT.format(
        novel=novel, description=f" ({d})" if d else "")}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt + self.ANSWER.format(novel=novel))
    cands = self._candidates(novel)
    scores = lm.choice_logprobs(prompt_ids, [tok.encode(" " + c) for c in cands],
                                batch_size=64)
    order = sorted(range(len(cands)), key=lambda i: (-float(scores[i]), cands[i]))[:top_k]
    return Related(novel=novel, ranked=[cands[i] for i in order], method=self.method,
                   model=self.model, scores=[round(float(scores[i]), 4) for i in order])


def make_ranker(method: str, base: Sequence[str], *,
                descriptions: Optional[Mapping[str, str]] = None,
                client: Optional[llm_lib.LLMClient] = None, encoder: Any = None,
                seed: int = 0, top_k: int = 5, text_fallback: bool = True,
                match: str = "sentences", use_descriptions: bool = False,
                cache_dir: Optional[str] = None, cache: bool = True) -> RelatedRanker:
  """Builds the ranker for `method` ('llm', 'llm_score', 'embedding', 'random').

  `match` is the embedding ranker's ('sentences' | 'paragraph'), `use_descriptions` the
  llm_score ranker's (the novel class's description in the question).

  Raises:
    ValueError: unknown method, or 'llm' / 'llm_score' without a (local) client.
  """
  common = dict(descriptions=descriptions, cache_dir=cache_dir, cache=cache)
  if method == "llm_score":
    return LLMScoreRanker(base, client=client, use_descriptions=use_descriptions, **common)
  if method == "llm":
    return LLMRanker(base, client=client, top_k=top_k, text_fallback=text_fallback, **common)
  if method == "embedding":
    return EmbeddingRanker(base, encoder=encoder, match=match, **common)
  if method == "random":
    return RandomRanker(base, seed=seed, **common)
  raise ValueError(f"related-class method {method!r}; expected one of {METHODS}")


def rank_related(novel: str, base: Sequence[str], method: str = "llm", *,
                 top_k: Optional[int] = None, **kwargs) -> list[str]:
  """Base class names ranked for `novel`, most related first (see `make_ranker` for kwargs)."""
  return make_ranker(method, base, **kwargs).rank(novel, top_k).ranked


def to_class_ids(results: Sequence[Related], names: Sequence[str]) -> dict[int, list[int]]:
  """{novel class id: [base class ids, most related first]} with ids = positions in `names`
  (the form `fssjax.methods.retrieval` takes).

  Raises:
    ValueError: a name not in `names`.
  """
  index = {n: i for i, n in enumerate(names)}
  missing = sorted({n for r in results for n in [r.novel, *r.ranked] if n not in index})
  if missing:
    raise ValueError(f"related classes {missing} are not among the class names given "
                     f"({list(names)[:5]}...)")
  return {index[r.novel]: [index[b] for b in r.ranked] for r in results}


def write_related(results: Sequence[Related], run_dir: str) -> list[str]:
  """Writes `{run_dir}/related/{method}.json` per method: {novel: Related JSON}.

  Returns:
    the paths written.
  """
  by_method: dict[str, dict[str, dict]] = {}
  for r in results:
    by_method.setdefault(r.method, {})[r.novel] = r.to_json()
  paths = []
  for method, table in by_method.items():
    path = os.path.join(run_dir, "related", f"{method}.json")
    summary = {"method": method, "num_classes": len(table),
               "num_unknown": sum(len(r["unknown"]) for r in table.values()),
               "classes": table}
    utils.atomic_write_json(path, summary, indent=1, ensure_ascii=False)
    os.chmod(path, 0o644)
    paths.append(path)
  return paths


def read_related(path: str) -> dict[str, Related]:
  """Reads a file written by `write_related` -> {novel: Related}."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict) or not isinstance(data.get("classes"), dict):
    raise ValueError(f"{path}: expected a related-classes file with a 'classes' dict")
  return {k: Related.from_json(v) for k, v in data["classes"].items()}
