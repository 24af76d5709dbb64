r"""One results table over the runs of a sweep.

  python -m launch.collect runs/NAME

reads every run of `runs/NAME` (the points of its `sweep.json`, else every sub-directory with
results or a run record) and writes, in `runs/NAME`:

  results.csv          one row per run (and per final results file of that run: mode,
                       evaluator, fold, shot): its overrides, mIoU, FB-IoU, the all-foreground
                       baseline (mIoU, FB-IoU), step, wall time, episodes, status, log;
  results_summary.csv  mean, standard deviation (n - 1) and count of mIoU / FB-IoU over the
                       seeds and folds (override keys whose last part is `seed` or `fold`,
                       and the results' own fold), per setting of the other overrides;
  results.md           both tables in Markdown, plus failed / unfinished runs with their logs;
  tensorboard/         one TensorBoard run per sweep run with its overrides as hparams and
                       the metrics as scalars, and the experiment's hparams config, so that
                       `tensorboard --logdir runs/NAME/tensorboard` compares the runs in the
                       HParams view.

Values come from the runs' results files (`launch.results.read_results`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Any, Mapping, Sequence

from launch import results as results_lib

METRIC_COLUMNS = ("miou", "fbiou", "baseline_miou", "baseline_fbiou")
FIXED_COLUMNS = ("run", "status", "mode", "evaluator", "fold", "shot", "step") + \
    METRIC_COLUMNS + ("num_episodes", "wall_time_s", "eval_time_s", "log")
AVERAGED = ("seed", "fold")


def _runs(sweep_dir: str) -> list[dict]:
  """[{name, workdir, overrides}] of the sweep, in sweep order."""
  path = os.path.join(sweep_dir, "sweep.json")
  runs: dict[str, dict] = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for p in json.load(f).get("points", []):
        runs[p["name"]] = dict(name=p["name"], workdir=p["workdir"],
                               overrides=p.get("overrides") or {}, log=p.get("log", ""))
  for entry in sorted(os.listdir(sweep_dir)):
    d = os.path.join(sweep_dir, entry)
    if entry in runs or not os.path.isdir(d) or entry in ("logs", "tensorboard"):
      continue
    if (os.path.exists(os.path.join(d, results_lib.RUN_RECORD)) or
        os.path.isdir(os.path.join(d, results_lib.RESULTS_DIR)) or
        os.path.exists(os.path.join(d, "results.json"))):
      rec = results_lib.read_record(d)
      runs[entry] = dict(name=entry, workdir=d, overrides=rec.get("overrides") or {}, log="")
  for r in runs.values():
    if not os.path.isdir(r["workdir"]):  # a moved sweep directory: use the local copy
      r["workdir"] = os.path.join(sweep_dir, r["name"])
  return list(runs.values())


def collect_rows(sweep_dir: str) -> tuple[list[dict], list[str]]:
  """(rows, override keys): one row per run and final results record."""
  rows, keys = [], []
  for run in _runs(sweep_dir):
    for k in run["overrides"]:
      if k not in keys:
        keys.append(k)
    rec = results_lib.read_record(run["workdir"])
    status = rec.get("status") or ("done" if results_lib.read_results(run["workdir"])
                                   else "not started")
    log = (rec.get("logs") or {}).get("stderr") or run.get("log", "")
    base = dict(run=run["name"], status=status, log=log, workdir=run["workdir"],
                error=rec.get("error") or "", overrides=run["overrides"])
    records = results_lib.read_results(run["workdir"]) if os.path.isdir(run["workdir"]) else []
    if not records:
      rows.append(dict(base))
      continue
    for r in records:
      row = dict(base)
      # wall_time_s: the whole run (all attempts, from the run record) when the launcher ran
      # it, else the results file's; eval_time_s: the results file's evaluation time.
      row.update(mode=r.get("mode"), evaluator=r.get("name") or r.get("evaluator"),
                 fold=r.get("fold"),
                 shot=r.get("shot"), step=r.get("step"), num_episodes=r.get("num_episodes"),
                 wall_time_s=rec.get("wall_time_s") if rec.get("wall_time_s") is not None
                 else r.get("wall_time_s"),
                 eval_time_s=r.get("wall_time_s"), results_file=r.get("path"))
      for m in METRIC_COLUMNS:
        row[m] = r.get(m)
      rows.append(row)
  return rows, keys


def _fmt(v: Any) -> str:
  """Metrics: 2 decimals."""
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.2f}" if math.isfinite(v) else str(v)
  return str(v)


class _Setting:
  """An override value in a table: shown exactly (1e-3 stays 0.001, not 0.00)."""

  def __init__(self, v: Any):
    self.v = v

  def __str__(self) -> str:
    if self.v is None:
      return ""
    return f"{self.v:g}" if isinstance(self.v, float) else str(self.v)


def varying_keys(rows: Sequence[dict], keys: Sequence[str]) -> list[str]:
  """The override keys whose value differs between runs (the others are the same for all)."""
  out = []
  for k in keys:
    values = {json.dumps(r["overrides"].get(k), sort_keys=True, default=str) for r in rows}
    if len(values) > 1:
      out.append(k)
  return out


def summarize(rows: Sequence[dict], keys: Sequence[str]) -> tuple[list[dict], list[str]]:
  """Mean / std / n of the metrics over seeds and folds, per setting of the other keys."""
  group_keys = [k for k in varying_keys(rows, keys) if k.split(".")[-1] not in AVERAGED]
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    if row.get("miou") is None:
      continue
    key = tuple(json.dumps(row["overrides"].get(k), default=str) for k in group_keys) + (
        row.get("mode"), row.get("evaluator"), row.get("shot"))
    groups.setdefault(key, []).append(row)
  out = []
  for key, members in groups.items():
    first = members[0]
    s = {k: first["overrides"].get(k) for k in group_keys}
    s.update(mode=first.get("mode"), evaluator=first.get("evaluator"), shot=first.get("shot"),
             n=len(members), runs=" ".join(m["run"] for m in members))
    for m in ("miou", "fbiou", "baseline_miou"):
      values = [float(x[m]) for x in members if x.get(m) is not None]
      s[f"{m}_mean"] = statistics.fmean(values) if values else None
      s[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else None
    out.append(s)
  return out, group_keys


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  from fssjax import utils  # pylint: disable=g-import-not-at-top
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(header)
  for r in rows:
    w.writerow(["" if v is None else v for v in r])
  utils.atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in r) + " |")
  return "\n".join(lines)


def write_tables(sweep_dir: str, rows: Sequence[dict], keys: Sequence[str]) -> dict[str, str]:
  """Writes results.csv, results_summary.csv and results.md; returns their paths."""
  from fssjax import utils  # pylint: disable=g-import-not-at-top
  header = ["run"] + list(keys) + [c for c in FIXED_COLUMNS if c != "run"]
  table = [[row.get("run")] + [row["overrides"].get(k) for k in keys] +
           [row.get(c) for c in FIXED_COLUMNS if c != "run"] for row in rows]
  paths = dict(csv=os.path.join(sweep_dir, "results.csv"),
               summary_csv=os.path.join(sweep_dir, "results_summary.csv"),
               md=os.path.join(sweep_dir, "results.md"))
  _write_csv(paths["csv"], header, table)
  summary, group_keys = summarize(rows, keys)
  s_header = list(group_keys) + ["mode", "evaluator", "shot", "n", "miou_mean", "miou_std",
                                 "fbiou_mean", "fbiou_std", "baseline_miou_mean", "runs"]
  s_rows = [[s.get(c) for c in s_header] for s in summary]
  _write_csv(paths["summary_csv"], s_header, s_rows)

  shown = varying_keys(rows, keys)
  same = {k: rows[0]["overrides"].get(k) for k in keys if k not in shown}
  md_header = ["run"] + shown + ["mode", "fold", "shot", "step", "mIoU", "FB-IoU",
                                 "all-fg mIoU", "all-fg FB-IoU", "wall time (s)"]
  md_rows = [[row.get("run")] + [_Setting(row["overrides"].get(k)) for k in shown] +
             [row.get("mode"), row.get("fold"), row.get("shot"), row.get("step"),
              row.get("miou"), row.get("fbiou"), row.get("baseline_miou"),
              row.get("baseline_fbiou"),
              round(row["wall_time_s"], 1) if row.get("wall_time_s") is not None else None]
             for row in rows if row.get("miou") is not None]
  over = " and ".join(f"{a}s" for a in AVERAGED)
  parts = [f"# Results of {os.path.basename(os.path.abspath(sweep_dir))}", "",
           f"{len({r['run'] for r in rows})} runs; collected {time.strftime('%Y-%m-%d %H:%M')}"
           " from their results files. mIoU / FB-IoU in %; all-fg = the all-foreground "
           "prediction; wall time: the whole run (all attempts)."] + (
               ["", "Same in every run: " + ", ".join(f"`{k}={_Setting(v)}`"
                                                      for k, v in same.items()) + "."]
               if same else []) + ["", "## Runs", "", _md_table(md_header, md_rows), "",
           f"## Mean and spread over {over}", "",
           "std: sample standard deviation (n - 1); empty when n = 1.", "",
           _md_table(list(group_keys) + ["mode", "shot", "n", "mIoU mean", "mIoU std",
                                         "FB-IoU mean", "FB-IoU std", "all-fg mIoU"],
                     [[_Setting(s.get(k)) for k in group_keys] +
                      [s["mode"], s["shot"], s["n"], s["miou_mean"], s["miou_std"],
                       s["fbiou_mean"], s["fbiou_std"], s["baseline_miou_mean"]]
                      for s in summary])]
  missing = [r for r in rows if r.get("miou") is None]
  if missing:
    parts += ["", "## Without results", ""]
    for r in missing:
      err = f" -- {r['error']}" if r.get("error") else ""
      log = f" (log: {r['log']})" if r.get("log") else ""
      parts.append(f"- {r['run']}: {r['status']}{err}{log}")
  utils.atomic_write_bytes(paths["md"], ("\n".join(parts) + "\n").encode("utf-8"))
  return paths


# ----------------------------------------------------------------------------------------
# TensorBoard hparams.


def _hparam_value(v: Any) -> Any:
  if isinstance(v, (bool, int, float, str)):
    return v
  return json.dumps(v, default=str)


def write_hparams(sweep_dir: str, rows: Sequence[dict], keys: Sequence[str]) -> str:
  """TensorBoard HParams data: `sweep_dir/tensorboard/<run>` per row with results.

  Written with the `tensorboard` package's protos and event-file writer (no TensorFlow).
  Returns the log directory (replaced on every collect).
  """
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import summary_v2 as hp  # pylint: disable=g-import-not-at-top
  from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top

  logdir = os.path.join(sweep_dir, "tensorboard")
  if os.path.isdir(logdir):
    shutil.rmtree(logdir)
  os.makedirs(logdir)
  done = [r for r in rows if r.get("miou") is not None]
  extra = ["mode", "shot", "fold"]
  values: dict[str, list] = {}
  for r in done:
    for k in keys:
      values.setdefault(k, []).append(_hparam_value(r["overrides"].get(k)))
    for k in extra:
      values.setdefault(k, []).append(_hparam_value(r.get(k)))
  hparams = []
  for k, vs in values.items():
    distinct = sorted({v for v in vs if v is not None}, key=lambda x: (str(type(x)), x))
    types = {type(v) for v in distinct}
    domain = hp.Discrete(distinct) if distinct and len(types) == 1 else None
    hparams.append(hp.HParam(k, domain))
  metrics = [hp.Metric(f"results/{m}", display_name=m) for m in METRIC_COLUMNS] + [
      hp.Metric("results/wall_time_s", display_name="wall time (s)")]

  def write(directory: str, summary, step: int = 0) -> None:
    w = EventFileWriter(directory)
    w.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    w.close()

  write(logdir, hp.hparams_config_pb(hparams, metrics))
  for r in done:
    name = r["run"] if r.get("mode") in (None, "train") else \
        f"{r['run']}/{r['mode']}_shot{r.get('shot')}"
    run_dir = os.path.join(logdir, name)
    hv = {k: _hparam_value(r["overrides"].get(k)) for k in keys
          if r["overrides"].get(k) is not None}
    hv.update({k: _hparam_value(r.get(k)) for k in extra if r.get(k) is not None})
    w = EventFileWriter(run_dir)
    w.add_event(event_pb2.Event(wall_time=time.time(), step=0,
                                summary=hp.hparams_pb(hv, trial_id=name)))
    scalars = [summary_pb2.Summary.Value(tag=f"results/{m}", simple_value=float(r[m]))
               for m in METRIC_COLUMNS if r.get(m) is not None]
    if r.get("wall_time_s") is not None:
      scalars.append(summary_pb2.Summary.Value(tag="results/wall_time_s",
                                               simple_value=float(r["wall_time_s"])))
    w.add_event(event_pb2.Event(wall_time=time.time(), step=int(r.get("step") or 0),
                                summary=summary_pb2.Summary(value=scalars)))
    w.close()
  return logdir


def collect(sweep_dir: str, *, tensorboard: bool = True) -> dict:
  """Writes the tables (and TensorBoard hparams) of `sweep_dir`; returns rows and paths."""
  sweep_dir = os.path.abspath(sweep_dir)
  if not os.path.isdir(sweep_dir):
    raise FileNotFoundError(f"Sweep directory {sweep_dir} does not exist")
  rows, keys = collect_rows(sweep_dir)
  if not rows:
    raise FileNotFoundError(f"{sweep_dir} holds no runs (no sweep.json, no run directories "
                            "with results or launch.json)")
  paths = write_tables(sweep_dir, rows, keys)
  if tensorboard:
    paths["tensorboard"] = write_hparams(sweep_dir, rows, keys)
  summary, _ = summarize(rows, keys)
  return dict(rows=rows, keys=keys, summary=summary, paths=paths)


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m launch.collect", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweep_dir", help="the --workdir of launch.run")
  parser.add_argument("--no_tensorboard", action="store_true",
                      help="skip the TensorBoard hparams")
  args = parser.parse_args(argv)
  try:
    out = collect(args.sweep_dir, tensorboard=not args.no_tensorboard)
  except FileNotFoundError as e:
    print(f"collect: {e}", file=sys.stderr)
    return 2
  with open(out["paths"]["md"], encoding="utf-8") as f:
    print(f.read())
  print("Wrote " + ", ".join(out["paths"].values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
