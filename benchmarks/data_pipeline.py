"""Throughput of the grain training pipeline (fssjax.data.pipeline), as JSON lines.

Two COCO-format sources read through `CocoSource` (the same code path as COCO-20i):
  * 'synthetic': the generated benchmark at its default 128x128 PNG images (a small set);
  * 'coco_like': the same generator at 512x512 JPEG images, close to COCO's decode and
    resize cost per image (COCO images are ~640x480 JPEGs).
Each is fed at the network size 400x400 (HSNet's), shot 1, ImageNet normalisation, with 0
(in-process) and 2 grain worker processes. After `--warmup` batches (worker start-up), it
times `--windows` windows of `--window_batches` batches and prints the median (and all
windows) of batches/s and episodes/s. One line per (source, workers):

  python benchmarks/data_pipeline.py [--batch_size=8 --workers=0,2 --root=/tmp/fssjax_bench]
                                     [--views=sam,clip]

`--views` adds extra image views built in the workers (fssjax.data.views): 'sam' (1024,
longest side, padded, SAM normalisation) and 'clip' (336 square, CLIP normalisation), to
measure what a method's extra views cost.

The figures depend on the machine's free CPU cores; each line says how many it has.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Sequence

from absl import app
from absl import flags

_ROOT = flags.DEFINE_string("root", os.path.join(os.path.expanduser("~"), ".cache", "fssjax",
                                                 "bench"),
                            "Where the generated benchmark sets and index caches live.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Episodes per batch (global = per process).")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "grain worker counts to measure.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Batches before timing (includes worker start).")
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows.")
_WINDOW_BATCHES = flags.DEFINE_integer("window_batches", 4, "Batches per timed window.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 400, "Network input side.")
_SHOT = flags.DEFINE_integer("shot", 1, "Supports per episode.")
_SOURCES = flags.DEFINE_list("sources", ["synthetic", "coco_like"], "Sources to measure.")
_VIEWS = flags.DEFINE_list("views", [], "Extra views to build: sam, clip.")


def _views():
  from fssjax.data import views  # pylint: disable=g-import-not-at-top
  known = {"sam": views.ViewSpec("sam", 1024, resize="longest_side", normalization="sam"),
           "clip": views.ViewSpec("clip", 336, normalization="clip", interpolation="bicubic")}
  unknown = [v for v in _VIEWS.value if v not in known]
  if unknown:
    raise app.UsageError(f"--views: unknown views {unknown}; known: {sorted(known)}")
  return [known[v] for v in _VIEWS.value]

# name -> synthetic generator settings (train images are what the train stream reads).
SOURCE_SETTINGS = {
    "synthetic": dict(train=400, val=50, size=128, image_format="png"),
    "coco_like": dict(train=400, val=50, size=512, image_format="jpg"),
}


def _source(name: str):
  from fssjax.data import coco, folds, synthetic  # pylint: disable=g-import-not-at-top

  settings = SOURCE_SETTINGS[name]
  root = synthetic.ensure(os.path.join(_ROOT.value, "sets"), workers=2, **settings)
  src = coco.synthetic(root, "train", cache_dir=os.path.join(_ROOT.value, "index"))
  return src, folds.fold_classes("synthetic", 0, "train"), settings


def measure(name: str, workers: int) -> dict:
  from fssjax import configlib  # pylint: disable=g-import-not-at-top
  from fssjax.data import pipeline  # pylint: disable=g-import-not-at-top

  src, classes, settings = _source(name)
  config = configlib.base_config()
  config.data.update(dict(image_size=_IMAGE_SIZE.value, shot=_SHOT.value, workers=workers))
  total = _WARMUP.value + _WINDOWS.value * _WINDOW_BATCHES.value
  config.train.num_steps = total
  loader = pipeline.train_loader(config, src, classes, normalization="imagenet", seed=0,
                                 global_batch_size=_BATCH.value, process_index=0,
                                 process_count=1, views=_views())
  it = iter(loader)
  try:
    t0 = time.perf_counter()
    for _ in range(_WARMUP.value):
      next(it)
    warmup_s = time.perf_counter() - t0
    rates = []
    for _ in range(_WINDOWS.value):
      t = time.perf_counter()
      for _ in range(_WINDOW_BATCHES.value):
        next(it)
      rates.append(_WINDOW_BATCHES.value / (time.perf_counter() - t))
  finally:
    it.close()
  median = statistics.median(rates)
  return dict(
      benchmark="data_pipeline", source=name, image_file_size=settings["size"],
      image_format=settings["image_format"], image_size=_IMAGE_SIZE.value, shot=_SHOT.value,
      workers=workers, batch_size=_BATCH.value, views=list(_VIEWS.value),
      warmup_batches=_WARMUP.value,
      warmup_s=round(warmup_s, 3), windows=_WINDOWS.value,
      window_batches=_WINDOW_BATCHES.value,
      batches_per_s=round(median, 3), episodes_per_s=round(median * _BATCH.value, 2),
      batches_per_s_windows=[round(r, 3) for r in rates],
      cpu_count=os.cpu_count(), machine=platform.machine(), python=platform.python_version())


def main(argv: Sequence[str]) -> None:
  del argv
  for name in _SOURCES.value:
    if name not in SOURCE_SETTINGS:
      raise app.UsageError(f"--sources: unknown source {name!r}; known: {list(SOURCE_SETTINGS)}")
    for workers in _WORKERS.value:
      print(json.dumps(measure(name, int(workers))), flush=True)


if __name__ == "__main__":
  app.run(main)
