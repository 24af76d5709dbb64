"""Results files: one JSON file per evaluation, collectable across a sweep.

`write(outdir, mode=..., step=..., results=..., config=...)` writes

  {outdir}/results/{mode}_fold{fold}_shot{shot}_step{step}.json

(mode 'train' or 'eval'; an evaluator other than the default 'fewshot' adds `_{name}` before
`.json`, and an evaluation setting of `NAME_TAGS` off its default adds its value, e.g.
`_description` for `candidates='description'`). A file is never overwritten: when the name exists, the next free of `-2`, `-3`, ...
is used (`train_fold0_shot1_step1000-2.json`). Files are written atomically (a temporary file
in the same directory, then a hard link to the final name, which fails instead of replacing an
existing file) and are readable by everyone (mode 0644).

Content (keys always present; null where an evaluator has no such number):

  {"mode", "method", "benchmark", "fold", "shot", "step", "evaluator", "name",
   "miou", "fbiou", "miou_all_classes", "baseline_miou", "baseline_fbiou",
   "num_episodes", "left_out_classes", "support_empty", "masks_resized", "wall_time_s",
   "protocol": {"episodes", "resolution", "manifest_sha256", "test_seed", "kshot", ...},
   "config": {flattened config}, "per_class_iou": {class id: IoU x 100},
   "class_names": {class id: name}, "dense": {macc, fwiou, pixel_acc, n_images, ...} | null,
   "warnings": [...], "fssjax_results_version": 1}

`read(path)` and `collect(outdir)` read them back.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from typing import Any, Mapping, Sequence

from fssjax import monitoring

VERSION = 1
MODES = ("train", "eval")
FILE_MODE = 0o644
DEFAULT_EVALUATOR = "fewshot"
_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


# Evaluation settings named in the file name when they differ from their default (so that,
# e.g., a description-candidates evaluation is told apart from the default one by its name).
NAME_TAGS = {"candidates": "dataset"}


def file_stem(mode: str, fold: int, shot: int, step: int, evaluator: str = DEFAULT_EVALUATOR,
              tags: Sequence[str] = ()) -> str:
  """'train_fold0_shot1_step1000' (plus '_{evaluator}' for a non-default evaluator, then
  '_{tag}' for each tag, e.g. 'description' for `candidates='description'`)."""
  if mode not in MODES:
    raise ValueError(f"results mode {mode!r}; expected one of {list(MODES)}")
  stem = f"{mode}_fold{int(fold)}_shot{int(shot)}_step{int(step)}"
  if evaluator and evaluator != DEFAULT_EVALUATOR:
    if not _NAME.match(evaluator):
      raise ValueError(f"evaluator name {evaluator!r} is not usable in a file name "
                       "(letters, digits, '_' and '.')")
    stem += f"_{evaluator}"
  for tag in tags:
    if not _NAME.match(str(tag)):
      raise ValueError(f"results file tag {tag!r} is not usable in a file name")
    stem += f"_{tag}"
  return stem


def build_record(*, mode: str, step: int, results: Mapping[str, Any], config,
                 method: str = "", warnings: Sequence[str] = ()) -> dict:
  """The JSON document of one evaluator's results (see the module docstring)."""
  protocol = dict(results.get("protocol") or {})
  data = config.data if config is not None and "data" in config else {}
  fold = protocol.get("fold", data.get("fold") if data else None)
  shot = protocol.get("kshot", results.get("shots", data.get("shot") if data else None))
  kind = results.get("evaluator", "episodic")
  left_out = list(results.get("left_out_classes") or [])
  names = results.get("class_names") or {}
  notes = list(warnings)
  if left_out:
    notes.append(f"{len(left_out)} fold classes left out (fewer than K + 1 images): "
                 + ", ".join(f"{c} {names.get(c, '')}".strip() for c in left_out)
                 + "; miou averages over the others, miou_all_classes over all")
  if results.get("support_empty"):
    notes.append(f"{results['support_empty']} support masks were empty at the check size")
  if results.get("masks_resized"):
    notes.append(f"{results['masks_resized']} masks differed in size from their image and "
                 "were resized (nearest)")
  dense = None
  if kind == "dense":
    dense = {k: results.get(k) for k in ("macc", "fwiou", "pixel_acc", "n_images",
                                         "n_classes_present", "predicted_not_present",
                                         "ignore_label")}
  per_class = results.get("per_class_iou") or {}
  record = dict(
      fssjax_results_version=VERSION,
      mode=mode,
      method=method or (config.get("method", "") if config is not None else ""),
      benchmark=protocol.get("benchmark", protocol.get("dataset")),
      fold=fold,
      shot=shot,
      step=int(step),
      evaluator=kind,
      name=results.get("name", DEFAULT_EVALUATOR),
      miou=results.get("miou"),
      fbiou=results.get("fbiou"),
      miou_all_classes=results.get("miou_all_classes"),
      baseline_miou=results.get("baseline_miou"),
      baseline_fbiou=results.get("baseline_fbiou"),
      num_episodes=results.get("n_episodes"),
      left_out_classes=left_out,
      support_empty=results.get("support_empty"),
      masks_resized=results.get("masks_resized"),
      wall_time_s=results.get("wall_time_s"),
      protocol=dict(protocol, episodes=protocol.get("episodes"),
                    resolution=protocol.get("resolution", results.get("resolution")),
                    manifest_sha256=protocol.get("manifest_sha256"),
                    test_seed=protocol.get("test_seed"), kshot=protocol.get("kshot", shot)),
      config=monitoring.flatten_config(config) if config is not None else {},
      per_class_iou=per_class,
      class_names=names,
      dense=dense,
      warnings=notes,
  )
  return monitoring.jsonable(record)


def _link_exclusive(tmp: str, path: str) -> bool:
  """Publishes `tmp` at `path` unless `path` exists; True on success."""
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError:  # no hard links on this file system: exclusive create, then replace
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
    except FileExistsError:
      return False
    os.close(fd)
    os.replace(tmp, path)
    return True


def write_record(directory: str, stem: str, record: Mapping[str, Any]) -> str:
  """Writes `record` as `{directory}/{stem}.json` (or `-2`, `-3`, ... if taken); returns the
  path. Atomic, never overwrites, mode 0644."""
  os.makedirs(directory, exist_ok=True)
  blob = json.dumps(record, indent=1, sort_keys=False, allow_nan=False).encode("utf-8")
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
      f.flush()
      os.fchmod(f.fileno(), FILE_MODE)
      os.fsync(f.fileno())
    n = 1
    while True:
      path = os.path.join(directory, f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
      if _link_exclusive(tmp, path):
        return path
      n += 1
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def write(outdir: str, *, mode: str, step: int, results: Mapping[str, Any], config,
          method: str = "", warnings: Sequence[str] = ()) -> str:
  """Writes one evaluator's results under `{outdir}/results/` and returns the file's path.

  Args:
    outdir: the run's output directory (the work directory, or the directory the user named
      for evaluation results).
    mode: 'train' (evaluation during training) or 'eval' (`--mode=eval`).
    step: the training step of the evaluated parameters.
    results: one evaluator's results (`fssjax.evaluators`), with 'protocol'.
    config: the run's config (stored flattened).
    method: the method name (default `config.method`).
    warnings: lines to keep with the result (for example: evaluated on a fold whose test
      classes the checkpoint trained on).
  """
  record = build_record(mode=mode, step=step, results=results, config=config, method=method,
                        warnings=warnings)
  protocol = record.get("protocol") or {}
  tags = [str(protocol[k]) for k, default in NAME_TAGS.items()
          if protocol.get(k) not in (None, default)]
  stem = file_stem(mode, record["fold"] if record["fold"] is not None else -1,
                   record["shot"] if record["shot"] is not None else 0, step, record["name"],
                   tags)
  return write_record(os.path.join(outdir, "results"), stem, record)


def read(path: str) -> dict:
  """One results file."""
  with open(path) as f:
    return json.load(f)


def collect(outdir: str) -> list[dict]:
  """Every results file under `{outdir}/results/` (or `outdir` itself), sorted by name, each
  with its 'path'."""
  directory = os.path.join(outdir, "results")
  if not os.path.isdir(directory):
    directory = outdir
  out = []
  for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
    record = read(path)
    record["path"] = path
    out.append(record)
  return out
