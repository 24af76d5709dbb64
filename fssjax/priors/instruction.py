"""LLaFS instructions: the task part and the fine-grained in-context part, with placeholders
where the method splices visual tokens.

LLaFS (Zhu et al., "LLaFS: When Large Language Models Meet Few-Shot Segmentation", CVPR 2024)
prompts the LLM with (1) a task instruction: segment every object of the class in the query
image, as one 16-point polygon per object, points clockwise, coordinates within the image
size, answered as a tuple of objects `((x1,y1),...,(x16,y16))`; and (2) a fine-grained
in-context instruction: "[class] has [attributes]", the support image with its ground-truth
polygons as a worked example, and a region-attribute table linking the class's
distinguishing attributes to regions (superpixels) of the support foreground; then the query
image. The exact wording is not published; the wording here is `TASK_TEMPLATE` and friends.

Visual tokens. The instruction is a sequence of text pieces and `Placeholder`s; a placeholder
stands for visual tokens the method computes and splices into the LLM's input embeddings
(the Q-Former's tokens of an image, or of one support region). Its text form is one of
`SPECIAL_TOKENS` (`<support_image>`, `<query_image>`, `<region>`), to be added to the
tokenizer as special tokens; placeholders appear in `Instruction.placeholders` in text order,
with the support index (shot) and region id each one stands for.

Region-attribute table (`region_attribute_table`), choices where the paper is silent:
  * superpixels: scikit-image SLIC (`skimage.segmentation.slic`, n_segments=8, compactness 10,
    on the image scaled to [0, 1], restricted to the support foreground via `mask=`);
    superpixels smaller than `min_region_pixels` (default 4) are dropped;
  * similarity: an injected function `similarity(image, region_masks, attributes) -> [K, A]`
    (higher = better match). `embedding_similarity(image_encoder, text_encoder)` builds one
    from any two encoders into a shared space (CLIP: cosine of each region's masked square
    crop, outside pixels set to the image's mean colour, and each attribute text); the method
    chooses the encoders. Each attribute goes to its
    best region (argmax over regions; ties: the lower region id), attributes whose best
    score is below `min_similarity` are left out;
  * the table lists the regions that received attributes, in region-id order, one line each:
    `region k <region>: attribute; attribute`.
  * attributes shared with other classes are removed before matching (`remove_shared`: a
    case-, space- and punctuation-insensitive exact match against the other classes' lists);
    which classes count as "other" is the caller's choice (`fssjax.methods.llafs`: every
    other class of the data set, `model.shared_with='dataset'`, or none; with all 80 classes
    of the embedded benchmark every shape, texture, colour and size is shared with someone).
    The "[class] has [attributes]" sentence keeps every attribute.
  * `table_from_scores(scores, attributes, region_ids)` applies the matching rule to
    precomputed scores (the method computes them in its jitted graph).

Attribute sources (pluggable: anything with `attributes(class_name) -> list[str]`):
  SyntheticAttributes   the embedded benchmark's exact descriptions (shape, texture, colours,
                        size fields of `fssjax.priors.describe.describe_synthetic`);
  LLMAttributes         the priors LLM client (`fssjax.priors.llm.LLMClient.chat_json`, cached);
  StaticAttributes      a {class name: [attributes]} mapping.

  ins = build_instruction("striped star", attrs, [SupportExample((128, 128), polygons, table)],
                          query_size=(128, 128))
  ins.text            the whole prompt with the special tokens in place
  ins.parts           [str | Placeholder, ...] to tokenise piecewise and splice
  ins.answer          the target text when query polygons are given (training)

Splicing (for the method): render the chat template around `ins.text` (the special tokens
survive as text), `split_placeholders(rendered, ins.placeholders)` gives the parts back, then
`expand_placeholders(parts, encode, pad_id=..., lengths={'support_image': Q, 'query_image':
Q, 'region': R})` gives token ids with `lengths[kind]` filler ids per placeholder and the
`Slot`s where visual tokens go; `splice(embeds, slots, visual)` writes them into the token
embeddings. Text pieces are tokenised separately (the same rule in training and inference).
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

from fssjax.priors.polygons import NUM_POINTS, format_polygon, format_polygons

SUPPORT_TOKEN = "<support_image>"
QUERY_TOKEN = "<query_image>"
REGION_TOKEN = "<region>"
SPECIAL_TOKENS = (SUPPORT_TOKEN, QUERY_TOKEN, REGION_TOKEN)
KINDS = {"support_image": SUPPORT_TOKEN, "query_image": QUERY_TOKEN, "region": REGION_TOKEN}

TASK_TEMPLATE = (
    "Segment every {cls} in the query image. For each {cls}, write one polygon of {n} points "
    "(x,y) that follows its outline in clockwise order, with integer coordinates within the "
    "image size (0 <= x < width, 0 <= y < height). Answer with a tuple of objects, each "
    "written as ((x1,y1),(x2,y2),...,(x{n},y{n})), and nothing else.")
ATTRIBUTE_TEMPLATE = "{cls_cap} has {attributes}."
SUPPORT_TEMPLATE = ("Example {k}: in the image {image} (width {w}, height {h}) the {cls} is "
                    "{polygons}.")
TABLE_HEADER = "Region-attribute table of example {k}:"
TABLE_ROW = "region {r} {region}: {attributes}"
QUERY_TEMPLATE = "Query: the image {image} (width {w}, height {h}). Segment the {cls}."
GIVEN_TEMPLATE = "The first {m} points of the first {cls} are {points}."


@dataclasses.dataclass(frozen=True)
class Placeholder:
  """Visual tokens to splice: kind 'support_image' | 'query_image' | 'region'; shot = support
  index (0-based; -1 for the query); region = superpixel id (regions only, else -1)."""

  kind: str
  shot: int = -1
  region: int = -1

  @property
  def token(self) -> str:
    return KINDS[self.kind]


@dataclasses.dataclass
class RegionAttributes:
  """One row of a region-attribute table.

  Attributes:
    region: superpixel id (1-based, as in the label map).
    mask: bool [H, W] the region's pixels.
    attributes: the attributes assigned to it, in the input order.
    scores: their similarity scores.
  """

  region: int
  mask: np.ndarray
  attributes: list
  scores: list


@dataclasses.dataclass
class SupportExample:
  """One support shot for the in-context part.

  Attributes:
    size: (height, width) of the support image as the LLM sees it.
    polygons: its ground-truth polygons (int [16, 2] (x, y) each).
    table: its region-attribute table (rows), or None / [] for none.
  """

  size: tuple
  polygons: list
  table: Optional[list] = None


@dataclasses.dataclass
class Instruction:
  """A built instruction. `parts` interleaves text and placeholders; `text` joins them with
  the special tokens; `placeholders` lists them in order; `answer` is the target (or None)."""

  parts: list
  answer: Optional[str] = None

  @property
  def text(self) -> str:
    return "".join(p.token if isinstance(p, Placeholder) else p for p in self.parts)

  @property
  def placeholders(self) -> list:
    return [p for p in self.parts if isinstance(p, Placeholder)]


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one placeholder's visual tokens go: positions [start, start + length)."""

  placeholder: Placeholder
  start: int
  length: int


def split_placeholders(text: str, placeholders: Sequence[Placeholder]) -> list:
  """`text` (e.g. an instruction rendered into a chat template) cut at its special tokens,
  which are replaced by `placeholders` in order.

  Raises:
    ValueError: the special tokens in `text` do not match the placeholders' kinds in order.
  """
  pattern = "(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")"
  pieces = re.split(pattern, text)
  found = [p for p in pieces if p in SPECIAL_TOKENS]
  expected = [p.token for p in placeholders]
  if found != expected:
    raise ValueError(f"split_placeholders: the text holds special tokens {found[:8]}"
                     f"{'...' if len(found) > 8 else ''} but the placeholders expect "
                     f"{expected[:8]}{'...' if len(expected) > 8 else ''} (same order)")
  it = iter(placeholders)
  return [next(it) if p in SPECIAL_TOKENS else p for p in pieces if p != ""]


def expand_placeholders(parts: Sequence[Union[str, Placeholder]],
                        encode: Callable[[str], Sequence[int]], *, pad_id: int,
                        lengths: Mapping[str, int]) -> tuple:
  """Token ids of an instruction with room for the visual tokens.

  Args:
    parts: text and Placeholders (`Instruction.parts` or `split_placeholders`' output).
    encode: text -> token ids (without BOS / special tokens, e.g.
      `lambda s: tok.encode(s, add_special_tokens=False)`).
    pad_id: the filler id at visual-token positions (its embedding is overwritten).
    lengths: visual tokens per placeholder kind ('support_image', 'query_image', 'region').

  Returns:
    (ids int32 [T], slots: list of Slot in order).

  Raises:
    KeyError: a placeholder kind missing from `lengths`.
  """
  ids: list[int] = []
  slots = []
  for p in parts:
    if isinstance(p, Placeholder):
      if p.kind not in lengths:
        raise KeyError(f"expand_placeholders: no length for placeholder kind {p.kind!r}; "
                       f"lengths has {sorted(lengths)}")
      n = int(lengths[p.kind])
      slots.append(Slot(p, len(ids), n))
      ids.extend([int(pad_id)] * n)
    else:
      ids.extend(int(i) for i in encode(p))
  return np.asarray(ids, np.int32), slots


def splice(embeds, slots: Sequence[Slot], visual: Sequence):
  """Writes visual tokens into token embeddings.

  Args:
    embeds: [T, D] (or [B, T, D] with visual [B, length, D]) numpy or JAX array.
    slots: from `expand_placeholders`.
    visual: one array per slot, [length, D] (or [B, length, D]).

  Returns:
    the embeddings with each slot's positions replaced (a new array; JAX-traceable).

  Raises:
    ValueError: a count or shape mismatch.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  if len(slots) != len(visual):
    raise ValueError(f"splice: {len(slots)} slots but {len(visual)} visual token arrays")
  out = jnp.asarray(embeds)
  for slot, v in zip(slots, visual):
    v = jnp.asarray(v, out.dtype)
    if v.shape[-2] != slot.length or v.shape[-1] != out.shape[-1]:
      raise ValueError(f"splice: visual tokens for {slot.placeholder} have shape "
                       f"{tuple(v.shape)}; expected [..., {slot.length}, {out.shape[-1]}]")
    out = out.at[..., slot.start:slot.start + slot.length, :].set(v)
  return out


# ----------------------------------------------------------------------------------------------
# Attributes.


class AttributeSource(Protocol):
  def attributes(self, class_name: str) -> list:
    """Short visual attributes of a class (noun phrases)."""


def _norm(attr: str) -> str:
  table = str.maketrans("", "", string.punctuation)
  return re.sub(r"\s+", " ", attr.lower().translate(table)).strip()


def remove_shared(attributes: Sequence[str], others: Iterable[Sequence[str]]) -> list:
  """`attributes` without those any other class also has (normalised exact match: case,
  whitespace and punctuation ignored). Order is kept; duplicates are dropped."""
  shared = {_norm(a) for attrs in others for a in attrs}
  out, seen = [], set()
  for a in attributes:
    n = _norm(a)
    if n and n not in shared and n not in seen:
      out.append(a)
      seen.add(n)
  return out


class StaticAttributes:
  """Attributes from a {class name: [attributes]} mapping.

  Raises (from `attributes`): KeyError naming the class and the known ones.
  """

  def __init__(self, table: Mapping[str, Sequence[str]]):
    self.table = {k: list(v) for k, v in table.items()}

  def attributes(self, class_name: str) -> list:
    if class_name not in self.table:
      raise KeyError(f"no attributes for class {class_name!r}; known classes: "
                     f"{sorted(self.table)[:10]}{'...' if len(self.table) > 10 else ''}")
    return list(self.table[class_name])


def synthetic_attributes(fields: Mapping) -> list:
  """The attributes of one embedded-benchmark category from its description fields (shape
  description, texture description, each palette colour, size class):

    ['the shape of a five-pointed star', 'a surface painted with parallel straight stripes of
     two alternating colours', 'red colour', 'blue colour', 'white colour', 'a small size']
  """
  shape = fields.get("shape_description")
  if shape is None:
    from fssjax.data import synthetic  # pylint: disable=import-outside-toplevel
    shape = synthetic.SHAPES[fields["shape"]]
  texture = fields.get("texture_description")
  if texture is None:
    from fssjax.data import synthetic  # pylint: disable=import-outside-toplevel
    texture = synthetic.TEXTURES[fields["texture"]][1]
  shape = shape.split(":")[0].split(" (")[0]  # 'an annulus: ...' -> 'an annulus'
  out = [f"the shape of {shape}", f"a surface {texture}"]
  out += [f"{c} colour" for c in fields["colours"]]
  out.append(f"a {fields['size']} size")
  return out


class SyntheticAttributes:
  """The embedded benchmark's exact attributes (see `synthetic_attributes`), by class name.

  Args:
    root: a generated benchmark directory (its descriptions.json), or None for the generator's
      own descriptions (`fssjax.priors.describe.describe_synthetic`).
  """

  def __init__(self, root: Optional[str] = None):
    from fssjax.priors.describe import describe_synthetic  # pylint: disable=import-outside-toplevel
    doc = describe_synthetic(root)
    self._by_name = {c["name"]: synthetic_attributes(c["fields"]) for c in doc["classes"]}

  def attributes(self, class_name: str) -> list:
    if class_name not in self._by_name:
      raise KeyError(f"{class_name!r} is not a category of the embedded benchmark (e.g. "
                     f"{sorted(self._by_name)[:3]})")
    return list(self._by_name[class_name])


ATTRIBUTE_PROMPT = ("List the visual attributes that distinguish a {name} in a photograph: "
                    "its parts, shape, texture and colours, as short noun phrases (at most "
                    "{k}).")
ATTRIBUTE_SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 1}


class LLMAttributes:
  """Attributes asked of the priors LLM client (every request cached by the client).

  Args:
    client: a `fssjax.priors.llm.LLMClient`.
    max_attributes: k in the prompt; longer answers are cut to k.
  """

  def __init__(self, client, max_attributes: int = 5):
    self.client = client
    self.max_attributes = max_attributes

  def attributes(self, class_name: str) -> list:
    prompt = ATTRIBUTE_PROMPT.format(name=class_name, k=self.max_attributes)
    answer = self.client.chat_json([{"role": "user", "content": prompt}], ATTRIBUTE_SCHEMA,
                                   instruction='Answer with a JSON list of strings, e.g. '
                                               '["black and white stripes", "four legs"].')
    attrs = [a.strip() for a in answer if a.strip()]
    return attrs[:self.max_attributes]


# ----------------------------------------------------------------------------------------------
# Superpixels and the region-attribute table.

Similarity = Callable[[np.ndarray, np.ndarray, Sequence[str]], np.ndarray]


def superpixels(image: np.ndarray, mask: np.ndarray, n_segments: int = 8,
                compactness: float = 10.0, min_region_pixels: int = 4,
                max_regions: Optional[int] = None) -> np.ndarray:
  """SLIC superpixels of the foreground.

  Args:
    image: uint8 [H, W, 3] (or float in [0, 1]).
    mask: [H, W] foreground (non-zero; 255 counts as background here).
    n_segments, compactness: skimage.segmentation.slic's.
    min_region_pixels: smaller superpixels are set to 0.
    max_regions: keep at most this many (the largest; ties: the lower SLIC label), the others
      set to 0 (SLIC's n_segments is approximate). None: all.

  Returns:
    int32 [H, W]: 0 outside the foreground (and in dropped superpixels), 1..K inside,
    consecutive ids.

  Raises:
    ValueError: image and mask sizes differ.
  """
  from skimage.segmentation import slic  # pylint: disable=import-outside-toplevel
  img = np.asarray(image)
  fg = (np.asarray(mask) != 0) & (np.asarray(mask) != 255)
  if img.shape[:2] != fg.shape:
    raise ValueError(f"image has shape {img.shape} but mask has {fg.shape}; expected the same "
                     f"[H, W]")
  if not fg.any():
    return np.zeros(fg.shape, np.int32)
  x = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
  labels = slic(x, n_segments=n_segments, compactness=compactness, mask=fg, start_label=1,
                channel_axis=-1 if x.ndim == 3 else None)
  labels = np.where(fg, labels, 0)
  out = np.zeros(fg.shape, np.int32)
  keep = [(int((labels == r).sum()), int(r)) for r in np.unique(labels) if r != 0]
  keep = [(n, r) for n, r in keep if n >= min_region_pixels]
  if max_regions is not None and len(keep) > max_regions:
    keep = sorted(sorted(keep, key=lambda t: (-t[0], t[1]))[:max_regions], key=lambda t: t[1])
  for k, (_, r) in enumerate(keep):
    out[labels == r] = k + 1
  return out


def masked_crops(image: np.ndarray, regions: np.ndarray, size: int = 224,
                 fill: Optional[Sequence[float]] = None) -> np.ndarray:
  """One square crop per region for an image encoder: the region's bounding box (made square
  around its centre, clipped to the image), pixels outside the region set to `fill` (default:
  the image's mean colour), resized to size x size with PIL bilinear.

  Args:
    image: uint8 [H, W, 3].
    regions: bool [K, H, W] (each non-empty).

  Returns:
    uint8 [K, size, size, 3].
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  img = np.asarray(image)
  h, w = img.shape[:2]
  fill_value = np.asarray(img.reshape(-1, img.shape[-1]).mean(0) if fill is None else fill)
  out = []
  for r in np.asarray(regions, bool):
    ys, xs = np.nonzero(r)
    if len(ys) == 0:
      raise ValueError("masked_crops: an empty region mask; expected at least one pixel each")
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) / 2
    y0, y1 = int(max(0, np.floor(cy - half))), int(min(h, np.ceil(cy + half)))
    x0, x1 = int(max(0, np.floor(cx - half))), int(min(w, np.ceil(cx + half)))
    crop = np.where(r[..., None], img, fill_value).astype(np.uint8)[y0:y1, x0:x1]
    out.append(np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)))
  return np.stack(out)


def embedding_similarity(image_encoder: Callable[[np.ndarray], np.ndarray],
                         text_encoder: Callable[[Sequence[str]], np.ndarray], *,
                         size: int = 224) -> Similarity:
  """A `Similarity` from two encoders into one embedding space (CLIP-style): cosine similarity
  of each region's masked crop (`masked_crops`) and each attribute text.

  Args:
    image_encoder: uint8 [K, size, size, 3] -> [K, D] embeddings.
    text_encoder: list of A strings -> [A, D] embeddings.
    size: crop side.

  Returns:
    fn(image, regions [K, H, W], attributes) -> [K, A] cosine similarities.
  """
  def similarity(image, regions, attributes):
    v = np.asarray(image_encoder(masked_crops(image, regions, size)), np.float64)
    t = np.asarray(text_encoder(list(attributes)), np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    return v @ t.T
  return similarity


def region_attribute_table(image: np.ndarray, mask: np.ndarray, attributes: Sequence[str],
                           similarity: Similarity, *, n_segments: int = 8,
                           compactness: float = 10.0, min_region_pixels: int = 4,
                           min_similarity: Optional[float] = None,
                           labels: Optional[np.ndarray] = None) -> list:
  """Matches attributes to superpixels of the support foreground (rules in the module
  docstring).

  Args:
    image: the support image [H, W, 3].
    mask: its foreground mask [H, W].
    attributes: the (distinguishing) attributes to place.
    similarity: fn(image, region_masks bool [K, H, W], attributes) -> [K, A] scores.
    labels: precomputed superpixel labels (else `superpixels(image, mask, ...)`).
    min_similarity: attributes whose best score is lower are left out (None: keep all).

  Returns:
    list of RegionAttributes, region-id order, only regions with at least one attribute.

  Raises:
    ValueError: the similarity returns another shape than [K, A].
  """
  if labels is None:
    labels = superpixels(image, mask, n_segments, compactness, min_region_pixels)
  ids = [int(r) for r in np.unique(labels) if r != 0]
  if not ids or not attributes:
    return []
  regions = np.stack([labels == r for r in ids])
  scores = np.asarray(similarity(image, regions, list(attributes)), np.float64)
  if scores.shape != (len(ids), len(attributes)):
    raise ValueError(f"similarity returned shape {scores.shape}; expected [regions, attributes]"
                     f" = ({len(ids)}, {len(attributes)})")
  return table_from_scores(scores, attributes, ids, regions, min_similarity=min_similarity)


def table_from_scores(scores: np.ndarray, attributes: Sequence[str], region_ids: Sequence[int],
                      region_masks: Optional[np.ndarray] = None, *,
                      min_similarity: Optional[float] = None) -> list:
  """The table rows of precomputed scores (the matching rule of `region_attribute_table`):
  each attribute goes to its best region (argmax over regions; ties: the first), attributes
  whose best score is below `min_similarity` are left out; rows in region-id order.

  Args:
    scores: [K, A] (region k = `region_ids[k]`, attribute a = `attributes[a]`).
    region_ids: the K region ids (ascending).
    region_masks: bool [K, H, W] for the rows' `mask` (None: None).

  Returns:
    list of RegionAttributes, only regions with at least one attribute.
  """
  scores = np.asarray(scores, np.float64)
  if scores.shape != (len(region_ids), len(attributes)):
    raise ValueError(f"table_from_scores: scores have shape {scores.shape}; expected "
                     f"[regions, attributes] = ({len(region_ids)}, {len(attributes)})")
  if not len(region_ids) or not len(attributes):
    return []
  best = np.argmax(scores, axis=0)  # first maximum: the lower region id on ties
  rows = {}
  for a, attr in enumerate(attributes):
    s = float(scores[best[a], a])
    if min_similarity is not None and s < min_similarity:
      continue
    r = int(region_ids[int(best[a])])
    mask = None if region_masks is None else region_masks[int(best[a])]
    row = rows.setdefault(r, RegionAttributes(r, mask, [], []))
    row.attributes.append(attr)
    row.scores.append(s)
  return [rows[r] for r in sorted(rows)]


# ----------------------------------------------------------------------------------------------
# The instruction.


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def build_instruction(class_name: str, attributes: Sequence[str],
                      supports: Sequence[SupportExample], query_size: tuple, *,
                      query_polygons: Optional[Sequence[np.ndarray]] = None,
                      given_points: Optional[np.ndarray] = None,
                      num_points: int = NUM_POINTS) -> Instruction:
  """The LLaFS prompt for one episode.

  Order: task part; "[class] has [attributes]."; per support k: the worked example (support
  image placeholder, size, ground-truth polygons) and its region-attribute table (one region
  placeholder per row); the query image placeholder; for curriculum pretraining the given
  first points of the query's first polygon.

  Args:
    class_name: the class to segment.
    attributes: every attribute of the class (the sentence lists them all; an empty list
      leaves the sentence out).
    supports: one SupportExample per shot (at least one).
    query_size: (height, width) of the query image as the LLM sees it.
    query_polygons: the query's ground truth (training): `answer` becomes its text.
    given_points: int [m, 2] points given in the instruction (pseudo-sample curriculum;
      None or m = 0: none). The answer still holds every point of every polygon.
    num_points: polygon size in the task text.

  Returns:
    Instruction.

  Raises:
    ValueError: no supports.
  """
  if not supports:
    raise ValueError("build_instruction: at least one support example is needed")
  parts: list[Union[str, Placeholder]] = []
  parts.append(TASK_TEMPLATE.format(cls=class_name, n=num_points) + "\n")
  if attributes:
    parts.append(ATTRIBUTE_TEMPLATE.format(cls_cap=_cap(class_name),
                                           attributes="; ".join(attributes)) + "\n")
  for k, sup in enumerate(supports):
    h, w = sup.size
    head, tail = SUPPORT_TEMPLATE.format(k=k + 1, image="\x00", w=w, h=h, cls=class_name,
                                         polygons=format_polygons(sup.polygons)).split("\x00")
    parts += [head, Placeholder("support_image", shot=k), tail + "\n"]
    if sup.table:
      parts.append(TABLE_HEADER.format(k=k + 1) + "\n")
      for row in sup.table:
        head, tail = TABLE_ROW.format(r=row.region, region="\x00",
                                      attributes="; ".join(row.attributes)).split("\x00")
        parts += [head, Placeholder("region", shot=k, region=row.region), tail + "\n"]
  qh, qw = query_size
  head, tail = QUERY_TEMPLATE.format(image="\x00", w=qw, h=qh, cls=class_name).split("\x00")
  parts += [head, Placeholder("query_image"), tail]
  if given_points is not None and len(given_points):
    pts = np.asarray(given_points).reshape(-1, 2)
    parts.append("\n" + GIVEN_TEMPLATE.format(m=len(pts), cls=class_name,
                                              points=format_polygon(pts)))
  # Merge adjacent strings.
  merged: list[Union[str, Placeholder]] = []
  for p in parts:
    if isinstance(p, str) and merged and isinstance(merged[-1], str):
      merged[-1] += p
    elif not (isinstance(p, str) and not p):
      merged.append(p)
  answer = None if query_polygons is None else format_polygons(list(query_polygons))
  return Instruction(parts=merged, answer=answer)
