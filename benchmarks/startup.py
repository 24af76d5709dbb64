"""Where a demo's start-up goes: time to the first loss, cold and warm, phase by phase.

  python benchmarks/startup.py                       # HSNet and DiffewS demos, cold + warm
  python benchmarks/startup.py --configs configs/hsnet_coco.py:demo --warm_runs=2

For each config: one run with a fresh, empty persistent XLA compilation cache (cold), then
`--warm_runs` runs reusing it (warm). Each run is `fssjax.main` in a child process (this file
with `--child`), instrumented from outside (wrappers installed before `main` runs; nothing in
the library is changed) and stopped at its first loss line (`--config.train.log_every=1`, so
no evaluation runs). Data and index caches are used as they are (a demo generates its
synthetic benchmark on first use: run it once before timing, or pass
`--override=--config.data.root=/tmp/new` to time the generation too).

Phases (start and wall seconds from the child's spawn; process CPU seconds, all threads):
  python+imports     interpreter start and importing jax, flax, optax, clu, grain, fssjax
  eval index         `evaluators.from_config` (indexes the test split)
  train loader       `train.train_loader` (indexes the train split, builds the grain stream)
  first batch        `TrainLoader.batch_at` (the batch built in-process for its shapes)
  setup              `train.build_setup` (eval_shape of init and of the optimiser)
  init               `train.init_state` (jitted shard-first init, results ready)
  step compile (bg)  from `PrecompiledStep` (the step traced and lowered in the main thread)
                     to the end of its XLA compilation in the background; its CPU column is
                     the compile_step thread's own (XLA compiles on its pool threads)
  first step         the first train-step call, from its start to its loss being ready
then the XLA compilations seen by `jax.monitoring` (count and backend seconds, main thread
vs compile_step), persistent-cache hits, the CPU seconds of the busiest threads, and the load
average. On a shared machine wall seconds mostly measure the other jobs: compare CPU seconds
(on 2 idle cores the wall time is at least CPU / 2).

Measured 2026-11-30 on the shared 2-core machine at load 12-16 (CPU seconds to the first loss;
wall times were 4-8x the idle ones and are not comparable between runs):

  demo      cache  before  now   where the CPU goes now
  HSNet     cold   33.4    34.4  step compile ~24 (XLA kernel code generation),
                                 imports 4, step trace 3, init 2.6, setup 0.9
  HSNet     warm   11.0    11.5  imports 4, step trace 3, init 2.4 (not cached:
                                 its pure_callback), cache load 1
  DiffewS   cold   87.8    76.7  step compile ~47 (6432 fusions, ~1080 kernels),
                                 init 22 (was 39), step trace 6.5, imports 4.8
  DiffewS   warm   26.6    28.5  step trace 6.5, executable load ~8, init 5.5

Before (a monkeypatched copy of the old start-up, used once for this table and not kept):
the init compiled at XLA's default -O2 and the step traced in the background thread
while the init was traced (both under the GIL). Now: the init at -O1
(`fssjax.batched_rng.INIT_COMPILER_OPTIONS`, the same values bit for bit) and the step
lowered first, so that its compilation (the longest part) starts before the init's trace.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

DEFAULT_CONFIGS = ("configs/hsnet_coco.py:demo", "configs/diffews_coco.py:demo")
_LOSS = re.compile(r"\[1/\d+\] loss ")
_T0_ENV = "FSSJAX_STARTUP_T0"
_OUT_ENV = "FSSJAX_STARTUP_OUT"


# ----------------------------------------------------------------------------------------
# Child: fssjax.main, instrumented.


def _thread_cpu() -> list:
  """CPU seconds (user + system) of this process's threads, largest first, as [name, tid,
  seconds] (Linux /proc; [] elsewhere). XLA compiles on its own pool threads: this says how
  much of a compilation ran in parallel."""
  out = []
  tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
  try:
    tids = os.listdir("/proc/self/task")
  except OSError:
    return out
  names = {t.native_id: t.name for t in threading.enumerate()}
  for tid in tids:
    try:
      with open(f"/proc/self/task/{tid}/comm") as f:
        name = f.read().strip()
      with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    seconds = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    out.append([names.get(int(tid), name), int(tid), round(seconds, 2)])
  return sorted(out, key=lambda x: -x[2])


def _child(argv: Sequence[str]) -> None:
  t0 = float(os.environ[_T0_ENV])
  out_path = os.environ[_OUT_ENV]
  lock = threading.Lock()
  record: dict = dict(spans=[], compiles=[], cache_hits=0, marks={})

  def now():
    return time.time() - t0, time.process_time()

  def mark(name):
    record["marks"][name] = now()

  mark("interpreter")
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import optax  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import clu.metric_writers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import grain  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from fssjax import main as fmain  # pylint: disable=g-import-not-at-top
  from fssjax import train  # pylint: disable=g-import-not-at-top
  from fssjax import evaluators  # pylint: disable=g-import-not-at-top
  from fssjax.data import pipeline  # pylint: disable=g-import-not-at-top
  mark("imports")

  def listener(event, duration, **kwargs):
    with lock:
      if event == "/jax/core/compile/backend_compile_duration":
        record["compiles"].append(dict(thread=threading.current_thread().name,
                                       fun=str(kwargs.get("fun_name", "")),
                                       seconds=round(duration, 4), end=round(now()[0], 3)))
      record.setdefault("events", []).append(
          (event, threading.current_thread().name, round(duration, 4), round(now()[0], 3)))

  def on_event(event, **kwargs):
    del kwargs
    with lock:
      if event == "/jax/compilation_cache/cache_hits":
        record["cache_hits"] += 1
      record.setdefault("events", []).append(
          (event, threading.current_thread().name, 0, round(now()[0], 3)))

  jax.monitoring.register_event_duration_secs_listener(listener)
  jax.monitoring.register_event_listener(on_event)

  def span(owner, name, label, block=False):
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      start = now()
      out = fn(*args, **kwargs)
      if block:
        jax.block_until_ready(out)
      record["spans"].append(dict(phase=label, start=start, end=now()))
      return out

    setattr(owner, name, wrapped)

  span(evaluators, "from_config", "eval index")
  span(train, "train_loader", "train loader")
  span(pipeline.TrainLoader, "batch_at", "first batch")
  span(train, "build_setup", "setup")
  span(train, "init_state", "init", block=True)

  original_init = train.PrecompiledStep.__init__
  original_call = train.PrecompiledStep.__call__

  def pre_init(self, *args, **kwargs):
    record["marks"]["step compile start"] = now()
    original_init(self, *args, **kwargs)

    def done(_):
      record["step_compile"] = dict(end=now(), thread_cpu=time.thread_time())

    self._future.add_done_callback(done)  # pylint: disable=protected-access

  calls = []

  def pre_call(self, state, frozen, batch, base_lr):
    start = now()
    out = original_call(self, state, frozen, batch, base_lr)
    if not calls:
      jax.block_until_ready(out[1]["loss"])
      record["spans"].append(dict(phase="first step", start=start, end=now()))
    calls.append(1)
    return out

  train.PrecompiledStep.__init__ = pre_init
  train.PrecompiledStep.__call__ = pre_call

  import logging as std_logging  # pylint: disable=g-import-not-at-top

  class FirstLoss(std_logging.Handler):

    def emit(self, rec):
      try:
        message = rec.getMessage()
      except Exception:  # pylint: disable=broad-except
        return
      if _LOSS.search(message):
        mark("first loss")
        record["load_avg"] = list(os.getloadavg())
        record["threads"] = _thread_cpu()
        record["tensorflow_imported"] = "tensorflow" in sys.modules
        import resource  # pylint: disable=g-import-not-at-top
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        record["children_cpu"] = round(children.ru_utime + children.ru_stime, 2)
        with open(out_path, "w") as f:
          json.dump(record, f)
        os._exit(0)  # pylint: disable=protected-access

  std_logging.getLogger().addHandler(FirstLoss())
  sys.argv = [sys.argv[0]] + list(argv)
  fmain.run()
  raise SystemExit("startup benchmark: the run ended without a loss line")


# ----------------------------------------------------------------------------------------
# Parent.


def _dir_size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run_once(config: str, cache: str, timeout: float, overrides: Sequence[str] = ()) -> dict:
  """One instrumented child run; returns its record (see the module docstring)."""
  with tempfile.TemporaryDirectory(prefix="fssjax_startup_") as tmp:
    out = os.path.join(tmp, "record.json")
    workdir = os.path.join(tmp, "run")
    env = dict(os.environ)
    env.update({_OUT_ENV: out, "FSSJAX_COMPILATION_CACHE": cache})
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--config={config}",
           f"--workdir={workdir}", "--config.train.log_every=1"] + list(overrides)
    load = list(os.getloadavg())
    env[_T0_ENV] = repr(time.time())
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, check=False)
    if not os.path.exists(out):
      raise RuntimeError(f"no loss line from {' '.join(cmd)}; last output:\n"
                         + "\n".join(proc.stdout.splitlines()[-30:]))
    with open(out) as f:
      record = json.load(f)
  record["load_avg_start"] = load
  return record


def summarise(record: dict) -> dict:
  """Phase table: wall and CPU per phase, compile totals."""
  marks = record["marks"]
  rows = [("python+imports", [0.0, 0.0], marks["imports"])]
  for s in record["spans"]:
    rows.append((s["phase"], s["start"], s["end"]))
  phases = {name: dict(start=round(a[0], 2), wall=round(b[0] - a[0], 2), cpu=round(b[1] - a[1], 2))
            for name, a, b in rows}
  if "step_compile" in record:
    sc = record["step_compile"]
    phases["step compile (bg)"] = dict(start=round(marks["step compile start"][0], 2),
                                       wall=round(sc["end"][0] - marks["step compile start"][0], 2),
                                       cpu=round(sc["thread_cpu"], 2))
  by_thread: dict = {}
  for c in record["compiles"]:
    key = "step" if c["thread"].startswith("compile_step") else "main"
    n, s = by_thread.get(key, (0, 0.0))
    by_thread[key] = (n + 1, s + c["seconds"])
  return dict(first_loss_wall=round(marks["first loss"][0], 2),
              first_loss_cpu=round(marks["first loss"][1], 2), phases=phases,
              compiles={k: dict(count=n, backend_seconds=round(s, 2))
                        for k, (n, s) in by_thread.items()},
              cache_hits=record["cache_hits"], threads=record.get("threads", []),
              tensorflow_imported=record.get("tensorflow_imported"),
              children_cpu=record.get("children_cpu"),
              load_avg=record.get("load_avg"),
              load_avg_start=record.get("load_avg_start"))


def _print_table(config: str, state: str, s: dict) -> None:
  print(f"\n{config} [{state}]: first loss {s['first_loss_wall']:.1f} s wall, "
        f"{s['first_loss_cpu']:.1f} s CPU (+ {s['children_cpu']} s in finished child "
        f"processes); load {s['load_avg_start']} -> {s['load_avg']}")
  print(f"  {'phase':<20}{'start':>8}{'wall':>8}{'cpu':>8}")
  for name, p in s["phases"].items():
    print(f"  {name:<20}{p['start']:>8.2f}{p['wall']:>8.2f}{p['cpu']:>8.2f}")
  for k, c in s["compiles"].items():
    print(f"  compiles on {k}: {c['count']} programs, {c['backend_seconds']:.2f} s backend")
  print(f"  persistent-cache hits: {s['cache_hits']}")
  print("  CPU by thread: " + ", ".join(f"{n} {c:.1f}s" for n, _, c in s["threads"][:6]),
        flush=True)


def main(argv: Sequence[str]) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                      help="config specs (space-separated; a spec may hold commas)")
  parser.add_argument("--warm_runs", type=int, default=1)
  parser.add_argument("--cold", type=int, default=1, help="0: skip the cold run")
  parser.add_argument("--cache_dir", default="", help="default: a fresh temporary directory")
  parser.add_argument("--timeout", type=float, default=1800)
  parser.add_argument("--json", default="", help="append one JSON line per run to this file")
  parser.add_argument("--raw", action="store_true", help="--json lines carry the raw record "
                      "(every jax.monitoring event with its thread and time)")
  parser.add_argument("--override", action="append", default=[],
                      help="extra flag for fssjax.main, e.g. --override=--config.seed=1")
  args = parser.parse_args(argv)
  for config in args.configs:
    cache = args.cache_dir or tempfile.mkdtemp(prefix="fssjax_xla_cache_")
    try:
      _runs(args, config, cache)
    finally:
      if not args.cache_dir:
        shutil.rmtree(cache, ignore_errors=True)


def _runs(args, config: str, cache: str) -> None:
  """The cold and warm runs of one config sharing `cache`."""
  states = (["cold"] if args.cold else []) + ["warm"] * args.warm_runs
  for i, state in enumerate(states):
    if state == "cold" and os.listdir(cache):
      raise SystemExit(f"--cache_dir {cache} is not empty: a cold run needs an empty one")
    record = run_once(config, cache, args.timeout, args.override)
    s = summarise(record)
    s.update(benchmark="startup", config=config, run=i, cache=state,
             cache_bytes=_dir_size(cache))
    if args.raw:
      s["raw"] = record
    _print_table(config, state, s)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(s) + "\n")


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    _child(sys.argv[2:])
  else:
    main(sys.argv[1:])
