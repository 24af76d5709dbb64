"""Support selection as a policy: the ranker interface of the test-episode sampler.

`fssjax.data.episodes.test_episodes(..., policy='ranked', ranker=r)` keeps the benchmark's
rule for each episode's class and query and asks `r.supports(class_id, query, shot, rng)` for
the K supports: (record index, class id of the support's mask) pairs in the test source. The
sampler checks the answer (K pairs, records and classes in range, none the query's own image,
no image twice) and records the classes in `Episode.support_classes` (None when every support
is of the query's class); the data pipeline then loads each support's mask for its own class.

A ranker can choose supports of the episode's class by a score (retrieval by similarity to the
query, as LLM-guided support retrieval does) or of related classes (the names ranked by
`fssjax.priors.related`). It must be deterministic given its arguments: `rng` is the episode's
own generator (a pure function of the test seed and the episode index), so an episode list is
reproducible on any machine.

`ClassPoolRanker` is the simplest ranker: K distinct random images from an ordered list of
classes per class (the class itself first, then related ones), which also serves as an
example.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class SupportRanker(Protocol):
  """Chooses the supports of one test episode."""

  def supports(self, class_id: int, query: int, shot: int,
               rng: np.random.Generator) -> Sequence[tuple[int, int]]:
    """K (record index, class id of the support's mask) pairs for this query.

    Args:
      class_id: the episode's (query's) class.
      query: the query's record index in the test source.
      shot: K.
      rng: the episode's generator (deterministic per test seed and episode index).
    """


class ClassPoolRanker:
  """Supports drawn from the images of an ordered list of classes.

  For class c the candidate images are those of `pools[c]` (default `[c]`) in order: the
  first class that still has images other than the query's (and than those already chosen)
  gives the next support, drawn uniformly at random with `rng`. With `pools = {}` this is the
  random policy's distribution (not its exact draws).

  Args:
    source: the test source (`images_with_class`, `image_key`/`record_key`).
    pools: class id -> the classes whose images may support it, in order of preference.
  """

  def __init__(self, source, pools: Mapping[int, Sequence[int]] | None = None):
    from fssjax.data.base import image_key  # pylint: disable=import-outside-toplevel
    self._source = source
    self._key = lambda r: image_key(source, r)
    self._pools = {int(c): [int(x) for x in v] for c, v in (pools or {}).items()}

  def supports(self, class_id: int, query: int, shot: int,
               rng: np.random.Generator) -> list[tuple[int, int]]:
    used = {self._key(query)}
    out: list[tuple[int, int]] = []
    for c in self._pools.get(int(class_id), [int(class_id)]):
      while len(out) < shot:
        cands = [int(r) for r in self._source.images_with_class(c) if self._key(int(r)) not in used]
        if not cands:
          break
        r = cands[int(rng.integers(len(cands)))]
        used.add(self._key(r))
        out.append((r, int(c)))
    return out
