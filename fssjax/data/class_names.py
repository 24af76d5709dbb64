"""Class names (with synonyms) of the open-vocabulary semantic segmentation benchmarks.

One documented source for every set: FC-CLIP's prompt-engineered class lists
(`bytedance/fc-clip`, `fcclip/data/datasets/*_with_prompt_eng.txt`, Apache-2.0; Yu et al.,
NeurIPS 2023), shipped unchanged in `fssjax/data/class_names/` (see the README.md there for
the commit and the licence). The same lists are used by the open-vocabulary methods that build
on detectron2 (FC-CLIP, and through it SAN / ODISE), so class k here is the class of label
value k in the label maps that detectron2-style preparation scripts write.

  names = class_names("ade20k_150")          # ('wall', 'building', ..., 'flag'): first names
  syn = class_synonyms("ade20k_150")         # (('wall', 'walls', 'brick wall', ...), ...)
  prompts = class_prompts("pascal_voc_20")   # 'aeroplane, airplane, aeroplanes, airplanes'

Benchmarks (`BENCHMARKS`): coco_stuff_171, ade20k_150, ade20k_847, pascal_context_59,
pascal_context_459, pascal_voc_20 (VOC-21 without its background line). A method that
classifies against text embeddings usually embeds every synonym and averages (FC-CLIP) or
takes the maximum over synonyms; `class_synonyms` gives them all.
"""

from __future__ import annotations

import functools
import os

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "class_names")

# benchmark -> (file, number of classes)
_FILES = {
    "coco_stuff_171": ("coco_stuff_with_prompt_eng.txt", 171),
    "ade20k_150": ("ade20k_150_with_prompt_eng.txt", 150),
    "ade20k_847": ("ade20k_847_with_prompt_eng.txt", 847),
    "pascal_context_59": ("pascal_ctx_59_with_prompt_eng.txt", 59),
    "pascal_context_459": ("pascal_ctx_459_with_prompt_eng.txt", 459),
    "pascal_voc_20": ("pascal_voc_21_with_prompt_eng.txt", 20),
}
BENCHMARKS = tuple(_FILES)
SOURCE = ("FC-CLIP (bytedance/fc-clip, fcclip/data/datasets/*_with_prompt_eng.txt, commit "
          "a8dc32c8, Apache-2.0)")


def _check(benchmark: str) -> tuple[str, int]:
  if benchmark not in _FILES:
    raise ValueError(f"Unknown benchmark {benchmark!r}; class names exist for {list(BENCHMARKS)}")
  return _FILES[benchmark]


def parse(text: str, path: str = "<text>") -> list[tuple[int, tuple[str, ...]]]:
  """Parses FC-CLIP's `<id>:<name>[,<synonym>...]` lines into (id, names) pairs, in file order.

  Lines `<id>:invalid_class_id` and blank lines are skipped; names are stripped of surrounding
  white space (FC-CLIP's ADE lists have some trailing blanks) and empty names dropped.

  Raises:
    ValueError: a line without ':' or with a non-integer id (naming the file and line).
  """
  out = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    idx, sep, names = line.partition(":")
    try:
      i = int(idx)
    except ValueError:
      i = None
    if not sep or i is None:
      raise ValueError(f"{path} line {n}: {line!r} is not '<id>:<name>[,<synonym>...]'")
    if names.strip() == "invalid_class_id":
      continue
    out.append((i, tuple(s.strip() for s in names.split(",") if s.strip())))
  return out


@functools.lru_cache(maxsize=None)
def class_synonyms(benchmark: str) -> tuple[tuple[str, ...], ...]:
  """All names of each class of `benchmark`, class 0 first (the first name is the class name).

  Raises:
    ValueError: unknown benchmark, or a shipped file whose class count is not the benchmark's.
  """
  fname, count = _check(benchmark)
  path = os.path.join(DATA_DIR, fname)
  with open(path, encoding="utf-8") as f:
    entries = parse(f.read(), path)
  if benchmark == "pascal_voc_20":
    entries = [e for e in entries if e[0] != 0]  # VOC-21's background
  if len(entries) != count:
    raise ValueError(f"{path}: {len(entries)} classes, expected {count} for {benchmark}")
  return tuple(names for _, names in entries)


def class_names(benchmark: str) -> tuple[str, ...]:
  """The C class names of `benchmark` (the first name of each line): name k = label value k."""
  return tuple(names[0] for names in class_synonyms(benchmark))


def class_prompts(benchmark: str) -> tuple[str, ...]:
  """Each class's names joined with ', ' (one text per class, for a single text embedding)."""
  return tuple(", ".join(names) for names in class_synonyms(benchmark))


def dataset_ids(benchmark: str) -> tuple[int, ...]:
  """The id of each class in its file (COCO category ids for coco_stuff_171: class k of the
  contiguous 171 has COCO id dataset_ids[k]; 1..C elsewhere)."""
  fname, _ = _check(benchmark)
  path = os.path.join(DATA_DIR, fname)
  with open(path, encoding="utf-8") as f:
    entries = parse(f.read(), path)
  if benchmark == "pascal_voc_20":
    entries = [e for e in entries if e[0] != 0]
  return tuple(i for i, _ in entries)
