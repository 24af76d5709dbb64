"""Extra image views and text fields that a method declares; built in the grain workers.

A method may need the episode's images at other sizes and normalisations than the scored
view (`data.image_size`): Segment Anything at 1024 (longest side, padded), a CLIP tower at 336,
and text in the batch (the class name, its description, a prompt). It declares them as
`ViewSpec`s and `TextSpec`s; `fssjax.data.pipeline.train_loader` / `eval_loader` take them as
`views=` / `texts=` and add these batch keys (b per-process episodes, K supports):

  query_image@{name}     float32 [b, s, s, 3]     the query in view `name` (s = spec.size)
  support_images@{name}  float32 [b, K, s, s, 3]
  query_size@{name}      int32   [b, 2]           (h, w) of the resized image inside the view
                                                  (s, s for 'square'; SAM's input size for
                                                  'longest_side')
  support_size@{name}    int32   [b, K, 2]
  text@{name}            int32   [b, L]           token ids of the episode class's text
                                                  (L = spec.max_length, padded with pad id)
  text_mask@{name}       uint8   [b, L]           1 on tokens, 0 on padding

Without views and texts the batch is exactly the one of earlier versions.

Views are made from the decoded source image (never from the scored view), so a 1024 view of
a 640 image is as sharp as it can be:
  * 'square': resized to s x s (PIL, `interpolation`);
  * 'longest_side': Segment Anything's `ResizeLongestSide` (facebookresearch/segment-anything,
    utils/transforms.py `get_preprocess_shape`: scale = s / max(h, w), new size
    int(h * scale + 0.5) x int(w * scale + 0.5)), placed at the top-left, and the bottom/right
    padding set to `pad_value` after normalisation (SAM pads the normalised image with 0);
  * normalisation: one of `fssjax.data.transforms.NORMALIZATIONS` ('imagenet',
    'minus_one_one', 'clip', 'sam', 'none').
With training augmentation (`data.augment`), every view shows the same flip and crop as the
scored view: the crop window of the scored canvas is mapped back to the source image (rounded
to whole source pixels) and the view is made from that window.

Texts come from the episode's class (`class_id`): 'class_name' (the source's class name),
'class_description' (the source's `class_descriptions`, which the synthetic benchmark has
exactly; other sources need a description list) or 'template' (`template` with `{class}`
replaced by the class name). They are tokenised once per class when the loader is built (so
the batches hold the same ids for any worker count) by `tokenizer`: an object with
`encode(text)` (returning ids, or an encoding with `.ids`, as `tokenizers.Tokenizer` does), or
a name / path loaded by `fssjax.priors.tokenizer.load_tokenizer`. Sequences longer than
`max_length` are truncated; padding uses the tokenizer's `pad_id` (or its '<pad>' / '[PAD]'
token, else 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from PIL import Image

from fssjax.data import transforms
from fssjax.data.base import DataError

VIEW_RESIZES = ("square", "longest_side")
TEXT_FIELDS = ("class_name", "class_description", "template")
VIEW_INTERPOLATIONS = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                       "bicubic": Image.BICUBIC}


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One extra image view (see the module docstring).

  Attributes:
    name: the batch key suffix (`query_image@{name}`, ...).
    size: side s of the square view.
    resize: 'square' or 'longest_side' (SAM's resize, padded bottom / right).
    interpolation: 'bilinear', 'bicubic' or 'nearest' (PIL filters).
    normalization: 'imagenet' | 'minus_one_one' | 'clip' | 'sam' | 'none'.
    pad_value: value of padded pixels after normalisation ('longest_side').
  """

  name: str
  size: int
  resize: str = "square"
  interpolation: str = "bilinear"
  normalization: str = "imagenet"
  pad_value: float = 0.0

  def __post_init__(self):
    _check_name(self.name, "view")
    if int(self.size) < 1:
      raise ValueError(f"view {self.name!r}: size must be >= 1, got {self.size}")
    if self.resize not in VIEW_RESIZES:
      raise ValueError(f"view {self.name!r}: resize={self.resize!r}; expected one of "
                       f"{list(VIEW_RESIZES)}")
    if self.interpolation not in VIEW_INTERPOLATIONS:
      raise ValueError(f"view {self.name!r}: interpolation={self.interpolation!r}; expected one "
                       f"of {list(VIEW_INTERPOLATIONS)}")
    if self.normalization not in transforms.NORMALIZATIONS:
      raise ValueError(f"view {self.name!r}: normalization={self.normalization!r}; expected one "
                       f"of {list(transforms.NORMALIZATIONS)}")


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """One text field of the episode's class (see the module docstring).

  Attributes:
    name: the batch key suffix (`text@{name}`, `text_mask@{name}`).
    field: 'class_name' | 'class_description' | 'template'.
    template: for 'template': a string with `{class}`, e.g. 'a photo of a {class}.'.
    tokenizer: a tokenizer object with `encode`, or a name / path for
      `fssjax.priors.tokenizer.load_tokenizer`.
    max_length: L, the padded length.
  """

  name: str
  field: str = "class_name"
  template: str | None = None
  tokenizer: Any = ""
  max_length: int = 64

  def __post_init__(self):
    _check_name(self.name, "text")
    if self.field not in TEXT_FIELDS:
      raise ValueError(f"text {self.name!r}: field={self.field!r}; expected one of "
                       f"{list(TEXT_FIELDS)}")
    if self.field == "template" and (not self.template or "{class}" not in self.template):
      raise ValueError(f"text {self.name!r}: field='template' needs a template containing "
                       f"'{{class}}', got {self.template!r}")
    if int(self.max_length) < 1:
      raise ValueError(f"text {self.name!r}: max_length must be >= 1, got {self.max_length}")
    if isinstance(self.tokenizer, str) and not self.tokenizer:
      raise ValueError(f"text {self.name!r}: no tokenizer (an object with encode(), or a name "
                       "or path for fssjax.priors.tokenizer.load_tokenizer)")


def _check_name(name: str, what: str) -> None:
  if not isinstance(name, str) or not name or "@" in name or "/" in name:
    raise ValueError(f"{what} name must be a non-empty string without '@' or '/', got {name!r}")


def check_specs(views: Sequence[ViewSpec], texts: Sequence[TextSpec]) -> None:
  """Raises ValueError on a non-spec or a name used twice."""
  for kind, specs, cls in (("view", views, ViewSpec), ("text", texts, TextSpec)):
    names = []
    for s in specs:
      if not isinstance(s, cls):
        raise ValueError(f"expected {cls.__name__} objects in the {kind}s, got {s!r}")
      names.append(s.name)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise ValueError(f"{kind} names used twice: {dup}")


# ---------------------------------------------------------------------------- views


def longest_side_shape(h: int, w: int, size: int) -> tuple[int, int]:
  """SAM's `ResizeLongestSide.get_preprocess_shape`: (int(h * s + 0.5), int(w * s + 0.5)),
  s = size / max(h, w)."""
  scale = size * 1.0 / max(h, w)
  return int(h * scale + 0.5), int(w * scale + 0.5)


def source_window(shape: tuple[int, int], spec: transforms.TransformSpec,
                  params: transforms.AugmentParams) -> tuple[int, int, int, int]:
  """The (left, top, right, bottom) box of the source image that an augmented scored view
  shows (before its flip), rounded to whole pixels; it may reach beyond the image (padding)."""
  h, w = shape
  size = int(spec.image_size)
  flip, zh, zw, y0, x0 = params
  top, bottom = y0 * size / zh, (y0 + size) * size / zh
  left, right = x0 * size / zw, (x0 + size) * size / zw
  if flip:
    left, right = size - right, size - left
  if spec.resize == "square":
    sy, sx = h / size, w / size
  else:  # 'pad': the canvas is the image scaled by size / max(h, w), top-left
    sy = sx = max(h, w) / size
  box = (round(left * sx), round(top * sy), round(right * sx), round(bottom * sy))
  return box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)


def make_view(image: np.ndarray, view: ViewSpec, out: np.ndarray,
              spec: transforms.TransformSpec | None = None,
              params: transforms.AugmentParams | None = None) -> tuple[int, int]:
  """Writes view `view` of a source image (uint8 [H, W, 3]) into `out` (float32 [s, s, 3]).

  With augmentation `params` (of the scored view, whose settings are `spec`), the view shows
  the same flip and crop. Returns the (h, w) of the resized image inside the view.
  """
  img = Image.fromarray(np.ascontiguousarray(image))
  if params is not None:
    img = img.crop(source_window(image.shape[:2], spec, params))
    if params.flip:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
  s = int(view.size)
  resample = VIEW_INTERPOLATIONS[view.interpolation]
  if view.resize == "square":
    nh, nw = s, s
  else:
    nh, nw = longest_side_shape(img.height, img.width, s)
  if (img.height, img.width) != (nh, nw):
    img = img.resize((nw, nh), resample)
  pixels = np.asarray(img, dtype=np.uint8)
  if (nh, nw) == (s, s):
    transforms.normalize(pixels, view.normalization, out=out)
  else:
    out[...] = np.float32(view.pad_value)
    out[:nh, :nw] = transforms.normalize(pixels, view.normalization)
  return nh, nw


# ---------------------------------------------------------------------------- texts


def class_text(source, class_id: int, spec: TextSpec) -> str:
  """The string of `spec` for class `class_id` of `source`.

  Raises:
    DataError: 'class_description' for a source without descriptions of this class.
  """
  name = str(source.class_names[class_id])
  if spec.field == "class_name":
    return name
  if spec.field == "template":
    return spec.template.replace("{class}", name)
  descriptions = getattr(source, "class_descriptions", None)
  text = descriptions[class_id] if descriptions is not None else None
  if not text:
    raise DataError(
        f"text {spec.name!r}: source {getattr(source, 'name', type(source).__name__)!r} has no "
        f"description of class {class_id} ({name!r}); use field='class_name' or 'template', or "
        "a source with `class_descriptions` (the synthetic benchmark has them)")
  return str(text)


def resolve_tokenizer(tokenizer: Any) -> Any:
  """The tokenizer object of a TextSpec (loads a name / path lazily)."""
  if isinstance(tokenizer, str):
    from fssjax.priors.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
    return load_tokenizer(tokenizer)
  if not hasattr(tokenizer, "encode"):
    raise ValueError(f"tokenizer {tokenizer!r} has no encode() method")
  return tokenizer


def _pad_id(tok: Any) -> int:
  pad = getattr(tok, "pad_id", None)
  if isinstance(pad, (int, np.integer)) and pad >= 0:
    return int(pad)
  token_to_id = getattr(tok, "token_to_id", None)
  if token_to_id is not None:
    for t in ("<pad>", "[PAD]", "<|pad|>"):
      i = token_to_id(t)
      if i is not None:
        return int(i)
  return 0


def encode(tok: Any, text: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [L], mask uint8 [L]) of `text`, truncated / padded to L = max_length."""
  enc = tok.encode(text)
  ids = list(getattr(enc, "ids", enc))[:max_length]
  out = np.full((max_length,), _pad_id(tok), np.int32)
  mask = np.zeros((max_length,), np.uint8)
  out[:len(ids)] = ids
  mask[:len(ids)] = 1
  return out, mask


def text_tables(source, class_ids: Sequence[int], texts: Sequence[TextSpec]
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per text spec: (ids int32 [C, L], mask uint8 [C, L]) over all C classes of `source`,
  filled for `class_ids` (other rows are padding)."""
  n = len(source.class_names)
  tables = {}
  for spec in texts:
    tok = resolve_tokenizer(spec.tokenizer)
    length = int(spec.max_length)
    ids = np.full((n, length), _pad_id(tok), np.int32)
    mask = np.zeros((n, length), np.uint8)
    for c in sorted({int(c) for c in class_ids}):
      ids[c], mask[c] = encode(tok, class_text(source, c, spec), length)
    tables[spec.name] = (ids, mask)
  return tables
