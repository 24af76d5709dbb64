"""Reading what a run left in its work directory: results files, the run record, status.

Results files (written by the trainer / evaluator, `fssjax.results`):
`{workdir}/results/{mode}_fold{fold}_shot{shot}_step{step}[_{evaluator name}].json` (mode
train | eval; a second file of the same name gets a `-2`, `-3` suffix, never an overwrite),
JSON with mode, method,
benchmark, fold, shot, step, evaluator, miou, fbiou, miou_all_classes, baseline_miou,
baseline_fbiou, num_episodes, left_out_classes, wall_time_s, protocol {...}, config {...},
per_class_iou {...}, warnings [...].

A work directory written before results files existed has only the trainer's summary
`{workdir}/results.json` ({start_step, step, results: {miou, fbiou, baseline_miou, ...}});
`read_results` turns it into the same record (mode 'train', fold / shot from
`config.json`, wall time from the launcher's run record).

The launcher's run record `{workdir}/launch.json` (`fssjax launch`): name, overrides, status
(running | done | failed | requeued | skipped), attempts, wall_time_s over all attempts, log
paths, the error of a failed attempt.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

RESULTS_DIR = "results"
RUN_RECORD = "launch.json"
_NAME = re.compile(r"^(?P<mode>[A-Za-z]+)_fold(?P<fold>-?\d+)_shot(?P<shot>\d+)_step"
                   r"(?P<step>\d+)(?:_(?P<name>[A-Za-z0-9_.]+?))?(?:-(?P<copy>\d+))?\.json$")
METRICS = ("miou", "fbiou", "baseline_miou", "baseline_fbiou")


def _load_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def results_files(workdir: str) -> list[dict]:
  """Every results file of `workdir` as {path, mode, fold, shot, step, copy}, in order of
  (mode, fold, shot, step, copy)."""
  out = []
  for path in glob.glob(os.path.join(workdir, RESULTS_DIR, "*.json")):
    m = _NAME.match(os.path.basename(path))
    if m:
      out.append(dict(path=path, mode=m["mode"], fold=int(m["fold"]), shot=int(m["shot"]),
                      step=int(m["step"]), name=m["name"] or "", copy=int(m["copy"] or 1)))
  out.sort(key=lambda r: (r["mode"], r["name"], r["fold"], r["shot"], r["step"], r["copy"]))
  return out


def _read_file(path: str) -> dict:
  """One results file, through `fssjax.results.read` when that module provides it."""
  try:
    from fssjax import results as fssjax_results  # pylint: disable=g-import-not-at-top
    return dict(fssjax_results.read(path))
  except (ImportError, AttributeError):
    return _load_json(path)


def read_record(workdir: str) -> dict:
  """The launcher's run record of `workdir` ({} when there is none)."""
  path = os.path.join(workdir, RUN_RECORD)
  if not os.path.exists(path):
    return {}
  try:
    return _load_json(path)
  except (OSError, ValueError):
    return {}


def _legacy(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return []
  out = _load_json(path)
  res = out.get("results") or {}
  if "miou" not in res:
    return []
  config = {}
  if os.path.exists(os.path.join(workdir, "config.json")):
    config = _load_json(os.path.join(workdir, "config.json"))
  data = config.get("data", {})
  record = read_record(workdir)
  return [dict(
      path=path, mode="train", method=config.get("method"), benchmark=data.get("dataset"),
      fold=data.get("fold"), shot=res.get("shots", data.get("shot")), step=out.get("step"),
      evaluator="episodic", name="fewshot", miou=res["miou"], fbiou=res.get("fbiou"),
      baseline_miou=res.get("baseline_miou"), baseline_fbiou=res.get("baseline_fbiou"),
      num_episodes=res.get("n_episodes"), wall_time_s=record.get("wall_time_s"),
      per_class_iou=res.get("per_class_iou", {}))]


def read_results(workdir: str, *, final_only: bool = True) -> list[dict]:
  """The results records of a run (each the file's JSON plus its `path`).

  final_only: keep, per (mode, evaluator, fold, shot), the file of the highest step (the
  newest copy when a step was evaluated twice). Falls back to the trainer's results.json.
  """
  files = results_files(workdir)
  if not files:
    return _legacy(workdir)
  records = []
  for f in files:
    rec = _read_file(f["path"])
    rec.setdefault("mode", f["mode"])
    rec.setdefault("fold", f["fold"])
    rec.setdefault("shot", f["shot"])
    rec.setdefault("step", f["step"])
    rec["path"] = f["path"]
    rec["_order"] = (f["step"], f["copy"])
    records.append(rec)
  if final_only:
    best: dict[tuple, dict] = {}
    for rec in records:
      key = (rec["mode"], rec.get("name") or rec.get("evaluator"), rec["fold"], rec["shot"])
      if key not in best or rec["_order"] > best[key]["_order"]:
        best[key] = rec
    records = list(best.values())
  for rec in records:
    rec.pop("_order", None)
  return records


def finished(workdir: str, num_steps: int) -> bool:
  """Whether a training run of `num_steps` steps finished in `workdir`: a train results file
  of step >= num_steps, or the trainer's results.json at that step."""
  for f in results_files(workdir):
    if f["mode"] == "train" and f["step"] >= num_steps:
      return True
  path = os.path.join(workdir, "results.json")
  if os.path.exists(path):
    try:
      return int(_load_json(path).get("step", -1)) >= num_steps
    except (OSError, ValueError, TypeError):
      return False
  return False
