"""What a run reports: TensorBoard writers, evaluation pictures, console lines.

  * `create_writer(logdir, lead=...)`: a clu `MetricWriter` (console logging plus TensorBoard
    event files in `logdir`; processes other than the lead only log). The event files are
    written by `TensorBoardWriter` with the `tensorboard` package's own `EventFileWriter` and
    summary protos -- the records TensorFlow's `tf.summary` writes (tensor summaries with the
    scalars / images / text / hparams plugin metadata), without TensorFlow.
  * `write_eval(writer, step, results, prefix)`: the scalars of an evaluator's results
    (`fssjax.evaluators`), one scalar per class, and for episodic results a picture of example
    episodes (`episode_picture`).
  * `episode_picture(summaries)`: one row per episode -- query | truth | prediction | first
    support -- at the scored resolution, masks drawn as contours with a dark halo (visible on
    any object colour), the class name, episode index and the episode's IoU above each row.
  * `flatten_config(config)`: the config as flat hparams ('train.batch_size': 8, ...).
  * `summary_line(results)`: one console line (the headline beside the published logger's
    number and the all-foreground baseline).

TensorFlow. `clu.metric_writers` imports clu's TensorFlow summary writer when it is imported;
`fssjax._clu_shim.install()` (run by `import fssjax` and by this module) registers a stand-in
whose `SummaryWriter` is `TensorBoardWriter`, so importing clu's writers (and
`clu.periodic_actions`) never imports TensorFlow.
"""

from __future__ import annotations

import io
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from fssjax import _clu_shim

_clu_shim.install()  # before clu.metric_writers: clu must not import TensorFlow

from clu.metric_writers import interface  # noqa: E402  pylint: disable=g-import-not-at-top
from clu.metric_writers import async_writer  # noqa: E402  pylint: disable=g-import-not-at-top
from clu.metric_writers import logging_writer  # noqa: E402  pylint: disable=g-import-not-at-top


# ----------------------------------------------------------------------------------------
# Writers.


def _to_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  return np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = _to_uint8(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


class TensorBoardWriter(interface.MetricWriter):
  """clu MetricWriter writing TensorBoard event files without TensorFlow.

  Uses `tensorboard.summary.writer.event_file_writer.EventFileWriter` and the summary protos
  of the tensorboard plugins (`scalar_pb`, `text_pb`, `histogram_pb`, `hparams_pb`; images as
  the image plugin's tensor of [width, height, PNG...], as `tf.summary.image` writes them), so
  TensorBoard and `tensorboard.backend.event_processing` read them as TensorFlow's own.

  Images: [H, W, C] or [N, H, W, C], C in {1, 3, 4}, float in [0, 1] (clipped) or uint8.
  Raw summaries, videos and audio are not written (a warning is logged once).
  """

  def __init__(self, logdir: str):
    super().__init__()
    self._writer = EventFileWriter(str(logdir))

  def _add(self, summary, step: Optional[int]) -> None:
    event = event_pb2.Event(wall_time=time.time(), summary=summary)
    if step is not None:
      event.step = int(step)
    self._writer.add_event(event)

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Optional[Mapping[str, Any]] = None):
    del step, values, metadata
    logging.log_first_n(logging.WARNING, "TensorBoardWriter does not write raw summaries.", 1)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._add(scalar_summary.scalar_pb(key, float(np.asarray(value))), step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    for key, value in images.items():
      value = np.asarray(value)
      if value.ndim == 3:
        value = value[None]
      if value.ndim != 4 or value.shape[-1] not in (1, 3, 4):
        raise ValueError(f"write_images: {key!r} has shape {value.shape}; expected [H,W,C] or "
                         "[N,H,W,C] with C = 1, 3 or 4")
      h, w = value.shape[1:3]
      data = np.array([str(w).encode(), str(h).encode()] + [_png(v) for v in value],
                      dtype=object)
      meta = image_metadata.create_summary_metadata(display_name=key, description="")
      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
          tag=key, metadata=meta, tensor=tensor_util.make_tensor_proto(data))])
      self._add(summary, step)

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    del step, videos
    logging.log_first_n(logging.WARNING, "TensorBoardWriter does not write videos.", 1)

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    del step, audios, sample_rate
    logging.log_first_n(logging.WARNING, "TensorBoardWriter does not write audio.", 1)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._add(text_summary.text_pb(key, str(value)), step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Optional[Mapping[str, int]] = None):
    for key, value in arrays.items():
      buckets = None if num_buckets is None else num_buckets.get(key)
      kw = {} if buckets is None else {"buckets": int(buckets)}
      self._add(histogram_summary.histogram_pb(key, np.asarray(value, np.float64), **kw), step)

  def write_hparams(self, hparams: Mapping[str, Any]):
    flat = {k: (v if isinstance(v, (bool, int, float, str)) else str(v))
            for k, v in _flatten(hparams).items()}
    self._add(hparams_summary.hparams_pb(flat), None)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class _LoggingWriter(logging_writer.LoggingWriter):
  """clu's console writer, without the one-line dump of every hyperparameter at start-up."""

  def write_hparams(self, hparams: Mapping[str, Any]):
    del hparams


def create_writer(logdir: str, *, lead: bool = True) -> interface.MetricWriter:
  """A clu MetricWriter: console logging, plus TensorBoard event files in `logdir` on the lead
  process (asynchronous, as clu's default writer)."""
  writers = [_LoggingWriter()]
  if lead:
    writers.append(TensorBoardWriter(logdir))
  return async_writer.AsyncMultiWriter(writers)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'train.batch_size': 8, ...}; values that are not int/float/bool/str become str."""
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
          for k, v in _flatten(config.to_dict()).items()}


# ----------------------------------------------------------------------------------------
# Pictures.

TRUTH_COLOR = (0.0, 1.0, 0.0)
PREDICTION_COLOR = (1.0, 0.15, 0.15)
SUPPORT_COLOR = (0.2, 0.6, 1.0)
HALO_COLOR = (0.0, 0.0, 0.0)
TEXT_HEIGHT = 14
_TINT = 0.25


def _shift_or(mask: np.ndarray) -> np.ndarray:
  """mask dilated by one pixel (4-neighbourhood)."""
  out = mask.copy()
  out[1:] |= mask[:-1]
  out[:-1] |= mask[1:]
  out[:, 1:] |= mask[:, :-1]
  out[:, :-1] |= mask[:, 1:]
  return out


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
  """The inner boundary of a binary mask [H, W]: foreground pixels with a background (or
  out-of-image) 4-neighbour, thickened inwards to `width` pixels. bool [H, W]."""
  mask = np.asarray(mask, bool)
  boundary = np.zeros_like(mask)
  inside = mask
  for _ in range(max(int(width), 1)):
    padded = np.pad(inside, 1, constant_values=False)
    interior = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
                & padded[1:-1, :-2] & padded[1:-1, 2:])
    boundary |= inside & ~interior
    inside = interior
  return boundary


def draw_mask(image: np.ndarray, mask: np.ndarray, color: Sequence[float], *,
              ignore: Optional[np.ndarray] = None) -> np.ndarray:
  """`image` [H,W,3] in [0,1] with `mask` (bool [H,W]) drawn for a reader.

  The mask is tinted lightly (25 %), its contour drawn in `color` and ringed with a dark halo
  one pixel outside it, so the outline stays visible on an object of the mask's own colour
  (the coloured line) and on a dark one (where the halo is the image and the line is bright).
  `ignore` pixels (bool [H,W]) are greyed out.
  """
  out = np.asarray(image, np.float32).copy()
  mask = np.asarray(mask, bool)
  color = np.asarray(color, np.float32)
  width = max(1, round(min(mask.shape) / 200))
  if ignore is not None and ignore.any():
    out[ignore] = 0.5 * out[ignore] + 0.25
  out[mask] = (1 - _TINT) * out[mask] + _TINT * color
  line = contour(mask, width)
  halo = _shift_or(mask) & ~mask
  out[halo] = np.asarray(HALO_COLOR, np.float32)
  out[line] = color
  return out


def _resize_nearest(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
  rows = np.minimum((np.arange(size[0]) * x.shape[0]) // size[0], x.shape[0] - 1)
  cols = np.minimum((np.arange(size[1]) * x.shape[1]) // size[1], x.shape[1] - 1)
  return x[rows][:, cols]


def _resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Bilinear resize of a [H,W,3] float image in [0,1] to `size` (h, w)."""
  if tuple(image.shape[:2]) == tuple(size):
    return np.asarray(image, np.float32)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(_to_uint8(image)).resize((int(size[1]), int(size[0])),
                                                 Image.BILINEAR)
  return np.asarray(pil, np.float32) / 255.0


def _text_band(parts: Sequence[str], width: int) -> np.ndarray:
  """[n * TEXT_HEIGHT, width, 3] float: white text (PIL's default font) on black; `parts` are
  joined with ' | ' and wrapped at part boundaries onto as many lines as the width needs."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  font = ImageFont.load_default()
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  fits = lambda text: measure.textlength(text, font=font) + 6 <= width
  lines: list[str] = []
  for part in parts:
    # A part too long for a line on its own is broken at its spaces.
    words = [part] if fits(part) else part.split(" ")
    for k, word in enumerate(words):
      sep = " | " if k == 0 else " "
      if lines and fits(lines[-1] + sep + word):
        lines[-1] += sep + word
      else:
        lines.append(word)
  band = Image.new("RGB", (int(width), TEXT_HEIGHT * len(lines)), (0, 0, 0))
  draw = ImageDraw.Draw(band)
  for i, line in enumerate(lines):
    draw.text((2, 1 + i * TEXT_HEIGHT), line, fill=(255, 255, 255), font=font)
  return np.asarray(band, np.float32) / 255.0


def caption_parts(s: Mapping[str, Any]) -> list[str]:
  """['dog (class 12)', 'episode 7', 'IoU 45.3'] for an episode summary."""
  name = s.get("class_name") or ""
  parts = [f"{name} (class {s['class_id']})" if name else f"class {s['class_id']}"]
  if s.get("episode_index", -1) >= 0:
    parts.append(f"episode {s['episode_index']}")
  if s.get("iou") is not None:
    parts.append(f"IoU {s['iou']:.1f}")
  return parts


def row_caption(s: Mapping[str, Any]) -> str:
  """'dog (class 12) | episode 7 | IoU 45.3'."""
  return " | ".join(caption_parts(s))


def episode_row(s: Mapping[str, Any]) -> np.ndarray:
  """One episode: [n * TEXT_HEIGHT + h, 4w, 3] float32 at the scored resolution (h, w) = the
  truth's shape: the caption (on n lines when 4w is too narrow for one) above query | truth |
  prediction | first support."""
  truth = np.asarray(s["truth"])
  size = truth.shape
  query = _resize_image(np.asarray(s["query"], np.float32), size)
  support = _resize_image(np.asarray(s["support"], np.float32), size)
  support_mask = _resize_nearest(np.asarray(s["support_mask"]), size)
  ignore = truth == 255
  panels = np.concatenate([
      query,
      draw_mask(query, truth == 1, TRUTH_COLOR, ignore=ignore),
      draw_mask(query, _resize_nearest(np.asarray(s["prediction"]), size) == 1,
                PREDICTION_COLOR, ignore=ignore),
      draw_mask(support, support_mask == 1, SUPPORT_COLOR, ignore=support_mask == 255),
  ], axis=1)
  return np.concatenate([_text_band(caption_parts(s), panels.shape[1]), panels], axis=0)


def episode_picture(summaries: Sequence[Mapping[str, Any]]) -> np.ndarray:
  """[1, H, W, 3] float32 in [0, 1]: the rows of `episode_row` stacked (rows of different
  sizes, as with original-resolution scoring, are padded with dark grey to the widest)."""
  if not summaries:
    return np.zeros((0, 1, 4, 3), np.float32)
  rows = [episode_row(s) for s in summaries]
  width = max(r.shape[1] for r in rows)
  gap = np.full((2, width, 3), 0.2, np.float32)
  parts = []
  for r in rows:
    if r.shape[1] < width:
      r = np.concatenate([r, np.full((r.shape[0], width - r.shape[1], 3), 0.2, np.float32)],
                         axis=1)
    parts += [r, gap]
  return np.concatenate(parts[:-1], axis=0)[None].astype(np.float32)


# ----------------------------------------------------------------------------------------
# Evaluation results.


def _safe_name(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def write_eval(writer, step: int, results: Mapping[str, Any], prefix: str = "eval") -> None:
  """Scalars, per-class IoU and (episodic) the example picture of one evaluator's results.

  Episodic: {prefix}/miou (over the evaluated classes), miou_all_classes, fbiou,
  baseline_miou, baseline_fbiou, support_empty, per_class_iou/<id>_<name> (evaluated classes
  only) and the picture {prefix}/episodes. Dense: miou, macc, fwiou, pixel_acc and
  per_class_iou/<index>_<name> of the classes present in the truth.
  """
  names = results.get("class_names") or {}
  if results.get("evaluator", "episodic") == "dense":
    keys = ("miou", "macc", "fwiou", "pixel_acc")
    scalars = {f"{prefix}/{k}": results[k] for k in keys}
    for c, iou in results["per_class_iou"].items():
      if not np.isnan(iou):
        scalars[f"{prefix}/per_class_iou/{int(c):03d}_{_safe_name(names.get(c, ''))}"] = iou
    writer.write_scalars(step, scalars)
    return
  scalars = {f"{prefix}/miou": results["miou"], f"{prefix}/fbiou": results["fbiou"],
             f"{prefix}/baseline_miou": results["baseline_miou"],
             f"{prefix}/baseline_fbiou": results["baseline_fbiou"]}
  if "miou_all_classes" in results:
    scalars[f"{prefix}/miou_all_classes"] = results["miou_all_classes"]
  for key in ("support_empty", "masks_resized"):
    if key in results:
      scalars[f"{prefix}/{key}"] = results[key]
  left_out = set(results.get("left_out_classes") or ())
  for c, iou in results["per_class_iou"].items():
    if c not in left_out:
      scalars[f"{prefix}/per_class_iou/{int(c):03d}_{_safe_name(names.get(c, ''))}"] = iou
  writer.write_scalars(step, scalars)
  if results.get("summaries"):
    writer.write_images(step, {f"{prefix}/episodes": episode_picture(results["summaries"])})


def jsonable(x: Any) -> Any:
  """numpy scalars / arrays -> Python, NaN and inf -> None, mapping keys -> str, anything else
  that JSON cannot hold -> str."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, np.generic):
    return jsonable(x.item())
  if isinstance(x, float) and not np.isfinite(x):
    return None
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  return str(x)


def results_for_json(results: Mapping[str, Any]) -> dict:
  """Evaluation results without images (and without a dense confusion matrix), as JSON
  values (`jsonable`)."""
  return jsonable({k: v for k, v in results.items()
                   if k not in ("summaries", "confusion_matrix")})


def summary_line(results: Mapping[str, Any]) -> str:
  """One console line of an evaluator's results.

  Episodic: 'mIoU 41.20  FB-IoU 62.10  (all-foreground baseline: ...; N episodes, K-shot,
  res)', with, when classes were left out, the number of evaluated classes and the published
  logger's all-fold-classes mean beside the headline.
  """
  if results.get("evaluator", "episodic") == "dense":
    return (f"mIoU {results['miou']:.2f}  mAcc {results['macc']:.2f}  pixel acc "
            f"{results['pixel_acc']:.2f}  ({results['n_classes_present']} of "
            f"{len(results['per_class_iou'])} classes in the truth; {results['n_images']} "
            f"images, {results['resolution']})")
  head = f"mIoU {results['miou']:.2f}"
  left_out = results.get("left_out_classes") or []
  if left_out:
    n = len(results["per_class_iou"])
    head += (f" over {n - len(left_out)} of {n} classes (all {n} fold classes, published "
             f"logger: {results['miou_all_classes']:.2f}; left out, too few images: "
             f"{list(left_out)})")
  extra = ""
  if results.get("support_empty"):
    extra += f", {results['support_empty']} empty support masks"
  if results.get("masks_resized"):
    extra += f", {results['masks_resized']} masks resized to their image"
  return (f"{head}  FB-IoU {results['fbiou']:.2f}  (all-foreground "
          f"baseline: mIoU {results['baseline_miou']:.2f}  FB-IoU "
          f"{results['baseline_fbiou']:.2f}; {results['n_episodes']} episodes, "
          f"{results['shots']}-shot, {results['resolution']}{extra})")


def format_eta(seconds: float) -> str:
  """h:mm:ss."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
