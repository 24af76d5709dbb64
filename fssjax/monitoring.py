"""What a run reports: TensorBoard writers, evaluation summaries, console lines.

  * `create_writer(logdir, lead=...)`: clu's default writer (console logging + TensorBoard
    event files in `logdir`); processes other than the lead only log. TensorFlow, which
    writes the event files, is kept off the accelerators JAX uses.
  * `write_eval(writer, step, results)`: mIoU, FB-IoU, the all-foreground baseline, one
    scalar per class (`eval/per_class_iou/<id>_<name>`) and a grid of examples
    (query | truth | prediction | support, masks overlaid) from `fssjax.evaluate` results.
  * `flatten_config(config)`: the config as flat hparams ('train.batch_size': 8, ...).
  * `summary_line(results)`: one console line with the baseline next to the method.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

_TF_HIDDEN = False


def hide_gpus_from_tensorflow() -> None:
  """TensorBoard summaries import TensorFlow; keep it off the GPUs JAX uses (idempotent)."""
  global _TF_HIDDEN
  if _TF_HIDDEN:
    return
  _TF_HIDDEN = True
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices
    pass


def create_writer(logdir: str, *, lead: bool = True):
  """A clu MetricWriter: logging + TensorBoard event files in `logdir` (lead process only)."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  if lead:
    hide_gpus_from_tensorflow()
  return metric_writers.create_default_writer(logdir, just_logging=not lead)


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'train.batch_size': 8, ...}; values that are not int/float/bool/str become str."""
  out = {}

  def walk(prefix, node):
    for k, v in node.items():
      name = f"{prefix}{k}"
      if isinstance(v, Mapping):
        walk(name + ".", v)
      elif isinstance(v, (bool, int, float, str)):
        out[name] = v
      else:
        out[name] = str(v)

  walk("", config.to_dict())
  return out


def _safe_name(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def write_eval(writer, step: int, results: Mapping[str, Any], prefix: str = "eval") -> None:
  """Scalars (mIoU, FB-IoU, baselines, per-class IoU) and example images to `writer`."""
  scalars = {f"{prefix}/miou": results["miou"], f"{prefix}/fbiou": results["fbiou"],
             f"{prefix}/baseline_miou": results["baseline_miou"],
             f"{prefix}/baseline_fbiou": results["baseline_fbiou"]}
  names = results.get("class_names") or {}
  for c, iou in results["per_class_iou"].items():
    scalars[f"{prefix}/per_class_iou/{int(c):03d}_{_safe_name(names.get(c, ''))}"] = iou
  writer.write_scalars(step, scalars)
  if results.get("summaries"):
    from fssjax import evaluate  # pylint: disable=g-import-not-at-top
    grid = evaluate.summary_grid(results["summaries"])  # [N, H, 4W, 3] in [0, 1]
    writer.write_images(step, {f"{prefix}/query_truth_prediction_support": grid})


def results_for_json(results: Mapping[str, Any]) -> dict:
  """Evaluation results without images, class keys as strings (JSON objects)."""
  out = {k: v for k, v in results.items() if k != "summaries"}
  for k in ("per_class_iou", "per_class_episodes", "baseline_per_class_iou", "class_names"):
    if k in out:
      out[k] = {str(c): v for c, v in out[k].items()}
  return out


def summary_line(results: Mapping[str, Any]) -> str:
  """'mIoU 41.20  FB-IoU 62.10  (all-foreground baseline: ...; N episodes, K-shot, res)'."""
  return (f"mIoU {results['miou']:.2f}  FB-IoU {results['fbiou']:.2f}  (all-foreground "
          f"baseline: mIoU {results['baseline_miou']:.2f}  FB-IoU "
          f"{results['baseline_fbiou']:.2f}; {results['n_episodes']} episodes, "
          f"{results['shots']}-shot, {results['resolution']})")


def format_eta(seconds: float) -> str:
  """h:mm:ss."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
