"""Why related-class supports help or not: the analysis behind docs/language.md (retrieval).

Loads a trained retrieval demo run once (HSNet on the embedded benchmark, fold 0, 1-shot) and
scores support choices on the run's own 300 query episodes, one support per episode, with the
published class-wise mIoU over the novel classes:

  1. attributes: random supports from base classes that share the novel class's shape, its
     texture or neither, split by the palette colours their class shares with the novel one;
  2. features: cosine of mask-pooled backbone features of two objects by what their classes
     share, per backbone tap;
  3. rankings: each ranker's top 3 per novel class against the generator's ground truth;
  4. choice: rankers x visual similarity (the first version's whole-image pooled deepest tap,
     the library's 'global' and 'foreground', and an oracle that pools the query over its true
     novel-class mask), top_r 3 and 1, with a paired bootstrap of each ranker minus random.

  python scripts/retrieval_analysis.py --workdir=runs/retrieval_demo [--out=analysis.json]

About 3 minutes of CPU time (most of it HSNet forward passes; 14 minutes wall on a shared
2-core machine). Prints Markdown tables; --out also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import retrieval_coco  # noqa: E402
from fssjax import checkpointing, evaluators, sharding  # noqa: E402
from fssjax.data import pipeline, synthetic, transforms  # noqa: E402
from fssjax.methods import get_method, retrieval  # noqa: E402
from fssjax.priors import describe, related  # noqa: E402
from fssjax.train import build_setup, init_frozen  # noqa: E402


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Demo:
  """The run's model, episodes, prepared images and masks, and a prediction cache."""

  def __init__(self, workdir: str, arg: str):
    config = retrieval_coco.get_config(arg)
    self.method = method = get_method(config)
    mesh = sharding.mesh_from_config(config)
    self.evaluator = ev = evaluators.from_config(config, method, mesh).evaluators[0]
    setup = build_setup(config, method, mesh, ev.example_batch(method))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    self.params = ckpt.restore_params(ckpt.latest_step(), setup.abstract_state["params"])
    ckpt.close()
    self.frozen = init_frozen(setup)
    self.data = ev.data
    self.src = src = self.data.source
    self.eps = self.data.episodes
    self.novel = list(self.data.class_ids)
    self.names = list(src.class_names)
    self.base = [c for c in range(len(self.names)) if c not in self.novel]
    self.spec = pipeline.transform_spec(config, method.normalization, train=False)
    size = self.spec.image_size
    self.images = np.zeros((len(src), size, size, 3), np.float32)
    self.masks = {}
    for c in range(len(self.names)):
      for r in src.images_with_class(c):
        image, mask = src.load(int(r), c)
        image, mask = transforms.prepare(np.asarray(image), np.asarray(mask), self.spec, None)
        self.images[int(r)] = image
        self.masks[(int(r), c)] = mask
    variables = method._variables(self.params, self.frozen)  # pylint: disable=protected-access
    self._features = jax.jit(lambda x: method.model.apply(
        variables, x, method=lambda m, y: m.features(y)))
    self._logits = jax.jit(lambda q, s, m: method.logits(self.params, self.frozen, q, s, m))
    self.taps = self._all_taps()
    self._iou: dict = {}
    self.cats = synthetic.categories()

  def _all_taps(self, bs: int = 50) -> list[np.ndarray]:
    out = []
    for i in range(0, len(self.images), bs):
      x = self.images[i:i + bs]
      n = len(x)
      if n < bs:
        x = np.concatenate([x, np.zeros((bs - n,) + x.shape[1:], np.float32)])
      out.append([np.asarray(f)[:n] for f in self._features(x)])
    return [np.concatenate(level) for level in zip(*out)]

  def iou(self, items, bs: int = 32):
    """items: (episode index, support record, support class) -> [(intersection, union)]."""
    missing = sorted({it for it in items if it not in self._iou})
    for i in range(0, len(missing), bs):
      chunk = missing[i:i + bs]
      q = self.images[[self.eps[e].query for e, _, _ in chunk]]
      s = self.images[[r for _, r, _ in chunk]]
      m = np.stack([self.masks[(r, c)] for _, r, c in chunk])
      n = len(chunk)
      if n < bs:
        q, s, m = (np.concatenate([a, np.zeros((bs - n,) + a.shape[1:], a.dtype)])
                   for a in (q, s, m))
      logits = np.asarray(self._logits(q, s, m))[:n]
      for (e, r, c), lg in zip(chunk, logits):
        pred = lg[..., 1] > lg[..., 0]
        truth = self.masks[(self.eps[e].query, self.eps[e].class_id)]
        valid, fg = truth != 255, truth == 1
        self._iou[(e, r, c)] = (int((pred & fg & valid).sum()), int(((pred | fg) & valid).sum()))
    return [self._iou[it] for it in items]

  def miou(self, items, weights=None) -> float:
    """Class-wise mIoU (sum of intersections / sum of unions per class, mean over classes)."""
    iu = np.asarray(self.iou(items), np.float64)
    cls = [self.eps[e].class_id for e, _, _ in items]
    classes = sorted(set(cls))
    index = np.array([classes.index(c) for c in cls])
    w = np.ones(len(items)) if weights is None else weights
    inter = np.bincount(index, iu[:, 0] * w, len(classes))
    union = np.bincount(index, iu[:, 1] * w, len(classes))
    return float(100 * np.mean(inter / np.maximum(union, 1)))

  def pooled(self, level: int, record: int, class_id: int) -> np.ndarray:
    f = self.taps[level][record]
    mask = self.masks[(record, class_id)]
    w = retrieval._area_resize(mask, f.shape[:2])  # pylint: disable=protected-access
    return _unit((f * w[..., None]).sum((0, 1)) / max(float(w.sum()), 1e-6))

  def shares(self, a: int, b: int) -> tuple[bool, bool, int]:
    ca, cb = self.cats[a], self.cats[b]
    return ca.shape == cb.shape, ca.texture == cb.texture, len(set(ca.colours) & set(cb.colours))


def attributes_table(d: Demo, draws: int = 3) -> str:
  rng = np.random.default_rng(0)
  groups: dict = {}
  for e, ep in enumerate(d.eps):
    c, q = ep.class_id, ep.query
    for name, keep in (("the shape", lambda s: s[0]), ("the texture", lambda s: s[1]),
                       ("neither", lambda s: not (s[0] or s[1]))):
      cands = [(int(r), b) for b in d.base if keep(d.shares(c, b))
               for r in d.src.images_with_class(b) if int(r) != q]
      for _ in range(draws):
        r, b = cands[rng.integers(len(cands))]
        groups.setdefault(name, []).append((e, r, b))
  rows = ["| support class shares | all | 0 colours | 1 colour | 2+ colours |",
          "|---|---|---|---|---|"]
  every = {k: [] for k in range(3)}
  for name, items in groups.items():
    by = {k: [it for it in items if min(d.shares(d.eps[it[0]].class_id, it[2])[2], 2) == k]
          for k in range(3)}
    for k in by:
      every[k] += by[k]
    rows.append(f"| {name} | {d.miou(items):.1f} | " + " | ".join(
        f"{d.miou(by[k]):.1f}" for k in range(3)) + " |")
  rows.append("| any | " + f"{d.miou(sum(groups.values(), [])):.1f} | " + " | ".join(
      f"{d.miou(every[k]):.1f}" for k in range(3)) + " |")
  return "\n".join(rows)


def features_table(d: Demo) -> str:
  keys = sorted(d.masks)
  cls = np.array([c for _, c in keys])
  rows = ["| tap | size | same class | same shape | same texture | neither | r(colour) |",
          "|---|---|---|---|---|---|---|"]
  colour = _unit(np.stack([d.images[r][d.masks[(r, c)] == 1].mean(0) for r, c in keys]))
  shape = np.array([d.cats[c].shape for c in cls])
  texture = np.array([d.cats[c].texture for c in cls])
  same = cls[:, None] == cls[None]
  s_shape = (shape[:, None] == shape[None]) & ~same
  s_texture = (texture[:, None] == texture[None]) & ~same
  neither = ~(s_shape | s_texture | same)
  np.fill_diagonal(same, False)
  colour_sim = colour @ colour.T
  for level, f in enumerate(d.taps):
    sim = np.stack([d.pooled(level, r, c) for r, c in keys])
    sim = sim @ sim.T
    r = np.corrcoef(sim[neither], colour_sim[neither])[0, 1]
    rows.append(f"| {level} | {f.shape[1]}x{f.shape[2]}x{f.shape[3]} | {sim[same].mean():.2f} | "
                f"{sim[s_shape].mean():.2f} | {sim[s_texture].mean():.2f} | "
                f"{sim[neither].mean():.2f} | {r:.2f} |")
  return "\n".join(rows)


def rankings(d: Demo, cache_dir: str | None) -> dict[str, dict[int, list[int]]]:
  from fssjax.priors import llm as llm_lib  # pylint: disable=import-outside-toplevel
  desc = {c["name"]: c["description"] for c in describe.describe_synthetic()["classes"]}
  base = [d.names[b] for b in d.base]
  novel = [d.names[c] for c in d.novel]
  kinds = {"random": dict(method="random"),
           "embedding, paragraph": dict(method="embedding", match="paragraph"),
           "embedding, sentences": dict(method="embedding", match="sentences"),
           "llm_score": dict(method="llm_score")}
  out = {}
  for name, kw in kinds.items():
    if kw["method"] == "llm_score":
      kw["client"] = llm_lib.LLMClient.from_config({"backend": "local"})
    ranker = related.make_ranker(kw.pop("method"), base, descriptions=desc, cache_dir=cache_dir,
                                 **kw)
    out[name] = related.to_class_ids(ranker.rank_many(novel, top_k=3), d.names)
  return out


def rankings_table(d: Demo, ranks) -> str:
  rows = ["| novel class (palette) | " + " | ".join(ranks) + " |", "|---|" + "---|" * len(ranks)]

  def tag(c, b):
    s, t, k = d.shares(c, b)
    return f"{d.names[b]} {('S' if s else '') + ('T' if t else '') or '-'}{k}"

  for c in d.novel:
    rows.append(f"| {d.names[c]} ({'/'.join(d.cats[c].colours)}) | " + " | ".join(
        ", ".join(tag(c, b) for b in r[c][:3]) for r in ranks.values()) + " |")
  summary = []
  for r in ranks.values():
    s = [d.shares(c, b) for c in d.novel for b in r[c][:3]]
    summary.append(f"shape {np.mean([x[0] for x in s]):.0%}, texture "
                   f"{np.mean([x[1] for x in s]):.0%}, colours {np.mean([x[2] for x in s]):.2f}")
  rows.append("| **top 3, all classes** | " + " | ".join(summary) + " |")
  return "\n".join(rows)


def choice_table(d: Demo, ranks) -> str:
  embed = jax.jit(lambda x: d.method.image_features(d.params, d.frozen, x))
  bank = retrieval.FeatureBank(d.src, embed, d.spec, batch_size=32)
  deepest = _unit(d.taps[-1].mean((1, 2)))

  def choose(rule, e, cands):
    ep = d.eps[e]
    records = np.array([r for r, _ in cands])
    if rule == "first version (global, deepest tap)":
      sims = deepest[records] @ deepest[ep.query]
    elif rule == "oracle (query's true object)":
      tap = next(i for i, f in enumerate(d.taps) if f.shape[1:3] == embed_shape)
      sims = np.stack([d.pooled(tap, r, b) for r, b in cands]) @ d.pooled(
          tap, ep.query, ep.class_id)
    else:
      policy = retrieval.RelatedClassSupports(d.src, {}, bank, similarity=rule)
      sims = policy.scores(ep.query, cands, ep.class_id)
    return cands[int(np.lexsort((records, -sims))[0])]

  embed_shape = tuple(np.asarray(embed(d.images[:1])).shape[1:3])
  rules = ["first version (global, deepest tap)", "global", "foreground",
           "oracle (query's true object)"]
  rows = ["| ranker (top_r=3 / top_r=1) | " + " | ".join(rules) + " |",
          "|---|" + "---|" * len(rules)]
  chosen = {}
  for name, r in ranks.items():
    cells = []
    for rule in rules:
      cell = []
      for top_r in (3, 1):
        policy = retrieval.RelatedClassSupports(d.src, r, bank, top_r=top_r)
        items = [(e, *choose(rule, e, policy.candidates(ep.class_id, ep.query)))
                 for e, ep in enumerate(d.eps)]
        chosen[(name, rule, top_r)] = items
        cell.append(f"{d.miou(items):.1f}")
      cells.append(" / ".join(cell))
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
  rng = np.random.default_rng(0)
  weights = [np.bincount(rng.integers(0, len(d.eps), len(d.eps)), minlength=len(d.eps))
             for _ in range(1000)]
  rows += ["", "Paired bootstrap over episodes (1000 resamples), ranker minus random, 95%:", ""]
  for rule in ("global", "foreground"):
    for top_r in (3, 1):
      base = chosen[("random", rule, top_r)]
      for name in ranks:
        if name == "random":
          continue
        items = chosen[(name, rule, top_r)]
        diff = np.array([d.miou(items, w) - d.miou(base, w) for w in weights])
        rows.append(f"- {rule}, top_r={top_r}, {name}: {d.miou(items) - d.miou(base):+.1f} "
                    f"[{np.percentile(diff, 2.5):+.1f}, {np.percentile(diff, 97.5):+.1f}]")
  return "\n".join(rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/retrieval_demo",
                      help="a trained run of configs/retrieval_coco.py:demo")
  parser.add_argument("--config_arg", default="demo", help="configs/retrieval_coco.py argument")
  parser.add_argument("--related_cache", default=None, help="related-class result cache dir")
  parser.add_argument("--out", default=None, help="also write the tables as JSON here")
  args = parser.parse_args(argv)
  start = time.time()
  d = Demo(args.workdir, args.config_arg)
  tables = {}
  ranks = rankings(d, args.related_cache)
  for name, fn in (("1. attributes", lambda: attributes_table(d)),
                   ("2. features", lambda: features_table(d)),
                   ("3. rankings", lambda: rankings_table(d, ranks)),
                   ("4. choice", lambda: choice_table(d, ranks))):
    tables[name] = fn()
    print(f"\n## {name} ({time.time() - start:.0f} s)\n\n{tables[name]}", flush=True)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(tables, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
