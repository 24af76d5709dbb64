"""LLM-guided support retrieval: segment a novel class from the annotated images of related
base classes, without a single annotation of the novel class.

The mechanism (described in the LLaFS line of work, Zhu et al., CVPR 2024, as a way to use a
language model's world knowledge for classes that have no annotated example): a novel class
has only a name (and, optionally, a description). A language model -- or a text encoder --
ranks the base classes that look most like it ("giraffe" -> zebra, horse, deer). The annotated
images of the top-R related base classes, each with its mask *of that base class*, are the
candidate supports; the K candidates most similar to the query by backbone features become
the supports, and a trained few-shot model (HSNet or DiffewS, loaded from its own checkpoint)
segments the query. The language model is not trained.

Protocol (`run_table`). On a fold's novel (test) classes and the benchmark's fixed query
episodes (`fssjax.data.episodes.test_episodes`, random policy), one run scores the same
queries with
  (a) the true novel-class supports of the episode list (the upper bound),
  (b) `random`: base classes in a random order (seeded), then the same visual selection,
  (c) `embedding`: base classes ranked by text-embedding cosine of name + description,
  (d) `llm`: base classes ranked by a language model,
  (e) the all-foreground prediction (the baseline every evaluation reports),
with the published class-wise mIoU. Control (b) isolates what the ranking adds: it keeps the
candidate count and the visual K-nearest selection and only replaces the ranking.

Choices where the mechanism's description is silent (documented here, configurable):
  * candidate supports are drawn from the evaluated split (the queries' split), never the
    query image itself; an image that also holds the novel class is allowed as a support,
    but only its base-class mask is read -- the novel class's annotations are used for the
    queries' scores and nothing else (`tests/test_retrieval.py` checks every load);
  * an image listed under several related classes counts once, for its highest-ranked class;
  * visual similarity (`similarity`), on the feature maps of the few-shot model's backbone
    (`Method.image_features`), ties broken by record index:
      'foreground' (default): the candidate's map averaged over its base-class mask, against
      every location of the query's map, the best location counting -- the candidate's
      object is compared with the object of the query it looks most like, since the query's
      novel-class mask may not be read and a query holds other objects too;
      'global': both maps averaged over all locations (the first version; on the embedded
      benchmark it lost to random base classes, docs/language.md).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import numpy as np
from PIL import Image

from fssjax.data import transforms
from fssjax.data.base import SegmentationSource, image_key

EmbedFn = Callable[[np.ndarray], np.ndarray]
# normalised float32 images [N,H,W,3] -> feature maps [N, h, w, C] (or pooled [N, D]: then only
# the 'global' similarity is available)

SIMILARITIES = ("foreground", "global")


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _area_resize(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Fraction of foreground (mask == 1) pixels per cell of an [h, w] grid (box filter)."""
  fg = Image.fromarray((np.asarray(mask) == 1).astype(np.float32), mode="F")
  return np.asarray(fg.resize((int(hw[1]), int(hw[0])), Image.BOX), np.float32)


class FeatureBank:
  """Backbone features of a source's records, computed once each, on demand.

  Three views of them:
    * `get(records)`: one vector per image, the feature map averaged over all locations,
      L2-normalised [n, C] (the 'global' similarity);
    * `locations(record)`: the map's locations, each L2-normalised [h * w, C] (the query side
      of the 'foreground' similarity);
    * `foreground(pairs)`: for (record, class id) pairs, the map averaged over the record's
      mask of that class (area-weighted at the map's resolution), L2-normalised [n, C]; a
      row of NaN where the mask has no foreground at that resolution.
  Kept: the pooled vectors (float32) and the queries' maps (float16, [h, w, C] per query:
  8 x 8 x 128 for the demo's backbone, 25 x 25 x 1024 = 1.2 MB for ResNet-50 at 400 px); a
  candidate's map is pooled over its mask and dropped.

  Args:
    source: the split the records index.
    embed_fn: normalised float32 images [N, S, S, 3] -> feature maps [N, h, w, C] (any float
      dtype), or pooled features [N, D] (then `locations` and `foreground` raise).
    spec: how a record becomes a network input (size, resize rule, normalisation).
    batch_size: images per `embed_fn` call (the last call is padded to this size, so one
      compiled program serves every call).
  """

  def __init__(self, source: SegmentationSource, embed_fn: EmbedFn,
               spec: transforms.TransformSpec, batch_size: int = 32):
    self.source = source
    self.embed_fn = embed_fn
    self.spec = spec
    self.batch_size = int(batch_size)
    self._raw: dict[int, np.ndarray] = {}
    self._global: dict[int, np.ndarray] = {}
    self._fg: dict[tuple[int, int], np.ndarray] = {}
    self.seconds = 0.0

  def _prepare(self, record: int, class_id: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(normalised image, prepared mask of `class_id` or None)."""
    if class_id is not None:
      image, mask = self.source.load(record, int(class_id))
    else:
      # Only the image: `load_image` when the source has it, else `load` with any class id
      # (its mask is discarded).
      load_image = getattr(self.source, "load_image", None)
      image = load_image(record) if load_image is not None else self.source.load(
          record, _ANY_CLASS)[0]
      mask = np.zeros(np.asarray(image).shape[:2], np.uint8)
    out = np.empty((self.spec.image_size, self.spec.image_size, 3), np.float32)
    _, mask = transforms.prepare(np.asarray(image), np.asarray(mask), self.spec, None, out=out)
    return out, (mask if class_id is not None else None)

  def _embed(self, records: Sequence[int], classes: Mapping[int, int] | None = None):
    """Yields (record, features float32 [h, w, C] or [D], prepared mask of `classes[record]` or
    None) for each distinct record, embedded in batches of `batch_size`."""
    classes = classes or {}
    records = list(dict.fromkeys(int(r) for r in records))
    for i in range(0, len(records), self.batch_size):
      start = time.perf_counter()
      chunk = records[i:i + self.batch_size]
      prepared = [self._prepare(r, classes.get(r)) for r in chunk]
      images = np.stack([image for image, _ in prepared])
      if len(chunk) < self.batch_size:
        pad = np.zeros((self.batch_size - len(chunk),) + images.shape[1:], images.dtype)
        images = np.concatenate([images, pad])
      feats = np.asarray(self.embed_fn(images), np.float32)[:len(chunk)]
      if feats.ndim not in (2, 4):
        raise ValueError(f"retrieval: image_features returned shape {feats.shape}; expected "
                         "feature maps [N, h, w, C] or pooled features [N, D]")
      self.seconds += time.perf_counter() - start
      for r, f, (_, mask) in zip(chunk, feats, prepared):
        yield r, f, mask

  def get(self, records: Sequence[int], classes: Sequence[int] | None = None) -> np.ndarray:
    """Globally pooled features [len(records), C] float32, rows L2-normalised. `classes`: a
    class id each record holds (a candidate's base class), used to load an image the first
    time (else `load_image`, or `load` with class 0, whose mask is discarded)."""
    records = [int(r) for r in records]
    if not records:
      return np.zeros((0, 0), np.float32)
    pool = lambda f: _unit(f.mean(axis=(0, 1)) if f.ndim == 3 else f)  # noqa: E731
    for r in records:
      if r not in self._global and r in self._raw:
        self._global[r] = pool(self._raw[r].astype(np.float32))
    missing = [r for r in records if r not in self._global]
    by_class = None if classes is None else dict(zip(records, map(int, classes)))
    for r, f, _ in self._embed(missing, by_class):
      self._global[r] = pool(f)
    return np.stack([self._global[r] for r in records])

  @staticmethod
  def _check_maps(f: np.ndarray) -> None:
    if f.ndim != 3:
      raise ValueError("retrieval: similarity 'foreground' needs feature maps [N, h, w, C] from "
                       "the method's image_features, which returned pooled features "
                       f"{tuple(f.shape)} per image; use similarity='global'")

  def locations(self, record: int, class_id: int | None = None) -> np.ndarray:
    """The query side: [h * w, C] float32, every location's feature L2-normalised
    (`class_id`: as in `get`). The maps of records asked for here are kept (a query is
    scored once per ranker)."""
    record = int(record)
    if record not in self._raw:
      for r, f, _ in self._embed([record], None if class_id is None else {record: class_id}):
        self._check_maps(f)
        self._raw[r] = f.astype(np.float16)
    f = self._raw[record].astype(np.float32)
    return _unit(f.reshape(-1, f.shape[-1]))

  def _pool_mask(self, f: np.ndarray, mask: np.ndarray) -> np.ndarray:
    self._check_maps(f)
    w = _area_resize(mask, f.shape[:2])
    total = float(w.sum())
    if total <= 0:
      return np.full(f.shape[-1], np.nan, np.float32)
    return _unit((f * w[..., None]).sum(axis=(0, 1)) / total)

  def foreground(self, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Mask-pooled features [len(pairs), C] float32 (rows L2-normalised; NaN rows where the
    mask of that class has no foreground at the map's resolution). Only the pooled vectors
    are kept, not the candidates' maps."""
    pairs = [(int(r), int(c)) for r, c in pairs]
    todo: dict[int, list[int]] = {}
    for r, c in dict.fromkeys(pairs):
      if (r, c) not in self._fg:
        todo.setdefault(r, []).append(c)
    kept = [r for r in todo if r in self._raw]
    maps = ((r, self._raw[r].astype(np.float32), None) for r in kept)
    fresh = self._embed([r for r in todo if r not in self._raw],
                        {r: cs[0] for r, cs in todo.items()})
    for source in (maps, fresh):
      for r, f, mask in source:
        for c in todo[r]:
          m = mask if (mask is not None and c == todo[r][0]) else self._prepare(r, c)[1]
          self._fg[(r, c)] = self._pool_mask(f, m)
    if not pairs:
      return np.zeros((0, 0), np.float32)
    return np.stack([self._fg[p] for p in pairs])


# `load(record, class_id)` needs a class id to build a mask; the image does not depend on it.
_ANY_CLASS = 0


@dataclasses.dataclass
class RelatedClassSupports:
  """The `ranked` support policy of LLM-guided retrieval (a `fssjax.priors.ranking`
  SupportRanker).

  Attributes:
    source: the split that holds the queries and the candidate supports.
    related: novel class id -> base class ids, most related first (from
      `fssjax.priors.related`).
    features: the visual similarity of candidates to the query.
    top_r: how many related base classes give candidates.
    similarity: 'foreground' (default): a candidate's features averaged over its mask of its
      base class, compared (cosine) with every location of the query, the best location
      counting -- does the query hold something that looks like the candidate's object?
      'global': cosine of both images' features averaged over all locations.
  A candidate whose underlying image is the query's (`fssjax.data.base.image_key`: the
  same file or content listed under another record index) is never a support.
  """

  source: SegmentationSource
  related: Mapping[int, Sequence[int]]
  features: FeatureBank
  top_r: int = 3
  similarity: str = "foreground"

  def __post_init__(self):
    if self.similarity not in SIMILARITIES:
      raise ValueError(f"retrieval: similarity {self.similarity!r}; expected one of "
                       f"{SIMILARITIES}")

  def candidates(self, class_id: int, query: int) -> list[tuple[int, int]]:
    """(record, base class id) pairs of the top-R related classes, without the query image."""
    query_key = image_key(self.source, query)
    seen: set[int] = set()
    out = []
    for base in list(self.related[int(class_id)])[:int(self.top_r)]:
      for r in np.asarray(self.source.images_with_class(int(base))):
        r = int(r)
        if r == query or r in seen or image_key(self.source, r) == query_key:
          continue
        seen.add(r)
        out.append((r, int(base)))
    return out

  def scores(self, query: int, cands: Sequence[tuple[int, int]],
             class_id: int | None = None) -> np.ndarray:
    """Similarity of each candidate to the query (see `similarity`); -inf for a candidate
    whose mask vanishes at the feature resolution. `class_id`: the query's class, used only
    to load the query's image (its mask, which scores the query, is not read here)."""
    if self.similarity == "global":
      feats = self.features.get([r for r, _ in cands], [c for _, c in cands])
      return feats @ self.features.get([query], None if class_id is None else [class_id])[0]
    protos = self.features.foreground(cands)
    sims = np.max(protos @ self.features.locations(query, class_id).T, axis=1)
    return np.where(np.isnan(sims), -np.inf, sims)

  def supports(self, class_id: int, query: int, shot: int,
               rng: np.random.Generator) -> list[tuple[int, int]]:
    """The `shot` candidates most similar to the query (ties: lower record index first)."""
    del rng  # deterministic: similarity, ties by record index
    cands = self.candidates(class_id, query)
    if len(cands) < shot:
      raise ValueError(
          f"retrieval: class {class_id} ({self.source.class_names[class_id]!r}) has only "
          f"{len(cands)} candidate supports in its top {self.top_r} related base classes "
          f"{list(self.related[int(class_id)])[:int(self.top_r)]}; need {shot}. Raise "
          f"model.top_r.")
    sims = self.scores(query, cands, class_id)
    records = np.asarray([r for r, _ in cands])
    order = np.lexsort((records, -sims))[:shot]
    return [cands[i] for i in order]


def summarize(variants: Mapping[str, Mapping[str, Any]]) -> str:
  """A Markdown table: one row per support variant, mIoU / FB-IoU, plus the baseline."""
  rows = ["| supports | mIoU | FB-IoU |", "|---|---|---|"]
  base = None
  for name, r in variants.items():
    rows.append(f"| {name} | {r['miou']:.1f} | {r['fbiou']:.1f} |")
    base = base or r
  if base is not None and "baseline_miou" in base:
    rows.append(f"| all-foreground baseline | {base['baseline_miou']:.1f} | "
                f"{base['baseline_fbiou']:.1f} |")
  return "\n".join(rows)


# ----------------------------------------------------------------------------------------
# The evaluator: one run, every support variant, the same queries.

RANKERS = ("random", "embedding", "llm", "llm_score")
TRUE_SUPPORTS = "novel-class supports (upper bound)"


def _descriptions(data, names: Sequence[str], spec: str) -> dict[str, str]:
  """{class name: description} per `spec`: '' = the data set's own (the embedded
  benchmark's exact descriptions, the shipped COCO / PASCAL ones), 'none', or a JSON path."""
  from fssjax.priors import describe  # pylint: disable=g-import-not-at-top
  if spec == "none":
    return {}
  dataset = str(data.dataset)
  key = {"coco20i": "coco", "coco20i_contiguous": "coco", "lvis92i": "coco",
         "pascal5i": "pascal"}.get(dataset, dataset)
  if spec:
    return describe.load_descriptions(key, spec)
  if key == "synthetic":  # the generator's exact descriptions
    doc = describe.describe_synthetic(str(data.root) or None)
    return {c["name"]: c["description"] for c in doc["classes"]}
  if key in ("coco", "pascal"):
    return describe.load_descriptions(key)
  return {}


def _supports_used(source, episodes) -> dict[str, Any]:
  """Per novel class: the support images used ({record key: [base class, episodes]}) and, per
  episode, the query and its supports (record key, class name) -- what the run recorded."""
  names = list(source.class_names)
  out: dict[str, Any] = {}
  for e in episodes:
    entry = out.setdefault(names[e.class_id], {"images": {}, "episodes": []})
    classes = e.support_classes or (e.class_id,) * len(e.supports)
    pairs = [(str(source.record_key(r)), names[c]) for r, c in zip(e.supports, classes)]
    entry["episodes"].append({"query": str(source.record_key(e.query)),
                              "supports": [list(p) for p in pairs]})
    for key, cls in pairs:
      entry["images"].setdefault(key, [cls, 0])[1] += 1
  return out


def make_evaluator(name: str, config, spec: Mapping[str, Any], *, every: int, prefix: str,
                   batch_size: int, num_summary: int, mesh=None):
  """The `retrieval` evaluator of `config.evals.<name>` (see the module docstring).

  Spec keys (besides the common ones of `fssjax.evaluators`): `rankers` (subset of
  ('random', 'embedding', 'llm', 'llm_score'), in table order), `top_r` (related base
  classes that give candidates, default 3), `llm` (a `fssjax.priors.llm.LLMClient` config;
  default the local SmolLM2), `descriptions` ('' = the data set's own, 'none', or a JSON
  path), `seed` (of the random ranker), `similarity` ('foreground' (default) or 'global',
  see the module docstring). The results add `related` (each ranker's related classes per
  novel class) and `supports` (per ranker and novel class, the support images used and every
  episode's query and supports, by record key).
  """
  from fssjax import evaluators  # pylint: disable=g-import-not-at-top

  class _Retrieval(evaluators.EpisodicEvaluator):
    type = "retrieval"

    def __init__(self):
      super().__init__(name, config, every=every, prefix=prefix, batch_size=batch_size,
                       num_summary=num_summary, mesh=mesh)
      # Every setting is checked here, before training starts: a bad one found only when
      # the evaluator first runs would cost the whole training run.
      from fssjax.methods.base import ConfigError  # pylint: disable=g-import-not-at-top
      self.rankers = tuple(spec.get("rankers") or RANKERS)
      bad = [r for r in self.rankers if r not in RANKERS]
      if bad:
        raise ConfigError(f"evals.{name}.rankers: unknown {bad}; expected some of {RANKERS}")
      top_r = spec.get("top_r")
      self.top_r = 3 if top_r is None else int(top_r)
      if self.top_r < 1:
        raise ConfigError(f"evals.{name}.top_r={top_r!r}; expected the number of related base "
                          "classes that give candidate supports, >= 1 (default 3)")
      self.llm = dict(spec.get("llm") or {"backend": "local"})
      if any(r in ("llm", "llm_score") for r in self.rankers):
        from fssjax.priors import llm as llm_lib  # pylint: disable=g-import-not-at-top
        try:  # builds the backend only (no model loaded, nothing sent)
          client = llm_lib.LLMClient.from_config(self.llm)
        except ValueError as e:
          raise ConfigError(f"evals.{name}.llm: {e}") from None
        key_env = getattr(client.backend, "api_key_env", None)
        if key_env and not client.offline and not os.environ.get(key_env):
          logging.warning("evals.%s.llm: the environment variable %s is not set; the %s "
                          "rankers will fail at evaluation unless every request is cached",
                          name, key_env, "/".join(r for r in self.rankers if "llm" in r))
      self.descriptions = str(spec.get("descriptions") or "")
      self.seed = int(spec.get("seed") or 0)
      self.similarity = str(spec.get("similarity") or "foreground")
      if self.similarity not in SIMILARITIES:
        raise ConfigError(f"evals.{name}.similarity={self.similarity!r}; expected one of "
                          f"{SIMILARITIES}")
      self._related: dict[str, Any] | None = None

    def related(self) -> dict[str, Any]:
      """{ranker: (list of Related, {novel id: [base ids]})}, computed once per run."""
      if self._related is None:
        from fssjax.data import sources  # pylint: disable=g-import-not-at-top
        from fssjax.priors import llm as llm_lib  # pylint: disable=g-import-not-at-top
        from fssjax.priors import related as related_lib  # pylint: disable=g-import-not-at-top
        data = self.data
        names = list(data.source.class_names)
        base = [names[c] for c in sources.fold_classes_for(self.config.data, "train")]
        desc = _descriptions(self.config.data, names, self.descriptions)
        novel = [names[c] for c in data.class_ids if c not in data.left_out]
        fallback = related_lib.make_ranker("random", base, descriptions=desc, seed=self.seed)
        self._related = {}
        for kind in self.rankers:
          kw = dict(descriptions=desc, seed=self.seed, top_k=self.top_r)
          if kind in ("llm", "llm_score"):
            kw["client"] = llm_lib.LLMClient.from_config(self.llm)
          start = time.perf_counter()
          results = related_lib.make_ranker(kind, base, **kw).rank_many(novel, top_k=self.top_r)
          filled = 0
          for r in results:  # an LLM list shorter than top_r: complete it with the control
            if len(r.ranked) < self.top_r:
              extra = [b for b in fallback.rank(r.novel).ranked if b not in r.ranked]
              filled += self.top_r - len(r.ranked)
              r.ranked = r.ranked + extra[:self.top_r - len(r.ranked)]
          ids = related_lib.to_class_ids(results, names)
          logging.info("retrieval: %s ranker, %d novel classes in %.1f s%s", kind, len(novel),
                       time.perf_counter() - start,
                       f"; {filled} slots filled from the random control" if filled else "")
          self._related[kind] = dict(results=results, ids=ids, filled=filled)
      return self._related

    def run(self, method, params, frozen, step=None, writer=None) -> dict:
      import jax  # pylint: disable=g-import-not-at-top
      from fssjax import evaluate  # pylint: disable=g-import-not-at-top
      from fssjax.data import pipeline  # pylint: disable=g-import-not-at-top
      start = time.perf_counter()
      true = super().run(method, params, frozen, step=None, writer=None)
      data = self.data
      embed = jax.jit(lambda images: method.image_features(params, frozen, images))
      bank = FeatureBank(data.source, embed,
                         pipeline.transform_spec(self.config, method.normalization, train=False),
                         batch_size=self.batch_size)
      variants = {TRUE_SUPPORTS: true}
      related = self.related()
      supports_used = {}
      for kind in self.rankers:
        ranker = RelatedClassSupports(data.source, related[kind]["ids"], bank, self.top_r,
                                      similarity=self.similarity)
        ranked = evaluators.EpisodicData.from_source(
            data.benchmark, data.source, data.class_ids, shot=data.shot,
            num_episodes=len(data.episodes), test_seed=data.test_seed, policy="ranked",
            ranker=ranker)
        variants[f"{kind}-ranked base supports"] = evaluate.evaluate(
            method, params, frozen, self.loader(method, ranked.episodes), data.class_ids,
            mesh=self.mesh, class_names=list(data.source.class_names), num_summary=0,
            total_episodes=len(ranked.episodes), left_out=data.left_out)
        supports_used[kind] = _supports_used(data.source, ranked.episodes)
      results = dict(true)
      results.update(
          evaluator="retrieval", name=self.name, prefix=self.prefix,
          wall_time_s=time.perf_counter() - start, protocol=self.protocol(),
          table=summarize(variants), feature_seconds=bank.seconds,
          variants={k: dict(miou=v["miou"], fbiou=v["fbiou"],
                            per_class_iou=v["per_class_iou"]) for k, v in variants.items()},
          related={k: {r.novel: r.ranked for r in v["results"]} for k, v in related.items()},
          supports=supports_used,
          related_unknown={k: sum(len(r.unknown) for r in v["results"])
                           for k, v in related.items()},
          related_filled={k: v["filled"] for k, v in related.items()},
          related_model={k: v["results"][0].model if v["results"] else None
                         for k, v in related.items()})
      if writer is not None and step is not None and jax.process_index() == 0:
        from fssjax import monitoring  # pylint: disable=g-import-not-at-top
        monitoring.write_eval(writer, step, true, prefix=self.prefix)
        scalars = {}
        for k, v in variants.items():
          tag = k.split(" ")[0].replace("-ranked", "")
          scalars[f"{self.prefix}/retrieval/{tag}/miou"] = v["miou"]
          scalars[f"{self.prefix}/retrieval/{tag}/fbiou"] = v["fbiou"]
        writer.write_scalars(step, scalars)
        lines = [f"{kind}: " + "; ".join(f"{novel} -> {', '.join(bases[:self.top_r])}"
                                         for novel, bases in results["related"][kind].items())
                 for kind in self.rankers]
        if hasattr(writer, "write_texts"):
          writer.write_texts(step, {f"{self.prefix}/retrieval/table": results["table"],
                                    f"{self.prefix}/retrieval/related": "\n\n".join(lines)})
      return results

    def summary_line(self, results) -> str:
      return "\n" + results["table"]

    def protocol(self) -> dict:
      out = super().protocol()
      out.update(evaluator="retrieval", rankers=list(self.rankers), top_r=self.top_r,
                 similarity=self.similarity,
                 support_policy=f"ranked (related base classes, visual K-nearest by "
                                f"{self.similarity} similarity)")
      return out

  return _Retrieval()
