"""LLaFS as an fssjax method (Zhu, Chen, Ji, Ye, Liu: "LLaFS: When Large Language Models Meet
Few-Shot Segmentation", CVPR 2024; the authors released no code: this is our implementation
of the paper's description, and every choice the paper leaves open is listed below).

Per episode:

  * a frozen image encoder (the ResNet-50 of the HSNet backbones, `fssjax.nn.resnet`; one
    tap, `model.feature_tap`) gives a feature map of each image; a Q-Former (BLIP-2 layout,
    `fssjax.nn.qformer`, transformers `Blip2QFormerModel` names) turns it into
    `num_query_tokens` visual tokens and a linear layer (`language_projection`) maps them
    into the LLM's embedding space;
  * the instruction (`fssjax.priors.instruction`; 'full': the paper's task part, "[class] has
    [attributes]" (`model.attributes`), every support as a worked example with its
    ground-truth polygons and (`model.region_table`) its region-attribute table, then the
    query; 'compact': only the worked examples and the query, for CPU token budgets) is
    tokenised with the visual tokens spliced at its `<support_image>` / `<query_image>` /
    `<region>` placeholders, in the LLM's chat format;
  * the LLM (LLaMA family, `fssjax.nn.llama`, under LoRA on `lora_targets`) writes the query
    mask as 16-point clockwise polygons `((x1,y1),...,(x16,y16))` (`fssjax.priors.polygons`);
  * the polygons are parsed robustly (malformed / truncated / out-of-range answers are
    repaired where possible, otherwise counted as failed and scored as an empty mask) and
    rasterised into the coarse mask; the refinement network (`fssjax.nn.refine`) takes the
    query image and the coarse mask and outputs the final mask logits.

Loss (training): token cross-entropy on the answer (teacher forcing) x `ce_weight` + the
refinement loss (BCE + Dice, `refine_loss`) x `refine_weight` on the refinement network's
output for the coarse mask of the teacher-forced answer (the argmax token at each answer
position, parsed and rasterised: the model's own coarse mask, without a generation pass).

Prediction: greedy decoding with the KV cache (one prefill of the left-padded prompts with
the visual tokens spliced, then `fssjax.nn.llama.decode`: a jitted while-loop, batched, at
most `max_new_tokens`), parse, rasterise, refine. `model.output='coarse'` returns the
rasterised polygons instead (the coarse mIoU, e.g. as a second evaluator with
`model=dict(output='coarse')`). Parsing statistics (ok / repaired / failed answers, new
tokens, decoding speed) are logged after each batch and returned by `generation_stats()`.

Host work inside the jitted functions. Polygons and token ids depend on the masks, so they
are made on the host inside the traced `loss` / `predict` with `jax.pure_callback`
(`io_callback` for the counting parse): masks -> polygons -> text -> token ids with
positions of the visual tokens; generated ids -> text -> parse -> coarse masks.

Attributes and the region-attribute table (the paper's fine-grained in-context instruction):
  * `model.attributes`: '' (none), 'synthetic' (the embedded benchmark's exact shape,
    texture, colour and size fields, `SyntheticAttributes`), 'llm' (`LLMAttributes`: the
    priors LLM client of `model.attribute_llm`, default the local SmolLM2, at most
    `max_attributes` per class, every answer cached by the client) or a JSON file {class name:
    [attribute, ...]} (classes it lacks get none, with a warning). Every class of the data
    set is looked up once, when the codec is built. The 'full' instruction then says
    "[Class] has a; b; c." with every attribute (shared ones too);
  * `model.region_table` (needs 'full', attributes and `model.clip`, a transformers CLIPModel
    directory, `fssjax.weights.clip`), inside the jitted loss / predict:
      1. host (`pure_callback`): SLIC superpixels of each support's foreground on the
         un-normalised image (`instruction.superpixels`, n_segments = `region_segments` = R,
         at most R regions kept, the largest) -> labels [B, K, H, W];
      2. graph: one masked square crop per superpixel (`masked_crop`, the JAX twin of
         `instruction.masked_crops`: outside the region the image's mean colour; crops agree
         with PIL's to 1.4e-3 in cosine on the tests' fixture) -> the CLIP image tower and
         `visual_projection` (frozen, `params/clip`, loaded by `load_pretrained`) -> cosine to
         the class's attribute text embeddings (`attribute_embeddings`: CLIP's text tower and
         `text_projection`, computed once, eagerly, for every class of the data set, a
         constant [C, A, P] of the graph) -> similarities [B, K, R, A] (no gradient);
      3. host (the layout callback): `instruction.table_from_scores` on the regions present
         (each attribute to its argmax region) -> the table text, one row per region with an
         attribute, `region r <region>: a; b`, under each worked example;
      4. region tokens (ours): the Q-Former on the support's features with the region channel
         = that superpixel's mask (area-resized to the feature map), its Q tokens averaged in
         `region_tokens` groups of Q / n consecutive tokens; n tokens per `<region>`, visual
         index (K + 1) Q + (k R + r - 1) n + i (after the images' tokens). Regions not in the
         table are computed and unused.
    Attributes shared with other classes are removed before matching (`shared_with`:
    'dataset', every other class of the data set's class list (`remove_shared`: exact match
    after normalising case, spacing and punctuation), or 'none'). The episode's other
    annotated classes would be closer to "other classes" but batches carry only the binary
    masks. With 'synthetic' attributes and 'dataset' nothing is left: every shape, texture,
    colour and size of the embedded benchmark is shared by some other class (a warning
    says how many classes keep nothing). Stage batches (captions, pseudo-samples) have no
    class and no table.

Sequence layout: prompts are left-padded to `max_prompt_tokens` and the answer (training)
follows at a fixed offset, right-padded to `max_answer_tokens`, so the logits are computed
only at the answer positions and generation sees exactly the training layout. A prompt or
answer that does not fit is cut (prompt: its start; answer: its end, as a truncated answer)
and counted (`llafs/truncated_*` metrics).

Training stages (paper, Sec. 3.4), `model.stages`:
  (a) 'align': visual tokens aligned to the LLM on image-caption pairs (LLM frozen, the
      Q-Former and projection trained; the embedded benchmark's ground-truth captions,
      `fssjax.data.captions`, for the offline demo);
  (b) 'curriculum': pretraining on pseudo-samples (`fssjax.data.pseudo_samples`) with the
      difficulty rising linearly over the steps (support-query foreground shift up,
      foreground-background contrast down, fewer of the 16 vertices given: 15 -> 0), the same
      trainable set and loss as (c);
  (c) few-shot training on the base classes: the generic trainer (`fssjax.train`) with this
      method's `loss`.
  Optional, ours (between (a) and (b)): 'locate', localisation pretraining of the visual
  tokens without the LLM (`locate_loss`, `locate_terms`): the image encoder and Q-Former
  learn to put the answer polygon into the query tokens, token j holding coordinate j of
  (x1, y1, ..., xP, yP) as the LLM's embedding of its digit (grid <= 10, num_query_tokens =
  2 num_points), the support tokens likewise for the support's polygon, the prototype prior
  a BCE towards the query mask, and the refinement network is trained on the rasterised
  polygon of the tokens' nearest digits. No LLM forward, so a CPU step costs about a tenth
  of an LLM step. `locate_weight` > 0 adds the same token and prior terms to the loss of
  (b) and (c), so the LLM's gradient does not pull the tokens off their digits. The split of
  work is then: the visual side (encoder, prior, Q-Former) finds the object and its extreme
  points; the LLM reads the query tokens (with the support's tokens and polygon text as the
  worked example) and writes the polygon text, which alone gives the coarse mask. The paper
  trains its Q-Former only through the LLM (stages a-c); this stage is our aid for a CPU
  budget in which the LLM sees a few hundred episodes.
  (a), 'locate' and (b) run in `load_pretrained` before (c) starts, each cached in
  `model.stage_dir` (default ~/.cache/fssjax/llafs, keyed by a hash of every setting they
  depend on), so a rerun or a resumed run skips finished stages; (c) resumes from the
  trainer's checkpoints. Stage keys: steps, batch, lr, log_every, frozen (parameter-path
  prefixes the stage keeps fixed, besides its defaults); 'locate' also data
  ('episodes': the base-class training episodes; 'pseudo': pseudo-samples) and
  refine_batch (the refinement loss on the first n episodes of a batch; 0 = all).

Choices where the paper is silent (ours):
  * coordinates on a grid (`model.grid` G > 0): the LLM reads and writes x, y in [0, G-1],
    cell = floor(pixel x G / size); parsing maps a cell to its centre. G = 0 writes pixels.
    Fewer digits per point keep answers short (SmolLM2's tokenizer writes one token per digit);
  * `max_objects`: at most this many polygons per mask (largest first; 0 = all);
  * `vertices`: how the points of a polygon are chosen: 'arc' (evenly spaced by arc length
    from the topmost point) or 'extreme' (the outline's extreme points in num_points
    directions clockwise from straight up, `fssjax.priors.polygons.extreme_points`: each
    vertex is a fixed function of the mask, which cross-attention can find; on the
    embedded benchmark's test queries, 8 points on the 10-grid keep 49.5 mIoU of the truth
    against 48.4 for 'arc');
  * `visual_layout`: where an image's visual tokens stand in the prompt. 'block' (the
    paper's figure: one span of `num_query_tokens` tokens per image) or 'polygon' (ours):
    the 2P tokens of an image (num_query_tokens = 2 num_points, grid <= 10, as in stage
    'locate') take the places of the digits in a one-object answer polygon,
    `(((t1,t2),(t3,t4),...))`, tokenised exactly as the answer (`PromptCodec.
    polygon_template`). Together with the worked example (the support's template, then its
    polygon text) the answer is then a copy of the query's template with each token read as
    a digit: an induction pattern that LoRA learns within about 10 steps, where the 'block'
    layout did not learn to read the tokens in 120 (docs/llafs.md);
  * `snap_tokens`: each visual token entering the LLM is replaced by the LLM's embedding of
    its nearest digit (`snap`; straight-through gradient, as VQ-VAE), so that the LLM reads
    exactly one digit per token (the 'locate' targets' settings needed);
  * `truth_tokens` = p (training, stages (b) and (c)): in a random fraction p of the
    episodes every image's tokens are the digit embeddings of its own polygon
    (`truth_visual`). With noisy tokens alone the LLM learned to write something between
    the tokens and a mean shape (in the demo it agreed with the query tokens' digits on
    about half of the coordinates); with snapped tokens it cannot tell these episodes from
    the others, and learns to read the tokens;
  * `visual_grad=False`: the LLM loss of (b), (c) leaves the encoder and Q-Former without
    gradient (`stop_gradient` on the tokens and the prior; with Adam and no weight decay
    they keep their values, and stay in the checkpoint), so that the visual side keeps
    what stage 'locate' taught it (in the demo, (c) otherwise lowered the tokens' own
    polygon from 35 to 23-27 refined mIoU). Stage (a) always trains the visual side;
  * `position_linear`: two more position channels, x and y in [-1, 1] (CoordConv-style),
    for the extreme points;
  * the image features entering the Q-Former carry a 2-D sinusoidal position code
    (`position_channels`; a ResNet map has none, unlike BLIP-2's ViT) and one region channel:
    the support's mask for support images; for the query, zeros (`query_prior='none'`, the
    paper) or the cosine similarity c to the support's masked-average feature as a
    probability sigmoid(10 (c - 0.5)) (`query_prior='prototype'`, PANet / HSNet-style
    prior on the scale of the support's mask channel; a demo aid for CPU budgets);
  * the refinement network's coarse input in training (the teacher-forced argmax answer);
  * K shots: 'joint' (all K worked examples in one instruction, as the paper's in-context
    part); the stage (a) prompt is the image tokens then the caption; stage (b) prompts give
    the first m vertices as text after the query (`GIVEN_TEMPLATE`);
  * the region-attribute table (above): SLIC with R = 8 segments by default; CLIP cosine
    of masked square crops; every attribute placed (no similarity threshold); shared
    attributes removed against the data set's other classes; region tokens from the
    Q-Former with the superpixel as its region channel, pooled to 4 tokens per region by
    default; the sentence keeps every attribute.

Weights: `model.llm` (a transformers LLaMA directory such as CodeLLaMA-7B, a GGUF file, or
'smollm2' for the offline SmolLM2-135M-Instruct) or random from `model.llm_config`;
`model.backbone_weights` (torchvision ResNet-50 state dict as safetensors) or random. The
Q-Former starts from `model.qformer_weights` (a BLIP-2 checkpoint, `load_qformer`) or random.
`model.clip` (region table): a transformers CLIPModel directory (safetensors, its tokenizer's
vocab.json and merges.txt).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import threading
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
from jax.experimental import io_callback
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fssjax.methods import base
from fssjax.methods.base import ConfigError, Method, PyTree, compute_dtype
from fssjax.nn import llama as nl
from fssjax.nn import qformer as qf
from fssjax.nn import refine as refine_lib
from fssjax.nn import resnet as resnet_lib
from fssjax.priors import instruction as ins
from fssjax.priors import polygons as poly

# Chat formats: (before the user turn, between the user turn and the answer, after the
# answer, prepend BOS). 'llama2': CodeLLaMA-Instruct / LLaMA-2 chat; 'chatml': SmolLM2 / Qwen;
# 'plain': no template (base models, tests).
CONVERSATIONS = {
    "llama2": ("[INST] ", " [/INST] ", "</s>", True),
    "chatml": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>",
               False),
    "plain": ("", "\nAnswer: ", "\n", False),
}
CAPTION_PROMPT = "Describe the image."
INSTRUCTIONS = ("full", "compact")
VISUAL_LAYOUTS = ("block", "polygon")
QUERY_PRIORS = ("none", "prototype")
PRIOR_SCALE = 10.0  # 'prototype': sigmoid(PRIOR_SCALE (cos - 0.5))
OUTPUTS = ("refined", "coarse")
ATTRIBUTE_SOURCES = ("synthetic", "llm")  # or a JSON path
SHARED_WITH = ("dataset", "none")

_DEFAULTS = dict(
    backbone="resnet50",
    backbone_weights="",
    allow_pickle_weights=False,
    feature_tap=-1,  # -1: the first tap at stride 16 (HSNet's layer3 start)
    qformer={},  # QFormerConfig fields (encoder_hidden_size and llm_hidden_size are set here)
    qformer_weights="",
    num_query_tokens=32,
    visual_layout="block",  # 'block' (the paper) | 'polygon' (ours; see the docstring)
    snap_tokens=False,  # visual tokens -> the nearest digit embedding (straight-through)
    truth_tokens=0.0,  # (b), (c): this fraction of episodes reads the answer's digit tokens
    visual_grad=True,  # False: the LLM loss of (b), (c) does not train the visual side
    position_channels=32,
    position_linear=False,  # two more channels: x, y in [-1, 1]
    query_prior="none",
    llm="",
    llm_config={},
    tokenizer="",
    conversation="llama2",
    lora_rank=8,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_targets=("q_proj", "v_proj"),
    num_points=poly.NUM_POINTS,
    vertices="arc",  # 'arc' | 'extreme' (fssjax.priors.polygons.mask_to_polygons)
    grid=0,
    max_objects=0,
    instruction="full",
    attributes="",  # '' | 'synthetic' | 'llm' | a JSON file {class name: [attribute, ...]}
    attribute_llm={},  # attributes='llm': a fssjax.priors.llm.LLMClient config (local SmolLM2)
    max_attributes=5,  # attributes='llm': at most this many per class
    region_table=False,  # the region-attribute table per support ('full' + attributes + clip)
    clip="",  # region_table: a transformers CLIPModel directory (the text-image similarity)
    shared_with="dataset",  # attributes removed before matching: shared with 'dataset' | 'none'
    region_segments=8,  # SLIC n_segments = the most regions R per support
    region_tokens=4,  # visual tokens per region (divides num_query_tokens)
    class_names=(),  # () = the data set's (synthetic, COCO-20i, PASCAL-5i); else "object"
    max_prompt_tokens=1024,
    max_answer_tokens=256,
    max_new_tokens=0,  # 0: max_answer_tokens
    refine_width=32,
    ce_weight=1.0,
    refine_weight=1.0,
    locate_weight=0.0,  # the localisation loss of the visual tokens in stages (b), (c)
    output="refined",
    stages={},  # {'align': {steps, batch, lr}, 'curriculum': {steps, batch, lr}}
    stage_dir="",
    remat=False,
    dtype="",
)

_TRAINABLE = (
    r"params/qformer/.*",
    r"params/llm/.*lora_(A|B)/.*",
    r"params/refine/.*",
)


# ----------------------------------------------------------------------------------------
# Polygons on the coordinate grid.


def to_grid(polygons: Sequence[np.ndarray], size: tuple, grid: int) -> list:
  """Pixel polygons [N, 2] (x, y) -> grid cells floor(p x G / size) (unchanged for G = 0)."""
  if grid <= 0:
    return [np.asarray(p, np.int32) for p in polygons]
  h, w = size
  out = []
  for p in polygons:
    p = np.asarray(p, np.float64)
    q = np.stack([np.floor(p[:, 0] * grid / w), np.floor(p[:, 1] * grid / h)], -1)
    out.append(np.clip(q, 0, grid - 1).astype(np.int32))
  return out


def from_grid(polygons: Sequence[np.ndarray], size: tuple, grid: int) -> list:
  """Grid cells -> pixel coordinates of the cell centres (float; unchanged for G = 0)."""
  if grid <= 0:
    return [np.asarray(p, np.float64) for p in polygons]
  h, w = size
  return [np.stack([(np.asarray(p)[:, 0] + 0.5) * w / grid - 0.5,
                    (np.asarray(p)[:, 1] + 0.5) * h / grid - 0.5], -1) for p in polygons]


def mask_polygon_text(mask: np.ndarray, *, num_points: int, grid: int, max_objects: int,
                      vertices: str = "arc") -> tuple[str, list]:
  """(answer text, grid polygons) of a mask (255 counts as background; `vertices`: see
  `fssjax.priors.polygons.mask_to_polygons`)."""
  m = np.asarray(mask) == 1
  polys = poly.mask_to_polygons(m, num_points, max_objects=max_objects or None,
                                vertices=vertices)
  g = to_grid(polys, m.shape, grid)
  return poly.format_polygons(g), g


def rasterise_answer(text: str, size: tuple, *, num_points: int, grid: int
                     ) -> tuple[np.ndarray, poly.ParseResult]:
  """(coarse uint8 [H, W], ParseResult) of an answer: parsed on the grid (or the image),
  rasterised at `size`."""
  h, w = size
  gh, gw = (grid, grid) if grid > 0 else (h, w)
  res = poly.parse_polygons(text, gh, gw, num_points)
  return poly.polygons_to_mask(from_grid(res.polygons, size, grid), h, w), res


# ----------------------------------------------------------------------------------------
# Prompts: token ids with the visual-token positions.


def check_polygon_layout(layout: str, num_query_tokens: int, num_points: int,
                         grid: int) -> None:
  """ConfigError unless `visual_layout='polygon'` can write one visual token per coordinate
  (num_query_tokens = 2 x num_points, a grid of 1 to 10 cells); other layouts pass."""
  if layout == "polygon" and (num_query_tokens != 2 * num_points or not 1 <= grid <= 10):
    raise ConfigError(
        f"config.model.visual_layout='polygon' writes an image's visual tokens in place of "
        f"the digits of a one-object answer polygon, one token per coordinate: it needs "
        f"num_query_tokens = 2 x num_points (got {num_query_tokens} and {num_points}) and a "
        f"grid of 1 to 10 cells (got grid={grid})")


@dataclasses.dataclass
class Encoded:
  """One sequence of the fixed layout (see the module docstring); all int32 [T]."""

  ids: np.ndarray
  visual: np.ndarray  # index into the episode's visual tokens, -1 for text
  labels: np.ndarray  # next-token target at each position, -1 where not trained
  mask: np.ndarray  # 1 on tokens
  truncated_prompt: bool = False
  truncated_answer: bool = False


class PromptCodec:
  """Instruction -> token ids in the fixed layout, and generated ids -> text.

  Visual tokens of an episode are numbered support 0 (Q tokens), ..., support K-1, then the
  query (Q tokens): index k * Q + j; then the region tokens (region table): n per region, R
  regions per support, region id r (1-based) of support k at (K + 1) Q + (k R + r - 1) n + i.
  Captions (stage a) use the query slot only.

  `attributes[c]`: the attributes of class c for the "[class] has [attributes]" sentence of
  the 'full' instruction (() or an empty list: no sentence).
  """

  def __init__(self, tokenizer, *, num_query_tokens: int, conversation: str,
               instruction: str, num_points: int, grid: int, max_objects: int,
               max_prompt_tokens: int, max_answer_tokens: int,
               class_names: Sequence[str] = (), vertices: str = "arc",
               visual_layout: str = "block", attributes: Sequence[Sequence[str]] = (),
               max_regions: int = 0, region_tokens: int = 0):
    if conversation not in CONVERSATIONS:
      raise ConfigError(f"config.model.conversation={conversation!r}; expected one of "
                        f"{sorted(CONVERSATIONS)}")
    if instruction not in INSTRUCTIONS:
      raise ConfigError(f"config.model.instruction={instruction!r}; expected one of "
                        f"{list(INSTRUCTIONS)}")
    self.tok = tokenizer
    self.q = int(num_query_tokens)
    self.before, self.between, self.after, self.bos = CONVERSATIONS[conversation]
    self.instruction = instruction
    self.num_points, self.grid, self.max_objects = int(num_points), int(grid), int(max_objects)
    if vertices not in poly.VERTICES:
      raise ConfigError(f"config.model.vertices={vertices!r}; expected one of "
                        f"{list(poly.VERTICES)}")
    self.vertices = vertices
    if visual_layout not in VISUAL_LAYOUTS:
      raise ConfigError(f"config.model.visual_layout={visual_layout!r}; expected one of "
                        f"{list(VISUAL_LAYOUTS)}")
    self.visual_layout = visual_layout
    check_polygon_layout(visual_layout, self.q, self.num_points, self.grid)
    self._template: Optional[tuple] = None
    self.tp, self.ta = int(max_prompt_tokens), int(max_answer_tokens)
    self.class_names = list(class_names)
    self.attributes = [list(a) for a in attributes]
    self.max_regions, self.region_tokens = int(max_regions), int(region_tokens)
    self.pad_id = int(tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    self._cache: dict[str, list] = {}
    self._lock = threading.RLock()

  def encode(self, text: str) -> list:
    with self._lock:  # one tokenizer call at a time (host callbacks run on other threads)
      if text not in self._cache:
        if len(self._cache) > 50_000:
          self._cache.clear()
        self._cache[text] = [int(i) for i in self.tok.encode(text, add_special_tokens=False)]
      return self._cache[text]

  def _name(self, class_id: int) -> str:
    if 0 <= class_id < len(self.class_names):
      return str(self.class_names[class_id])
    return "object"

  def _size(self, size: tuple) -> tuple:
    return (self.grid, self.grid) if self.grid > 0 else tuple(size)

  def polygons(self, mask: np.ndarray) -> tuple[str, list]:
    """(answer text, grid polygons) of a mask with this codec's settings."""
    return mask_polygon_text(mask, num_points=self.num_points, grid=self.grid,
                             max_objects=self.max_objects, vertices=self.vertices)

  def class_attributes(self, class_id: int) -> list:
    """The attributes of a class for the instruction's sentence ([] when none / unknown)."""
    if 0 <= class_id < len(self.attributes):
      return list(self.attributes[class_id])
    return []

  def episode_parts(self, support_masks: Sequence[np.ndarray], class_id: int = -1,
                    given: Optional[np.ndarray] = None,
                    tables: Optional[Sequence[Optional[list]]] = None) -> list:
    """The user turn as text and Placeholders (supports' polygons from their masks; `tables`:
    per support its region-attribute table rows, 'full' instruction only)."""
    sups = []
    for k, m in enumerate(support_masks):
      _, g = self.polygons(m)
      sups.append(ins.SupportExample(size=self._size(np.shape(m)), polygons=g,
                                     table=tables[k] if tables is not None else None))
    size = self._size(np.shape(support_masks[0]))
    if self.instruction == "full":
      built = ins.build_instruction(self._name(class_id), self.class_attributes(class_id),
                                    sups, size, given_points=given,
                                    num_points=self.num_points)
      parts = list(built.parts)
    else:
      parts = []
      for k, s in enumerate(sups):
        parts += [ins.Placeholder("support_image", shot=k), poly.format_polygons(s.polygons)]
      parts.append(ins.Placeholder("query_image"))
      if given is not None and len(given):
        parts.append(" " + poly.format_polygon(np.asarray(given).reshape(-1, 2))[:-1])
    return parts

  def polygon_template(self) -> tuple[list, list]:
    """'polygon' layout: (token ids, slot) of a one-object answer polygon, slot j >= 0 at the
    token of coordinate j (x1, y1, ..., xP, yP), -1 at the punctuation. The ids are the
    answer's own tokens (digits tokenised apart from the punctuation, as SmolLM2 and LLaMA
    do; checked), so the answer is a copy of the template with each slot read as a digit."""
    if self._template is None:
      ids = self.encode(poly.format_polygons([np.zeros((self.num_points, 2), np.int32)]))
      zero = self.encode("0")
      slots, j = [], 0
      for t in ids:
        if len(zero) == 1 and t == zero[0]:
          slots.append(j)
          j += 1
        else:
          slots.append(-1)
      if j != self.q:
        raise ConfigError(
            f"config.model.visual_layout='polygon': the tokenizer does not write each "
            f"coordinate of {poly.format_polygons([np.zeros((self.num_points, 2), int)])!r} "
            f"as one digit token ({j} digit tokens found, {self.q} expected)")
      self._template = (ids, slots)
    return self._template

  def _prompt_ids(self, parts: Sequence, shots: int) -> tuple[list, list]:
    ids: list = [int(self.tok.bos_id)] if (self.bos and self.tok.bos_id is not None) else []
    vis: list = [-1] * len(ids)
    for p in [self.before] + list(parts) + [self.between]:
      if isinstance(p, ins.Placeholder) and p.kind == "region":
        n, r = self.region_tokens, self.max_regions
        if n <= 0 or not 1 <= p.region <= r or not 0 <= p.shot < shots:
          raise ValueError(f"PromptCodec: {p} has no region tokens (shots {shots}, "
                           f"{r} regions of {n} tokens each)")
        start = (shots + 1) * self.q + (p.shot * r + p.region - 1) * n
        ids += [self.pad_id] * n
        vis += list(range(start, start + n))
      elif isinstance(p, ins.Placeholder):
        k = p.shot if p.kind == "support_image" else shots
        if self.visual_layout == "polygon":
          t_ids, slots = self.polygon_template()
          ids += [self.pad_id if j >= 0 else t for t, j in zip(t_ids, slots)]
          vis += [k * self.q + j if j >= 0 else -1 for j in slots]
        else:
          ids += [self.pad_id] * self.q
          vis += [k * self.q + j for j in range(self.q)]
      elif p:
        t = self.encode(p)
        ids += t
        vis += [-1] * len(t)
    return ids, vis

  def answer_ids(self, answer: str) -> list:
    out = self.encode(answer)
    if self.after == "</s>":
      return out + [int(self.tok.eos_id)]
    return out + (self.encode(self.after) if self.after else [])

  def layout(self, parts: Sequence, shots: int, answer: Optional[str]) -> Encoded:
    """The fixed layout: prompt left-padded to max_prompt_tokens, the answer (if given)
    after it, right-padded to max_answer_tokens (labels on the answer tokens)."""
    p_ids, p_vis = self._prompt_ids(parts, shots)
    cut_p = len(p_ids) > self.tp
    if cut_p:
      p_ids, p_vis = p_ids[-self.tp:], p_vis[-self.tp:]
    ta = self.ta if answer is not None else 0
    t = self.tp + ta
    ids = np.full(t, self.pad_id, np.int32)
    vis = np.full(t, -1, np.int32)
    labels = np.full(t, -1, np.int32)
    mask = np.zeros(t, np.int32)
    s = self.tp - len(p_ids)
    ids[s:self.tp] = p_ids
    vis[s:self.tp] = p_vis
    mask[s:self.tp] = 1
    cut_a = False
    if answer is not None:
      a = self.answer_ids(answer)
      cut_a = len(a) > ta
      a = a[:ta]
      ids[self.tp:self.tp + len(a)] = a
      mask[self.tp:self.tp + len(a)] = 1
      labels[self.tp - 1:self.tp - 1 + len(a)] = a  # position i predicts token i + 1
    return Encoded(ids, vis, labels, mask, cut_p, cut_a)

  def episode(self, support_masks, query_mask=None, class_id: int = -1, given=None,
              tables=None) -> Encoded:
    parts = self.episode_parts(support_masks, class_id, given, tables)
    answer = None
    if query_mask is not None:
      answer, _ = self.polygons(query_mask)
    return self.layout(parts, len(support_masks), answer)

  def caption(self, caption: str, shots: int) -> Encoded:
    """Stage (a): the query image's tokens, then the caption as the answer."""
    return self.layout([ins.Placeholder("query_image"), " " + CAPTION_PROMPT], shots, caption)

  def answer_text(self, ids: Sequence[int]) -> str:
    with self._lock:
      return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def stack(encs: Sequence[Encoded]) -> dict:
  return dict(ids=np.stack([e.ids for e in encs]), visual=np.stack([e.visual for e in encs]),
              labels=np.stack([e.labels for e in encs]), mask=np.stack([e.mask for e in encs]),
              truncated=np.asarray([[e.truncated_prompt, e.truncated_answer] for e in encs],
                                   np.int32))


# ----------------------------------------------------------------------------------------
# Small pieces.


def position_code(h: int, w: int, channels: int) -> np.ndarray:
  """2-D sinusoidal position code [h, w, channels] (channels / 4 frequencies per axis;
  DETR-style, coordinates normalised to [0, 2 pi])."""
  if channels <= 0:
    return np.zeros((h, w, 0), np.float32)
  n = max(channels // 4, 1)
  freq = 2.0 ** np.arange(n)
  ys = (np.arange(h) + 0.5) / h * 2 * np.pi
  xs = (np.arange(w) + 0.5) / w * 2 * np.pi
  fy = ys[:, None] * freq[None]
  fx = xs[:, None] * freq[None]
  code = np.concatenate([
      np.broadcast_to(np.sin(fy)[:, None], (h, w, n)), np.broadcast_to(np.cos(fy)[:, None], (h, w, n)),
      np.broadcast_to(np.sin(fx)[None], (h, w, n)), np.broadcast_to(np.cos(fx)[None], (h, w, n))],
      -1)
  out = np.zeros((h, w, channels), np.float32)
  out[..., :min(channels, code.shape[-1])] = code[..., :channels]
  return out


def linear_position(h: int, w: int) -> np.ndarray:
  """[h, w, 2] float32 (x, y) of the cell centres scaled to [-1, 1] (CoordConv-style)."""
  ys = (np.arange(h) + 0.5) / h * 2 - 1
  xs = (np.arange(w) + 0.5) / w * 2 - 1
  return np.stack(np.broadcast_arrays(xs[None, :], ys[:, None]), -1).astype(np.float32)


def _area_resize(mask: jax.Array, hw: tuple) -> jax.Array:
  """[N, H, W] float -> [N, h, w] by average pooling (H, W multiples of h, w) or bilinear."""
  n, h0, w0 = mask.shape
  h, w = hw
  if h0 % h == 0 and w0 % w == 0:
    return mask.reshape(n, h, h0 // h, w, w0 // w).mean((2, 4))
  return jax.image.resize(mask, (n, h, w), "bilinear")


def _backbone(name: str, dtype) -> resnet_lib.ResNet:
  if name == "resnet50":
    return resnet_lib.resnet50(dtype)
  if name == "resnet101":
    return resnet_lib.resnet101(dtype)
  if name == "resnet_tiny":
    return resnet_lib.resnet_tiny(dtype)
  raise ConfigError(f"config.model.backbone={name!r}; expected resnet50, resnet101 or "
                    "resnet_tiny")


def masked_crop(image: jax.Array, mask: jax.Array, size: int) -> jax.Array:
  """The JAX twin of `fssjax.priors.instruction.masked_crops` for one region (traceable, a
  fixed output shape): the region's bounding box made square around its centre and clipped
  to the image, pixels outside the region set to the image's mean colour, resized to size x
  size (`jax.image.scale_and_translate`, linear with antialiasing; PIL's bilinear resize of
  the cut-out box differs at the box's border pixels, which here also see the fill colour
  just outside the box).

  Args:
    image: float [H, W, 3] (0..255). mask: bool [H, W] (an empty mask gives a crop of the
      whole filled image).

  Returns:
    float32 [size, size, 3].
  """
  h, w = mask.shape
  image = image.astype(jnp.float32)
  x = jnp.where(mask[..., None], image, image.mean((0, 1)))
  rows, cols = mask.any(1), mask.any(0)
  y_min, x_min = jnp.argmax(rows), jnp.argmax(cols)
  y_max, x_max = h - 1 - jnp.argmax(rows[::-1]), w - 1 - jnp.argmax(cols[::-1])
  cy, cx = (y_min + y_max + 1) / 2, (x_min + x_max + 1) / 2
  half = jnp.maximum(y_max + 1 - y_min, x_max + 1 - x_min) / 2
  y0, y1 = jnp.maximum(0.0, jnp.floor(cy - half)), jnp.minimum(float(h), jnp.ceil(cy + half))
  x0, x1 = jnp.maximum(0.0, jnp.floor(cx - half)), jnp.minimum(float(w), jnp.ceil(cx + half))
  scale = jnp.stack([size / (y1 - y0), size / (x1 - x0)])
  translation = -jnp.stack([y0, x0]) * scale
  return jax.image.scale_and_translate(x, (size, size, 3), (0, 1), scale, translation,
                                       method="linear", antialias=True)


# ----------------------------------------------------------------------------------------
# The method.


class LLaFS(Method):
  """LLaFS behind the fssjax Method interface (see the module docstring)."""

  MODEL_DEFAULTS = _DEFAULTS
  TRAINABLE = _TRAINABLE
  kshot = "joint"
  evaluation_keys = ("max_new_tokens", "output")  # model keys that only change evaluation
  threshold = 0.0
  normalization = "imagenet"
  align_corners = False
  interpolation = "nearest"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    m = self.opts
    for key, allowed in (("query_prior", QUERY_PRIORS), ("output", OUTPUTS),
                         ("instruction", INSTRUCTIONS), ("conversation", tuple(CONVERSATIONS))):
      if m[key] not in allowed:
        raise ConfigError(f"config.model.{key}={m[key]!r}; expected one of {list(allowed)}")
    if int(m["num_points"]) < 3:
      raise ConfigError(f"config.model.num_points={m['num_points']}; a polygon needs >= 3")
    self._check_attributes()
    if self._digit_token_users():
      self.check_locate()  # before any weights load
    check_polygon_layout(str(m["visual_layout"]), int(m["num_query_tokens"]),
                         int(m["num_points"]), int(m["grid"]))
    dataset = str(config.get("data", {}).get("dataset", ""))
    align = int(dict(dict(m["stages"] or {}).get("align", {})).get("steps", 0))
    if align > 0 and dataset != "synthetic":
      raise ConfigError(
          f"config.model.stages.align.steps={align} with data.dataset={dataset!r}: stage (a) "
          "trains on image-caption pairs, and fssjax has captions only for the embedded "
          "benchmark (fssjax.data.captions, written from its ground truth). Set the align "
          "steps to 0 (align_steps=0), or start from an aligned Q-Former "
          "(config.model.qformer_weights, a BLIP-2 checkpoint)")
    if not 0.0 <= float(m["truth_tokens"]) <= 1.0:
      raise ConfigError(f"config.model.truth_tokens={m['truth_tokens']}; expected a fraction "
                        "of the training episodes in [0, 1]")
    self.dtype = compute_dtype(config)
    self.backbone = _backbone(str(m["backbone"]), self.dtype)
    self.llm_config = self._llm_config()
    self.llm = nl.LlamaForCausalLM(self.llm_config, dtype=self.dtype, remat=bool(m["remat"]),
                                   scan_layers=True, deterministic=True)
    self.refine = refine_lib.RefineNet(width=int(m["refine_width"]), dtype=self.dtype)
    self._codec = None
    self._qformer_cfg = None
    self._attribute_lists: Optional[tuple] = None
    self._clip: Optional[tuple] = None
    self._text_table: Optional[np.ndarray] = None
    self._lock = threading.Lock()
    self.reset_generation_stats()

  # ---------------------------------------------------------------------------------------
  # Configuration helpers.

  def _llm_path(self) -> str:
    path = str(self.opts["llm"])
    if path == "smollm2":
      from fssjax.priors.local_lm import smollm2_path  # pylint: disable=import-outside-toplevel
      return smollm2_path()
    return path

  def _llm_config(self) -> nl.LlamaConfig:
    m = self.opts
    if m["llm"]:
      from fssjax.weights import llama as wl  # pylint: disable=import-outside-toplevel
      path = self._llm_path()
      if path.endswith(".gguf"):
        cfg = wl.gguf_config(wl.read_gguf(path), path)
      else:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
          cfg = nl.LlamaConfig.from_hf(json.load(f), os.path.join(path, "config.json"))
    elif m["llm_config"]:
      cfg = nl.LlamaConfig.from_hf(dict(m["llm_config"]), "config.model.llm_config")
    else:
      raise ConfigError("LLaFS needs an LLM: config.model.llm (a transformers LLaMA directory, "
                        "a GGUF file or 'smollm2') or config.model.llm_config (a transformers "
                        "LlamaConfig dict: random weights)")
    return dataclasses.replace(cfg, lora_rank=int(m["lora_rank"]),
                               lora_alpha=float(m["lora_alpha"]),
                               lora_dropout=float(m["lora_dropout"]),
                               lora_targets=tuple(m["lora_targets"]))

  @property
  def codec(self) -> PromptCodec:
    if self._codec is None:
      from fssjax.priors.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
      m = self.opts
      spec = m["tokenizer"] or (m["llm"] if m["llm"] == "smollm2" else self._llm_path())
      if not spec:
        raise ConfigError("LLaFS: config.model.tokenizer is empty (a tokenizer.json, a "
                          "tokenizer directory, a GGUF file or 'smollm2')")
      names = self.class_names()
      self._codec = PromptCodec(
          load_tokenizer(spec), num_query_tokens=int(m["num_query_tokens"]),
          conversation=str(m["conversation"]), instruction=str(m["instruction"]),
          num_points=int(m["num_points"]), grid=int(m["grid"]),
          max_objects=int(m["max_objects"]), max_prompt_tokens=int(m["max_prompt_tokens"]),
          max_answer_tokens=int(m["max_answer_tokens"]), class_names=names,
          vertices=str(m["vertices"]), visual_layout=str(m["visual_layout"]),
          attributes=self.attribute_lists()[0],
          max_regions=int(m["region_segments"]) if m["region_table"] else 0,
          region_tokens=int(m["region_tokens"]) if m["region_table"] else 0)
    return self._codec

  def class_names(self) -> list:
    """`model.class_names`, else the data set's (synthetic, COCO-20i, PASCAL-5i), else []
    (every class is then "object")."""
    names = list(self.opts["class_names"] or ())
    dataset = str(self.config.get("data", {}).get("dataset", ""))
    if not names and dataset == "synthetic":
      from fssjax.data import synthetic  # pylint: disable=import-outside-toplevel
      names = [c.name for c in synthetic.categories()]
    elif not names and dataset in ("coco20i", "pascal5i"):
      from fssjax.data import folds  # pylint: disable=import-outside-toplevel
      names = list(folds.COCO_CLASS_NAMES if dataset == "coco20i" else folds.VOC_CLASS_NAMES)
    return names

  # ---------------------------------------------------------------------------------------
  # Attributes and the region-attribute table (settings; the computation is further down).

  def _check_attributes(self) -> None:
    """ConfigError for bad attribute / region-table settings (cheap checks only: no model or
    LLM is loaded here)."""
    m = self.opts
    src = str(m["attributes"] or "")
    if src and src not in ATTRIBUTE_SOURCES:
      if not os.path.isfile(src):
        raise ConfigError(
            f"config.model.attributes={src!r}: not 'synthetic' or 'llm' and no such file "
            f"({os.path.abspath(src)}); expected '' (none), 'synthetic' (the embedded "
            "benchmark's descriptions), 'llm' (asked of config.model.attribute_llm) or a JSON "
            "file {class name: [attribute, ...]}")
      self._static_attributes(src)
    if src and m["instruction"] != "full":
      raise ConfigError(f"config.model.attributes={src!r} needs config.model.instruction="
                        f"'full' (the compact instruction has no attribute sentence); got "
                        f"{m['instruction']!r}")
    if m["shared_with"] not in SHARED_WITH:
      raise ConfigError(f"config.model.shared_with={m['shared_with']!r}; expected one of "
                        f"{list(SHARED_WITH)}")
    if not m["region_table"]:
      return
    missing = [f"config.model.{k}" + w for k, w, bad in (
        ("instruction", "='full' (got %r)" % m["instruction"], m["instruction"] != "full"),
        ("attributes", " (got '': no attributes to place)", not src),
        ("clip", " (a transformers CLIPModel directory; got '')", not m["clip"]))
               if bad]
    if missing:
      raise ConfigError("config.model.region_table=True needs " + ", ".join(missing))
    q, n, r = int(m["num_query_tokens"]), int(m["region_tokens"]), int(m["region_segments"])
    if n < 1 or q % n:
      raise ConfigError(f"config.model.region_tokens={n}: a region's tokens pool the "
                        f"Q-Former's {q} query tokens in equal groups; expected a divisor of "
                        f"num_query_tokens={q}")
    if r < 1:
      raise ConfigError(f"config.model.region_segments={r}; expected >= 1 (SLIC superpixels "
                        "per support, the most table rows)")

  @staticmethod
  def _static_attributes(path: str) -> ins.StaticAttributes:
    try:
      with open(path, encoding="utf-8") as f:
        table = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f"config.model.attributes={path!r}: unreadable JSON ({e}); expected "
                        "{class name: [attribute, ...]}") from None
    if not isinstance(table, dict) or not all(
        isinstance(v, list) and all(isinstance(a, str) for a in v) for v in table.values()):
      raise ConfigError(f"config.model.attributes={path!r}: expected a JSON object {{class "
                        "name: [attribute, ...]}} (lists of strings)")
    return ins.StaticAttributes(table)

  def attribute_source(self):
    """The `model.attributes` source (None for ''); 'llm' builds the LLM client."""
    src = str(self.opts["attributes"] or "")
    if not src:
      return None
    if src == "synthetic":
      return ins.SyntheticAttributes()
    if src == "llm":
      from fssjax.priors import llm as llm_lib  # pylint: disable=import-outside-toplevel
      try:
        client = llm_lib.LLMClient.from_config(dict(self.opts["attribute_llm"] or {})
                                               or {"backend": "local"})
      except ValueError as e:
        raise ConfigError(f"config.model.attribute_llm: {e}") from None
      return ins.LLMAttributes(client, int(self.opts["max_attributes"]))
    return self._static_attributes(src)

  def attribute_lists(self) -> tuple:
    """(every attribute per class, the distinguishing ones per class), aligned with
    `class_names()`: the first for the "[class] has [attributes]" sentence, the second for
    the region table (`remove_shared` against every other class of the data set with
    `shared_with='dataset'`; all with 'none'). Computed once (an LLM source asks every class
    here; its client caches the answers)."""
    if self._attribute_lists is None:
      source = self.attribute_source()
      names = self.class_names()
      every: list = []
      for name in names:
        if source is None:
          every.append([])
          continue
        try:
          every.append(list(source.attributes(name)))
        except KeyError as e:
          if isinstance(source, ins.SyntheticAttributes):
            raise ConfigError(f"config.model.attributes='synthetic': {e.args[0]}") from None
          logging.warning("LLaFS attributes: %s; the class gets none", e.args[0])
          every.append([])
      if self.opts["shared_with"] == "dataset":
        distinct = [ins.remove_shared(a, every[:i] + every[i + 1:]) for i, a in enumerate(every)]
      else:
        distinct = [ins.remove_shared(a, []) for a in every]
      if source is not None and self.opts["region_table"]:
        empty = sum(1 for a in distinct if not a)
        if empty:
          logging.warning("LLaFS region table: %d of %d classes keep no attribute after "
                          "removing those shared with the other classes (shared_with=%r); "
                          "their tables are empty", empty, len(names), self.opts["shared_with"])
      self._attribute_lists = (every, distinct)
    return self._attribute_lists

  @property
  def max_new_tokens(self) -> int:
    return int(self.opts["max_new_tokens"] or self.opts["max_answer_tokens"])

  @classmethod
  def missing_inputs(cls, config: ml_collections.ConfigDict) -> list[str]:
    m = config.get("model", {})
    out = []
    if not m.get("llm", "") and not m.get("llm_config", None):
      out.append("model.llm is empty: LLaFS needs a LLaMA-family LLM, a transformers directory "
                 "(config.json, *.safetensors, tokenizer.json; the paper's CodeLLaMA-7B: "
                 "rope_theta 1e6, vocabulary 32016), a .gguf file, or 'smollm2' (pass llm=PATH "
                 "to configs/llafs_*.py)")
    for key, what in (("llm", "a transformers LLaMA directory (e.g. CodeLLaMA-7B) or a .gguf "
                              "file (or 'smollm2')"),
                      ("tokenizer", "a tokenizer.json / tokenizer directory / .gguf"),
                      ("backbone_weights", "a torchvision ResNet state dict as safetensors"),
                      ("qformer_weights", "a BLIP-2 checkpoint directory"),
                      ("clip", "a transformers CLIPModel directory (config.json, "
                               "model.safetensors, vocab.json, merges.txt) for the "
                               "region-attribute table")):
      path = str(m.get(key, "") or "")
      if path and path != "smollm2" and not os.path.exists(path):
        out.append(f"model.{key} = {path!r}: no such file or directory "
                   f"({os.path.abspath(path)}); expected {what}")
    src = str(m.get("attributes", "") or "")
    if src and src not in ATTRIBUTE_SOURCES and not os.path.exists(src):
      out.append(f"model.attributes = {src!r}: no such file ({os.path.abspath(src)}); "
                 "expected a JSON file {class name: [attribute, ...]}, 'synthetic' or 'llm'")
    if m.get("region_table", False) and not m.get("clip", ""):
      out.append("model.region_table is on but model.clip is empty: the table needs a "
                 "transformers CLIPModel directory (pass clip=PATH to configs/llafs_*.py)")
    return out

  def _position_channels(self) -> int:
    return int(self.opts["position_channels"]) + (2 if self.opts["position_linear"] else 0)

  def qformer_config(self, feature_channels: int) -> qf.QFormerConfig:
    m = self.opts
    fields = dict(m["qformer"] or {})
    fields.update(encoder_hidden_size=int(feature_channels) + 1 + self._position_channels(),
                  num_query_tokens=int(m["num_query_tokens"]),
                  llm_hidden_size=self.llm_config.hidden_size)
    return qf.QFormerConfig(**fields)

  # ---------------------------------------------------------------------------------------
  # Parameters.

  def _tap(self, feats: Sequence) -> int:
    t = int(self.opts["feature_tap"])
    if t >= 0:
      if t >= len(feats):
        raise ConfigError(f"config.model.feature_tap={t}; the backbone has {len(feats)} taps")
      return t
    n = self.backbone.level_sizes[0]  # the first tap of stage 3 (stride 16)
    return n

  def _feature_shape(self, size: int) -> tuple:
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    feats = jax.eval_shape(lambda v, x: self.backbone.apply(v, x),
                           jax.eval_shape(self.backbone.init, jax.random.PRNGKey(0), x), x)
    return tuple(feats[self._tap(feats)].shape[1:])

  def _shapes(self, size: int) -> dict:
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    bb = jax.eval_shape(self.backbone.init, jax.random.PRNGKey(0), x)
    fh, fw, c = self._feature_shape(size)
    self._qformer_cfg = self.qformer_config(c)
    qshape = jax.eval_shape(qf.QFormerVisualTokens(self._qformer_cfg).init,
                            jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 1, self._qformer_cfg.encoder_hidden_size),
                                                 jnp.float32))["params"]
    lshape = jax.eval_shape(self.llm.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 2), jnp.int32))["params"]
    rshape = jax.eval_shape(self.refine.init, jax.random.PRNGKey(0), x,
                            jax.ShapeDtypeStruct((1, size, size), jnp.float32))["params"]
    out = {"params": {"backbone": bb["params"], "qformer": qshape, "llm": lshape,
                      "refine": rshape}}
    if "batch_stats" in bb:
      out["batch_stats"] = {"backbone": bb["batch_stats"]}
    return out

  def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> dict:
    """{'params': {'backbone', 'qformer', 'llm', 'refine'}, 'batch_stats'?: {'backbone'}}.

    Small networks (backbone: torchvision's init; Q-Former: BLIP-2's; refinement net) are
    initialised with NumPy inside a `jax.pure_callback` (no XLA initialiser compilation); the
    LLM leaves with traced draws (normal(0, 0.02), norms 1, LoRA A kaiming-uniform, B 0), so
    a large LLM is created shard by shard where it lives (its weights are then loaded).
    """
    size = int(batch["query_image"].shape[1])
    shapes = self._shapes(size)
    small = {"params": {k: v for k, v in shapes["params"].items() if k != "llm"}}
    if "batch_stats" in shapes:
      small["batch_stats"] = shapes["batch_stats"]
    key = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    leaves, treedef = jax.tree.flatten(small)
    qcfg, refine = self._qformer_cfg, self.refine

    def host(bits):
      from fssjax.methods.hsnet import pytorch_default_init  # pylint: disable=import-outside-toplevel
      seed = int(np.asarray(bits, np.uint32).ravel()[-1])
      bb = {c: {"backbone": t["backbone"]} for c, t in small.items() if "backbone" in t}
      bbv = pytorch_default_init(bb, np.asarray(bits))
      tree = {"params": {"backbone": bbv["params"]["backbone"],
                         "qformer": qf.init_params(qcfg, seed),
                         "refine": refine_lib.init_params(refine, seed + 1,
                                                          (1, size, size, 3))}}
      if "batch_stats" in small:
        tree["batch_stats"] = {"backbone": bbv["batch_stats"]["backbone"]}
      return [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]

    values = jax.pure_callback(host, [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in leaves],
                               key)
    out = jax.tree.unflatten(treedef, values)
    out["params"]["llm"] = _init_llm(shapes["params"]["llm"], jax.random.fold_in(rng, 7))
    if self.opts["region_table"]:  # frozen; `load_pretrained` fills in model.clip's weights
      out["params"]["clip"] = jax.tree.map(lambda x: jnp.zeros(np.shape(x), jnp.float32),
                                           self._clip_image_params())
    return out

  # ---------------------------------------------------------------------------------------
  # Pretrained weights and the stages (a), (b).

  def load_pretrained(self, params: PyTree | None, frozen: PyTree) -> tuple[Any, Any]:
    """The LLM (stacked for the scanned layers, LoRA factors kept as initialised), the
    backbone and Q-Former checkpoints when given, the CLIP image tower and projection of
    `model.clip` (region table; frozen, `params/clip`); then the stages (a), (b) of
    `model.stages` (cached; see the module docstring)."""
    items = []
    if self.opts["llm"]:
      items += self._llm_items()
    if self.opts["backbone_weights"]:
      items += self._backbone_items()
    if self.opts["qformer_weights"]:
      items += self._qformer_items()
    if self.opts["region_table"]:
      items += [("params/clip/" + p, lambda v=v: np.asarray(v, np.float32))
                for p, v in base.leaf_paths(self._clip_image_params()).items()]
      self.attribute_embeddings()  # the text side, once, before any tracing
    params, frozen = base.replace_leaves(params, frozen, items)
    stages = dict(self.opts["stages"] or {})
    if params is not None and any(int(dict(s).get("steps", 0)) for s in stages.values()):
      params = run_stages(self, params, frozen)
    return params, frozen

  def _llm_items(self):
    from fssjax.weights import llama as wl  # pylint: disable=import-outside-toplevel
    path = self._llm_path()
    _, loaded = wl.load(path)
    loaded = nl.stack_layers(loaded)
    flat = base.leaf_paths(loaded)
    logging.info("LLaFS: LLM weights from %s (%d tensors)", path, len(flat))
    return [("params/llm/" + p, lambda v=v: np.asarray(v)) for p, v in flat.items()]

  def _backbone_items(self):
    from fssjax.weights import torchvision as tv  # pylint: disable=import-outside-toplevel
    size = int(self.config.data.image_size)
    shapes = self._shapes(size)
    template = {c: t["backbone"] for c, t in shapes.items() if "backbone" in t}
    files = tv.read_state_dict(self.opts["backbone_weights"],
                               bool(self.opts["allow_pickle_weights"]))
    items = tv.plan_backbone(files, template, source=self.opts["backbone_weights"])
    return [(f"{p[0]}/backbone/{'/'.join(p[1:])}", thunk) for p, thunk in items]

  def _qformer_items(self):
    _, loaded = qf.load_qformer(self.opts["qformer_weights"])
    out = []
    for p, v in base.leaf_paths(loaded).items():
      if p.startswith("language_projection") and v.shape[-1] != self.llm_config.hidden_size:
        continue
      out.append(("params/qformer/" + p, lambda v=v: np.asarray(v)))
    return out

  # ---------------------------------------------------------------------------------------
  # Forward pieces.

  def _features(self, v: PyTree, images: jax.Array) -> jax.Array:
    bb = {"params": v["params"]["backbone"]}
    if "batch_stats" in v:
      bb["batch_stats"] = v["batch_stats"]["backbone"]
    feats = self.backbone.apply(bb, images)
    return feats[self._tap(feats)].astype(jnp.float32)

  def _tokens(self, v: PyTree, feats: jax.Array, region: jax.Array) -> jax.Array:
    """Visual tokens [N, Q, D] of features [N, h, w, C] with a region channel [N, h, w]."""
    n, h, w, _ = feats.shape
    code = position_code(h, w, int(self.opts["position_channels"]))
    if self.opts["position_linear"]:
      code = np.concatenate([linear_position(h, w), code], -1)
    pos = jnp.broadcast_to(jnp.asarray(code), (n, h, w, code.shape[-1]))
    x = jnp.concatenate([feats, region[..., None].astype(feats.dtype), pos], -1)
    cfg = self._qformer_cfg or self.qformer_config(feats.shape[-1])
    out = qf.QFormerVisualTokens(cfg, dtype=self.dtype).apply({"params": v["params"]["qformer"]},
                                                              x)
    return out["tokens"].astype(jnp.float32)

  def visual_tokens(self, v: PyTree, query_image: jax.Array, support_images: jax.Array,
                    support_masks: jax.Array, regions: Optional[jax.Array] = None
                    ) -> jax.Array:
    """[B, (K + 1) Q (+ K R n), D]: support 0..K-1 then the query, then the region tokens
    when `regions` (superpixel labels) are given (the codec's numbering)."""
    return self.visual_and_prior(v, query_image, support_images, support_masks, regions)[0]

  def visual_and_prior(self, v: PyTree, query_image: jax.Array, support_images: jax.Array,
                       support_masks: jax.Array, regions: Optional[jax.Array] = None
                       ) -> tuple[jax.Array, jax.Array]:
    """(visual tokens [B, (K + 1) Q, D] as `visual_tokens`, the query's region channel
    [B, h, w] float32 at the feature resolution: sigmoid(10 (cos - 0.5)) of the cosine to the
    support prototype (`query_prior='prototype'`), or zeros).

    `regions` int32 [B, K, H, W] (superpixel ids 1..R of the supports, 0 elsewhere): the
    region tokens are appended, [B, K R n, D] in the order (support, region, token): the
    Q-Former on the support's features with the region channel = that superpixel's mask
    (area-resized to the feature map), its Q tokens averaged in n = `region_tokens` groups of
    Q / n consecutive tokens."""
    b, k = support_images.shape[:2]
    imgs = jnp.concatenate([support_images.reshape((b * k,) + support_images.shape[2:]),
                            query_image], 0)
    feats = self._features(v, imgs)
    s_feats, q_feats = feats[:b * k], feats[b * k:]
    hw = feats.shape[1:3]
    fg = (support_masks.reshape((b * k,) + support_masks.shape[2:]) == 1).astype(jnp.float32)
    s_region = _area_resize(fg, hw)
    if self.opts["query_prior"] == "prototype":
      w = s_region[..., None]
      proto = (s_feats * w).sum((1, 2)) / (w.sum((1, 2)) + 1e-5)  # [BK, C]
      proto = proto.reshape(b, k, -1).mean(1)
      # sqrt(|x|^2 + eps): finite gradients at an empty support mask (proto = 0).
      qn = q_feats * jax.lax.rsqrt(jnp.sum(q_feats ** 2, -1, keepdims=True) + 1e-8)
      pn = proto * jax.lax.rsqrt(jnp.sum(proto ** 2, -1, keepdims=True) + 1e-8)
      # As a foreground probability, on the scale of the support's mask channel.
      q_region = jax.nn.sigmoid(PRIOR_SCALE * (jnp.einsum("bhwc,bc->bhw", qn, pn) - 0.5))
    else:
      q_region = jnp.zeros(q_feats.shape[:3], jnp.float32)
    tokens = self._tokens(v, feats, jnp.concatenate([s_region, q_region], 0))
    q = tokens.shape[1]
    s_tok = tokens[:b * k].reshape(b, k * q, -1)
    out = [s_tok, tokens[b * k:]]
    if regions is not None:
      r, n = int(self.opts["region_segments"]), int(self.opts["region_tokens"])
      ids = jnp.arange(1, r + 1, dtype=jnp.int32)[:, None, None]
      rm = (regions.reshape((b * k, 1) + regions.shape[2:]) == ids).astype(jnp.float32)
      r_region = _area_resize(rm.reshape((b * k * r,) + regions.shape[2:]), hw)
      r_tok = self._tokens(v, jnp.repeat(s_feats, r, axis=0), r_region)  # [BKR, Q, D]
      out.append(r_tok.reshape(b * k * r, n, q // n, -1).mean(2).reshape(b, k * r * n, -1))
    return jnp.concatenate(out, 1), q_region

  def digit_embeddings(self, llm_params) -> jax.Array:
    """float32 [G, D]: the LLM's (frozen) input embeddings of the digits 0 .. grid-1
    (`check_locate`'s settings needed)."""
    self.check_locate()
    e = jnp.take(llm_params["model"]["embed_tokens"]["embedding"],
                 jnp.asarray(self.digit_ids()), axis=0).astype(jnp.float32)
    return jax.lax.stop_gradient(e)

  def snap(self, llm_params, visual: jax.Array) -> jax.Array:
    """`model.snap_tokens`: each visual token [..., D] replaced by the LLM's input embedding
    of its nearest digit 0 .. grid-1 (squared distance, as `locate_terms`), with the
    straight-through gradient (the identity; van den Oord et al., VQ-VAE, 2017). The LLM
    then reads every visual token as exactly one digit of its vocabulary."""
    e = self.digit_embeddings(llm_params)
    x = visual.astype(jnp.float32)
    dist = jnp.sum(x * x, -1, keepdims=True) - 2 * x @ e.T + jnp.sum(e * e, -1)
    hard = jnp.take(e, jnp.argmin(dist, -1), axis=0)
    return x + jax.lax.stop_gradient(hard - x)

  def _embed(self, llm_params, ids: jax.Array, visual_index: jax.Array, visual: jax.Array):
    if self.opts["snap_tokens"]:
      visual = self.snap(llm_params, visual)
    emb = self.llm.apply({"params": llm_params}, ids, method=self.llm.embed).astype(jnp.float32)
    idx = jnp.clip(visual_index, 0, visual.shape[1] - 1)
    vis = jnp.take_along_axis(visual, idx[..., None], axis=1)
    return jnp.where((visual_index >= 0)[..., None], vis, emb)

  def answer_logits(self, v: PyTree, seq: Mapping[str, jax.Array], visual: jax.Array,
                    rng: Optional[jax.Array] = None) -> jax.Array:
    """Teacher-forced logits [B, A, V] at the answer positions of a layout `seq`."""
    llm_p = v["params"]["llm"]
    emb = self._embed(llm_p, seq["ids"], seq["visual"], visual)
    positions = jnp.maximum(jnp.cumsum(seq["mask"], -1) - 1, 0).astype(jnp.int32)
    tp = int(self.opts["max_prompt_tokens"])
    model = self.llm
    kwargs = {}
    if rng is not None and float(self.opts["lora_dropout"]) > 0:
      model = self.llm.clone(deterministic=False)
      kwargs["rngs"] = {"dropout": rng}
    out = model.apply({"params": llm_p}, inputs_embeds=emb.astype(self.dtype or jnp.float32),
                      attention_mask=seq["mask"], positions=positions, logits=False, **kwargs)
    hidden = out["hidden"][:, tp - 1:-1]
    return model.apply({"params": llm_p}, hidden, method=model.head)

  # ---------------------------------------------------------------------------------------
  # The region-attribute table (see the module docstring): superpixels on the host, the CLIP
  # similarity in the graph, the table text on the host.

  def clip_model(self) -> tuple:
    """(CLIPModelConfig, params) of `model.clip`, loaded once."""
    if self._clip is None:
      from fssjax.weights import clip as wc  # pylint: disable=import-outside-toplevel
      path = str(self.opts["clip"])
      try:
        self._clip = wc.load_clip_model(path, allow_pickle=bool(self.opts["allow_pickle_weights"]))
      except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config.model.clip={path!r}: {e}") from None
      logging.info("LLaFS region table: CLIP from %s", path)
    return self._clip

  def _clip_image_params(self) -> dict:
    p = self.clip_model()[1]
    return {"vision_model": p["vision_model"], "visual_projection": p["visual_projection"]}

  def attribute_embeddings(self) -> np.ndarray:
    """float32 [C, A, P]: the unit CLIP text embedding of distinguishing attribute a of class
    c (`attribute_lists()[1]`; zeros past a class's count; C, A >= 1). Computed once,
    eagerly (also when first asked inside a trace), and used as a constant of the graph."""
    if self._text_table is None:
      from fssjax.nn import clip as nc  # pylint: disable=import-outside-toplevel
      from fssjax.weights import clip as wc  # pylint: disable=import-outside-toplevel
      config, params = self.clip_model()
      distinct = self.attribute_lists()[1]
      table = np.zeros((max(len(distinct), 1), max([len(d) for d in distinct] + [1]),
                        config.projection_dim), np.float32)
      texts = [t for d in distinct for t in d]
      if texts:
        ids, mask = wc.tokenize(wc.load_clip_tokenizer(str(self.opts["clip"])), texts, config)
        model = nc.CLIPModel(config)
        fn = jax.jit(lambda p, i, m: nc.normalise(model.apply(
            {"params": p}, i, m, method=model.get_text_features)))
        text_params = {k: params[k] for k in ("text_model", "text_projection", "logit_scale")}
        chunk = min(256, len(texts))  # one compiled shape: the last chunk is padded
        pad = -len(texts) % chunk
        ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
        mask = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
        emb = []
        with jax.ensure_compile_time_eval():  # concrete values also inside a trace
          for i in range(0, len(ids), chunk):
            emb.append(np.asarray(fn(text_params, ids[i:i + chunk], mask[i:i + chunk]),
                                  np.float32))
        emb = np.concatenate(emb)[:len(texts)]
        j = 0
        for c, d in enumerate(distinct):
          table[c, :len(d)] = emb[j:j + len(d)]
          j += len(d)
      self._text_table = table
    return self._text_table

  def _host_superpixels(self, support_images, support_masks):
    """int32 [B, K, H, W] SLIC superpixels (ids 1..R) of each support's foreground."""
    from fssjax.data import transforms  # pylint: disable=import-outside-toplevel
    r = int(self.opts["region_segments"])
    x = np.asarray(support_images, np.float32) * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN
    u8 = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    masks = np.asarray(support_masks)
    out = np.zeros(masks.shape, np.int32)
    for i in range(masks.shape[0]):
      for k in range(masks.shape[1]):
        out[i, k] = ins.superpixels(u8[i, k], masks[i, k] == 1, n_segments=r, max_regions=r)
    return out

  def region_inputs(self, v: PyTree, batch: Mapping[str, jax.Array]) -> tuple:
    """(superpixel labels int32 [B, K, H, W], similarities float32 [B, K, R, A], present bool
    [B, K, R]): the cosine between each superpixel's masked crop (`masked_crop`) through the
    CLIP image tower and projection (`params/clip`) and each distinguishing attribute of the
    episode's class (`attribute_embeddings`). No gradient flows through it."""
    si = jax.lax.stop_gradient(batch["support_images"]).astype(jnp.float32)
    sm = batch["support_masks"]
    b, k, h, w = sm.shape
    r = int(self.opts["region_segments"])
    labels = jax.pure_callback(self._host_superpixels,
                               jax.ShapeDtypeStruct((b, k, h, w), jnp.int32), si, sm)
    masks = labels[:, :, None] == jnp.arange(1, r + 1, dtype=jnp.int32)[:, None, None]
    present = masks.any((-1, -2))
    from fssjax.data import transforms  # pylint: disable=import-outside-toplevel
    from fssjax.nn import clip as nc  # pylint: disable=import-outside-toplevel
    from fssjax.nn import clip_vision as cv  # pylint: disable=import-outside-toplevel
    config = self.clip_model()[0]
    size = config.vision.image_size
    img = ((si * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN) * 255.0).reshape(
        b * k, h, w, 3)
    crop = functools.partial(masked_crop, size=size)
    crops = jax.vmap(jax.vmap(crop, in_axes=(None, 0)))(img, masks.reshape(b * k, r, h, w))
    crops = crops.reshape(b * k * r, size, size, 3)
    pix = (crops / 255.0 - jnp.asarray(cv.CLIP_MEAN)) / jnp.asarray(cv.CLIP_STD)
    cp = v["params"]["clip"]
    pooled = cv.CLIPVisionModel(config.vision, dtype=self.dtype).apply(
        {"params": cp["vision_model"]}, pix)["pooler_output"].astype(jnp.float32)
    emb = nc.normalise(pooled @ cp["visual_projection"]["kernel"]).reshape(b, k, r, -1)
    table = jnp.asarray(self.attribute_embeddings())
    cls = jnp.clip(batch.get("class_id", jnp.zeros((b,), jnp.int32)), 0, table.shape[0] - 1)
    sims = jnp.einsum("bkrp,bap->bkra", emb, table[cls])
    return labels, jax.lax.stop_gradient(sims), present

  def region_tables(self, class_id: int, sims: np.ndarray, present: np.ndarray) -> list:
    """Per support of one episode its table rows (`fssjax.priors.instruction.
    table_from_scores` on the present regions and the class's distinguishing attributes), or
    None when there is nothing to place. sims [K, R, A], present [K, R]."""
    distinct = self.attribute_lists()[1]
    attrs = distinct[class_id] if 0 <= class_id < len(distinct) else []
    out = []
    for k in range(sims.shape[0]):
      keep = np.asarray(present[k], bool)
      ids = [int(i) + 1 for i in np.nonzero(keep)[0]]
      if not attrs or not ids:
        out.append(None)
        continue
      out.append(ins.table_from_scores(np.asarray(sims[k])[keep][:, :len(attrs)], attrs, ids))
    return out

  # ---------------------------------------------------------------------------------------
  # Host callbacks.

  def _host_layout(self, support_masks, query_mask, class_id, sims=None, present=None):
    codec = self.codec
    encs = []
    for i in range(support_masks.shape[0]):
      tables = None if sims is None else self.region_tables(int(class_id[i]), sims[i],
                                                            present[i])
      encs.append(codec.episode(list(np.asarray(support_masks[i])), np.asarray(query_mask[i]),
                                int(class_id[i]), tables=tables))
    s = stack(encs)
    return s["ids"], s["visual"], s["labels"], s["mask"], s["truncated"]

  def layout_batch(self, batch: Mapping[str, jax.Array], sims: Optional[jax.Array] = None,
                   present: Optional[jax.Array] = None) -> dict:
    """The training layout of an episode batch (host callback; see the module docstring);
    with `sims`, `present` (`region_inputs`) each support gets its region-attribute table."""
    if "llafs/ids" in batch:
      return {k: batch[f"llafs/{k}"] for k in ("ids", "visual", "labels", "mask", "truncated")}
    b = batch["query_mask"].shape[0]
    t = int(self.opts["max_prompt_tokens"]) + int(self.opts["max_answer_tokens"])
    spec = [jax.ShapeDtypeStruct((b, t), jnp.int32)] * 4 + [
        jax.ShapeDtypeStruct((b, 2), jnp.int32)]
    class_id = batch.get("class_id", jnp.full((b,), -1, jnp.int32))
    extra = () if sims is None else (sims, present)
    out = jax.pure_callback(self._host_layout, spec, batch["support_masks"],
                            batch["query_mask"], class_id, *extra)
    return dict(zip(("ids", "visual", "labels", "mask", "truncated"), out))

  def _host_coarse(self, tokens, lengths, size, count: bool, counted=None):
    """(coarse masks uint8 [N, H, W], parse status [N]) of generated answers; `count`: add
    the rows with `counted` True (default all; the evaluator's padding rows, which have no
    support foreground, are left out) to the generation statistics."""
    h, w = int(size[0]), int(size[1])
    codec = self.codec
    n = tokens.shape[0]
    masks = np.zeros((n, h, w), np.uint8)
    status = np.zeros((n,), np.int32)
    for i in range(n):
      text = codec.answer_text(np.asarray(tokens[i, :int(lengths[i])]))
      masks[i], res = rasterise_answer(text, (h, w), num_points=codec.num_points,
                                       grid=codec.grid)
      status[i] = poly.STATUSES.index(res.status)
    if count:
      keep = np.ones(n, bool) if counted is None else np.asarray(counted, bool)
      with self._lock:
        st = self._stats
        for s in status[keep]:
          setattr(st["parse"], poly.STATUSES[int(s)], getattr(st["parse"], poly.STATUSES[int(s)]) + 1)
        st["new_tokens"] += int(np.sum(np.asarray(lengths)[keep]))
        now = time.perf_counter()
        st["answers"] += int(keep.sum())
        if st["t_prompt"] is not None:
          st["seconds"] += now - st["t_prompt"]
          st["t_prompt"] = None
        d = self.generation_stats()
      logging.info("LLaFS generation: %d answers (ok %d, repaired %d, failed %d = %.1f%%), "
                   "%d new tokens, %.1f tokens/s", d["answers"], d["ok"], d["repaired"],
                   d["failed"], 100 * d["failed_rate"], d["new_tokens"], d["tokens_per_s"])
    return masks, status

  def reset_generation_stats(self) -> None:
    """Zeroes the counts `generation_stats` reports."""
    self._stats = dict(parse=poly.ParseStats(), new_tokens=0, answers=0, seconds=0.0,
                       t_prompt=None, truncated_prompts=0)

  def generation_stats(self) -> dict:
    """{'answers', 'ok', 'repaired', 'failed', 'failed_rate', 'repaired_rate', 'new_tokens',
    'generation_s', 'tokens_per_s'} since the last reset (every generated answer is
    counted; answers served from the coarse-mask memo are not counted again)."""
    st = self._stats
    d = st["parse"].as_dict()
    d.pop("total")
    d.update(answers=st["answers"], new_tokens=st["new_tokens"], generation_s=st["seconds"],
             truncated_prompts=st["truncated_prompts"],
             tokens_per_s=st["new_tokens"] / st["seconds"] if st["seconds"] else 0.0)
    return d

  def _host_prompt(self, support_masks, class_id, sims=None, present=None):
    codec = self.codec
    encs = []
    for i in range(support_masks.shape[0]):
      tables = None if sims is None else self.region_tables(int(class_id[i]), sims[i],
                                                            present[i])
      parts = codec.episode_parts(list(np.asarray(support_masks[i])), int(class_id[i]),
                                  tables=tables)
      encs.append(codec.layout(parts, support_masks.shape[1], None))
    with self._lock:
      self._stats["t_prompt"] = time.perf_counter()
      cut = sum(bool(e.truncated_prompt) for i, e in enumerate(encs)
                if np.any(np.asarray(support_masks[i]) == 1))
      if cut:
        self._stats["truncated_prompts"] += cut
        logging.warning("LLaFS: %d of %d prompts longer than config.model.max_prompt_tokens=%d "
                        "were cut at their start (raise it; counted in the results' "
                        "generation block)", cut, len(encs), self.codec.tp)
    return (np.stack([e.ids for e in encs]), np.stack([e.visual for e in encs]),
            np.stack([e.mask for e in encs]))

  # ---------------------------------------------------------------------------------------
  # Training.

  def loss(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    v = base.merge(params, frozen)
    regions, sims, present = None, None, None
    if self.opts["region_table"] and "llafs/ids" not in batch:
      regions, sims, present = self.region_inputs(v, batch)
    seq = self.layout_batch(batch, sims, present)
    visual, q_region = self.visual_and_prior(v, batch["query_image"], batch["support_images"],
                                             batch["support_masks"], regions)
    if not self.opts["visual_grad"]:
      visual, q_region = jax.lax.stop_gradient(visual), jax.lax.stop_gradient(q_region)
    llm_visual = visual
    if float(self.opts["truth_tokens"]) > 0:
      llm_visual = self.truth_visual(v, visual, batch, jax.random.fold_in(rng, 1))
    logits = self.answer_logits(v, seq, llm_visual, rng)
    labels = seq["labels"][:, int(self.opts["max_prompt_tokens"]) - 1:-1]
    valid = labels >= 0
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], -1)[..., 0]
    count = jnp.maximum(valid.sum(), 1)
    ce = jnp.where(valid, nll, 0.0).sum() / count
    pred = jnp.argmax(logits, -1).astype(jnp.int32)
    acc = jnp.where(valid, pred == labels, False).sum() / count
    total = float(self.opts["ce_weight"]) * ce
    metrics = {"ce": ce, "token_accuracy": acc,
               "llafs/truncated_prompts": seq["truncated"][:, 0].sum(),
               "llafs/truncated_answers": seq["truncated"][:, 1].sum()}
    if float(self.opts["refine_weight"]) > 0:
      size = batch["query_mask"].shape[1:3]
      lengths = valid.sum(-1).astype(jnp.int32)
      coarse = jax.pure_callback(
          lambda t, l: self._host_coarse(t, l, size, False)[0],
          jax.ShapeDtypeStruct(batch["query_mask"].shape, jnp.uint8), jax.lax.stop_gradient(pred),
          lengths)
      ref = self.refine.apply({"params": v["params"]["refine"]}, batch["query_image"],
                              coarse.astype(jnp.float32))
      rl, parts = refine_lib.refine_loss(ref, batch["query_mask"])
      total = total + float(self.opts["refine_weight"]) * rl
      metrics.update(refine=rl, refine_bce=parts["bce"], refine_dice=parts["dice"])
    if float(self.opts["locate_weight"]) > 0:
      k = batch["support_masks"].shape[1]
      images = visual[:, :(k + 1) * int(self.opts["num_query_tokens"])]  # not the regions'
      aux, m, _ = self.locate_terms(v, images, q_region, batch)
      total = total + float(self.opts["locate_weight"]) * aux
      metrics.update(m)
    metrics["loss"] = total
    return total, metrics

  # ---------------------------------------------------------------------------------------
  # Localisation pretraining of the visual tokens (stage 'locate', `locate_weight`).

  def check_locate(self) -> None:
    """Raises ConfigError unless the settings allow the localisation targets (one digit
    token per coordinate: 1 <= grid <= 10; one query token per coordinate)."""
    m = self.opts
    g, p, q = int(m["grid"]), int(m["num_points"]), int(m["num_query_tokens"])
    users = " and ".join(self._digit_token_users()) or "the localisation targets"
    if not 1 <= g <= 10:
      raise ConfigError(
          f"config.model.grid={g}: {users} make each visual token one digit of the answer "
          "polygon (one token per coordinate), so they need a coordinate grid of 1 to 10 "
          "cells")
    if q != 2 * p:
      raise ConfigError(
          f"config.model.num_query_tokens={q}: {users} give each visual token one "
          "coordinate of the answer polygon (x1, y1, ..., xP, yP), so they need "
          f"2 x num_points = {2 * p} query tokens")

  def _digit_token_users(self) -> list:
    """The settings in use that need one digit token per coordinate (text for messages)."""
    m = self.opts
    stages = dict(m["stages"] or {})
    users = [name for name, on in (
        ("stage 'locate' (config.model.stages.locate.steps > 0)",
         int(dict(stages.get("locate", {})).get("steps", 0)) > 0),
        ("config.model.locate_weight > 0", float(m["locate_weight"]) > 0),
        ("config.model.snap_tokens", bool(m["snap_tokens"])),
        ("config.model.truth_tokens > 0", float(m["truth_tokens"]) > 0)) if on]
    return users

  def digit_ids(self) -> list:
    """Token ids of the digits 0 .. grid-1 (each must be one token of the tokenizer)."""
    out = []
    for d in range(int(self.opts["grid"])):
      t = self.codec.encode(str(d))
      if len(t) != 1:
        raise ConfigError(f"LLaFS localisation pretraining: the tokenizer writes the digit "
                          f"{d} as {len(t)} tokens; one token per digit is needed")
      out.append(int(t[0]))
    return out

  def _host_vertex_targets(self, masks):
    """[N, H, W] masks -> [N, 2P] int32 grid cells (x1, y1, ..., xP, yP) of the largest
    object's polygon (the answer's first object); -1 where the mask has no object."""
    p, g = int(self.opts["num_points"]), int(self.opts["grid"])
    masks = np.asarray(masks)
    out = np.full((masks.shape[0], 2 * p), -1, np.int32)
    for i in range(masks.shape[0]):
      _, polys = mask_polygon_text(masks[i], num_points=p, grid=g, max_objects=1,
                                   vertices=str(self.opts["vertices"]))
      if polys:
        out[i] = np.asarray(polys[0], np.int32).reshape(-1)
    return out

  def _host_digit_masks(self, digits, size):
    """[B, 2P] grid cells -> rasterised polygons uint8 [B, H, W] (the Q-Former's own
    polygon: what the LLM writes when it copies the query tokens)."""
    h, w = int(size[0]), int(size[1])
    g = int(self.opts["grid"])
    digits = np.asarray(digits)
    out = np.zeros((digits.shape[0], h, w), np.uint8)
    for i in range(digits.shape[0]):
      pts = from_grid([digits[i].reshape(-1, 2)], (h, w), g)
      out[i] = poly.polygons_to_mask(pts, h, w)
    return out

  def vertex_targets(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """int32 [B, K + 1, 2P]: the grid cells (x1, y1, ..., xP, yP) of the largest object's
    polygon of each support (0..K-1) and of the query (K), -1 where a mask has no object
    (host callback)."""
    self.check_locate()
    b, k = batch["support_masks"].shape[:2]
    size = batch["query_mask"].shape[1:]
    q = int(self.opts["num_query_tokens"])
    masks = jnp.concatenate([batch["support_masks"].reshape((b * k,) + size),
                             batch["query_mask"]], 0).astype(jnp.uint8)
    tgt = jax.pure_callback(self._host_vertex_targets,
                            jax.ShapeDtypeStruct((b * (k + 1), q), jnp.int32), masks)
    return jnp.concatenate([tgt[:b * k].reshape(b, k, q), tgt[b * k:][:, None]], 1)

  def truth_visual(self, v: PyTree, visual: jax.Array, batch: Mapping[str, jax.Array],
                   rng: jax.Array) -> jax.Array:
    """`model.truth_tokens` = p: in a random fraction p of the episodes (Bernoulli per
    episode), every image's visual tokens (the first (K + 1) Q of [B, N, D]) replaced by the
    LLM's digit embeddings of that image's polygon (`vertex_targets`; a mask without an
    object keeps its tokens). Training only (ours; see the module docstring)."""
    b = visual.shape[0]
    tgt = self.vertex_targets(batch).reshape(b, -1)  # [B, (K + 1) Q]
    m = tgt.shape[1]
    e = self.digit_embeddings(v["params"]["llm"])
    use = jax.random.bernoulli(rng, float(self.opts["truth_tokens"]), (b,))
    ok = use[:, None] & (tgt >= 0)
    visual = visual.astype(jnp.float32)
    images = jnp.where(ok[..., None], jnp.take(e, jnp.maximum(tgt, 0), axis=0), visual[:, :m])
    return visual.at[:, :m].set(images)

  def locate_terms(self, v: PyTree, visual: jax.Array, q_region: jax.Array,
                   batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict, jax.Array]:
    """The localisation loss of the visual tokens (ours; see the module docstring).

    Token j of an image's Q = 2P query tokens stands for coordinate j of the answer polygon
    (x1, y1, ..., xP, yP; the largest object, on the grid). With E_d the LLM's (frozen)
    input embedding of the digit d (d < grid), the token t is classified by its squared
    distance to the digits, logits_d = -|t - E_d|^2 / tau (tau = 0.1 x the mean squared
    distance between digit embeddings), with cross-entropy, plus |t - E_y|^2 / mean |E_d|^2
    so that the token also lies at the digit's embedding: a query token then reads, to the
    LLM, as the digit it must write. Support tokens (region channel = the support mask) are
    trained the same way on the support's polygon, so the in-context example shows the
    pairing of tokens and polygon text. With `query_prior='prototype'` the prior map (a
    probability, sigmoid(10 (cos - 0.5))) gets a BCE towards the query mask at the feature
    resolution (cells at least half foreground), which trains the backbone's features for
    the prior.

    Returns (loss, metrics, the query tokens' nearest digits [B, 2P] int32).
    """
    b, k = batch["support_masks"].shape[:2]
    q = int(self.opts["num_query_tokens"])
    tgt = self.vertex_targets(batch)
    tok = visual[:, :(k + 1) * q].reshape(b, k + 1, q, -1).astype(jnp.float32)
    e = self.digit_embeddings(v["params"]["llm"])  # [G, D]
    e2 = jnp.sum(e * e, -1)
    pair = e2[:, None] + e2[None] - 2 * e @ e.T
    g = e.shape[0]
    tau = 0.1 * jnp.maximum(pair.sum() / max(g * (g - 1), 1), 1e-6)
    dist = jnp.sum(tok * tok, -1, keepdims=True) - 2 * tok @ e.T + e2  # [B, K+1, Q, G]
    logits = -dist / tau
    valid = tgt >= 0
    y = jnp.maximum(tgt, 0)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[..., None], -1)[..., 0]
    mse = jnp.take_along_axis(dist, y[..., None], -1)[..., 0] / jnp.mean(e2)
    per = jnp.where(valid, ce + mse, 0.0)
    loss = per.sum() / jnp.maximum(valid.sum(), 1)
    pred = jnp.argmin(dist, -1).astype(jnp.int32)
    hit = (pred == tgt) & valid
    qv = valid[:, -1]
    metrics = {"locate/tokens": loss,
               "locate/query_accuracy": hit[:, -1].sum() / jnp.maximum(qv.sum(), 1),
               "locate/support_accuracy": hit[:, :-1].sum() / jnp.maximum(valid[:, :-1].sum(),
                                                                          1),
               "locate/query_cell_error": jnp.where(qv, jnp.abs(pred[:, -1] - tgt[:, -1]),
                                                    0).sum() / jnp.maximum(qv.sum(), 1)}
    if self.opts["query_prior"] == "prototype":
      fg = _area_resize((batch["query_mask"] == 1).astype(jnp.float32), q_region.shape[1:])
      pr = jnp.clip(q_region, 1e-6, 1 - 1e-6)
      t = (fg >= 0.5).astype(jnp.float32)
      bce = -jnp.mean(t * jnp.log(pr) + (1 - t) * jnp.log1p(-pr))
      pi = ((pr > 0.5) & (t > 0)).sum() / jnp.maximum(((pr > 0.5) | (t > 0)).sum(), 1)
      loss = loss + bce
      metrics.update({"locate/prior_bce": bce, "locate/prior_iou": pi})
    return loss, metrics, pred[:, -1]

  def locate_loss(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array],
                  rng: jax.Array, refine_batch: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage 'locate': `locate_terms` plus the refinement loss on the rasterised polygon of
    the query tokens' nearest digits (no LLM forward), on the first `refine_batch` episodes
    of the batch (0: all; the refinement network costs most of a CPU step)."""
    del rng
    v = base.merge(params, frozen)
    visual, q_region = self.visual_and_prior(v, batch["query_image"], batch["support_images"],
                                             batch["support_masks"])
    total, metrics, digits = self.locate_terms(v, visual, q_region, batch)
    shape = jax.ShapeDtypeStruct(batch["query_mask"].shape, jnp.uint8)
    size = batch["query_mask"].shape[1:3]
    coarse = jax.pure_callback(lambda d: self._host_digit_masks(d, size), shape,
                               jax.lax.stop_gradient(digits))
    qm = batch["query_mask"]
    inter = ((coarse == 1) & (qm == 1)).sum()
    union = ((coarse == 1) | (qm == 1)).sum()
    metrics["locate/coarse_iou"] = inter / jnp.maximum(union, 1)
    if float(self.opts["refine_weight"]) > 0:
      n = int(refine_batch) or qm.shape[0]
      ref = self.refine.apply({"params": v["params"]["refine"]}, batch["query_image"][:n],
                              coarse[:n].astype(jnp.float32))
      rl, parts = refine_lib.refine_loss(ref, qm[:n])
      total = total + float(self.opts["refine_weight"]) * rl
      metrics.update(refine=rl, refine_bce=parts["bce"], refine_dice=parts["dice"])
    metrics["loss"] = total
    return total, metrics

  # ---------------------------------------------------------------------------------------
  # Prediction.

  def generate(self, v: PyTree, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Greedy answers (tokens [B, N] int32, lengths [B]) with the KV cache (traceable)."""
    b = batch["query_image"].shape[0]
    tp = int(self.opts["max_prompt_tokens"])
    class_id = batch.get("class_id", jnp.full((b,), -1, jnp.int32))
    spec = [jax.ShapeDtypeStruct((b, tp), jnp.int32)] * 3
    regions, extra = None, ()
    if self.opts["region_table"]:
      regions, sims, present = self.region_inputs(v, batch)
      extra = (sims, present)
    ids, vis_idx, mask = io_callback(self._host_prompt, spec, batch["support_masks"], class_id,
                                     *extra, ordered=False)
    visual = self.visual_tokens(v, batch["query_image"], batch["support_images"],
                                batch["support_masks"], regions)
    llm_p = v["params"]["llm"]
    emb = self._embed(llm_p, ids, vis_idx, visual).astype(self.dtype or jnp.float32)
    n = self.max_new_tokens
    cache = nl.init_cache(self.llm_config, b, tp + n, self.dtype or jnp.float32)
    positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0).astype(jnp.int32)
    res = self.llm.apply({"params": llm_p}, inputs_embeds=emb, attention_mask=mask,
                         positions=positions, cache=cache, logits=False)
    last = self.llm.apply({"params": llm_p}, res["hidden"][:, -1], method=self.llm.head)
    first = jnp.argmax(last, -1).astype(jnp.int32)
    codec = self.codec
    return nl.decode(self.llm, llm_p, res["cache"], first, positions[:, -1] + 1,
                     max_new_tokens=jnp.int32(n), max_tokens=n, stop_ids=codec.tok.stop_ids,
                     rng=jax.random.PRNGKey(0), temperature=0.0, pad_id=codec.pad_id)

  def coarse_mask(self, v: PyTree, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Rasterised polygons uint8 [B, H, W] of the greedy answers (counted).

    Memo: the coarse masks of the last `MEMO_SIZE` batches are kept on the host, keyed by a
    hash of the batch's images and support masks and of a fingerprint of the parameters, so
    that a second evaluator on the same episodes with the same parameters (the coarse and
    refined outputs, `model.output`) reuses them instead of generating again (`lax.cond`:
    the generation branch does not run on a hit).
    """
    b = batch["query_image"].shape[0]
    size = tuple(batch["query_image"].shape[1:3])
    mspec = jax.ShapeDtypeStruct((b,) + size, jnp.uint8)
    finger = jnp.stack([jnp.sum(jnp.abs(x.astype(jnp.float32)))
                        for x in jax.tree.leaves(v["params"]) if x.size < 2 ** 22])
    key_inputs = (batch["query_image"], batch["support_images"], batch["support_masks"], finger)
    hit, cached = io_callback(_memo_lookup, (jax.ShapeDtypeStruct((), jnp.bool_), mspec),
                              *key_inputs, ordered=False)

    def fresh(_):
      tokens, lengths = self.generate(v, batch)
      real = jnp.any(batch["support_masks"] == 1, axis=(1, 2, 3))  # padding rows: none
      masks, _ = io_callback(lambda t, l, r: self._host_coarse(t, l, size, True, r),
                             (mspec, jax.ShapeDtypeStruct((b,), jnp.int32)), tokens, lengths,
                             real, ordered=False)
      masks = masks + 0 * jnp.asarray(
          io_callback(_memo_store, jax.ShapeDtypeStruct((), jnp.int32), masks, *key_inputs,
                      ordered=False), jnp.uint8)
      return masks

    return jax.lax.cond(hit, lambda _: cached, fresh, None)

  def predict(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
    """Refined mask logits [B, H, W] (or the coarse mask as +-1 with output='coarse')."""
    v = base.merge(params, frozen)
    coarse = self.coarse_mask(v, batch).astype(jnp.float32)
    if self.opts["output"] == "coarse":
      return 2.0 * coarse - 1.0
    return self.refine.apply({"params": v["params"]["refine"]}, batch["query_image"], coarse)


METHOD = LLaFS

MEMO_SIZE = 64
_MEMO: "dict[bytes, np.ndarray]" = {}
_MEMO_LOCK = threading.Lock()


def _memo_key(*arrays) -> bytes:
  h = hashlib.sha1()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.digest()


def _memo_lookup(*key_inputs):
  key = _memo_key(*key_inputs)
  shape = np.asarray(key_inputs[0]).shape[:3]
  with _MEMO_LOCK:
    got = _MEMO.get(key)
  if got is None:
    return np.bool_(False), np.zeros(shape, np.uint8)
  return np.bool_(True), got


def _memo_store(masks, *key_inputs):
  key = _memo_key(*key_inputs)
  with _MEMO_LOCK:
    _MEMO[key] = np.asarray(masks, np.uint8).copy()
    while len(_MEMO) > MEMO_SIZE:
      _MEMO.pop(next(iter(_MEMO)))
  return np.int32(0)


def _init_llm(shapes: PyTree, rng: jax.Array) -> PyTree:
  """Traced LLM initial values: normal(0, 0.02); RMSNorm weights 1; LoRA A kaiming-uniform
  (PEFT), B 0 (the base model's output is unchanged until training)."""
  flat = base.leaf_paths(shapes)
  out = {}
  for i, (path, s) in enumerate(sorted(flat.items())):
    key = jax.random.fold_in(rng, i)
    name = path.split("/")
    if "lora_B" in name:
      out[path] = jnp.zeros(s.shape, s.dtype)
    elif "lora_A" in name:
      fan_in = s.shape[-2]
      bound = float(np.sqrt(1.0 / fan_in))  # kaiming_uniform(a=sqrt(5)) as PEFT
      out[path] = jax.random.uniform(key, s.shape, s.dtype, -bound, bound)
    elif name[-1] in ("weight", "scale"):
      out[path] = jnp.ones(s.shape, s.dtype)
    elif name[-1] == "bias":
      out[path] = jnp.zeros(s.shape, s.dtype)
    else:
      out[path] = 0.02 * jax.random.normal(key, s.shape, s.dtype)
  return base._build(out)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------
# Stages (a) and (b).

# Stage (a) trains the method's trainable patterns except the LLM's and the refinement
# network's (the Q-Former and projection, and a backbone trained from scratch); 'locate'
# (ours, optional) all but the LLM's; (b) all.
STAGE_FROZEN_PARTS = {"align": ("params/llm", "params/refine"), "locate": ("params/llm",),
                      "curriculum": ()}
STAGE_ORDER = ("align", "locate", "curriculum")
STAGE_KEYS = {"steps", "batch", "lr", "log_every", "data", "refine_batch", "frozen"}
LOCATE_DATA = ("episodes", "pseudo")


# Model keys no stage reads (generation and evaluation only), and keys only the loss of stages
# (b), (c) reads (stage (a) sets its own; 'locate' has its own loss).
_NOT_IN_STAGES = ("output", "stage_dir", "max_new_tokens")
_FEWSHOT_LOSS_ONLY = ("truth_tokens", "visual_grad", "locate_weight")


def stage_settings(method: LLaFS, stage: str) -> dict:
  """What the cached result of `stage` (and of the stages before it) depends on, hashed into
  its file name: the model settings (without the generation-only keys, the later stages'
  specs, and for (a) and 'locate' the keys only the loss of (b), (c) reads), the trainable
  patterns, the data settings (the 'locate' episodes come from the data set's training
  classes of the fold) and the seed."""
  c = method.config
  upto = STAGE_ORDER[:STAGE_ORDER.index(stage) + 1]
  drop = set(_NOT_IN_STAGES) | (set(_FEWSHOT_LOSS_ONLY) if stage != "curriculum" else set())
  model = {k: v for k, v in method.opts.items() if k not in drop}
  model["stages"] = {k: dict(v) for k, v in dict(method.opts["stages"] or {}).items()
                     if k in upto}
  return json.loads(json.dumps(dict(model=model, trainable=method.trainable_patterns(),
                                    data=c.data.to_dict(), seed=int(c.seed), upto=stage,
                                    version=2), default=str))


def stage_path(method: LLaFS, stage: str) -> str:
  settings = stage_settings(method, stage)
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  root = method.opts["stage_dir"] or os.path.join(os.path.expanduser("~"), ".cache", "fssjax",
                                                  "llafs")
  return os.path.join(root, f"llafs_{stage}_{key}.safetensors")


def _norm_images(images: np.ndarray, normalization: str) -> np.ndarray:
  from fssjax.data import transforms  # pylint: disable=import-outside-toplevel
  return transforms.normalize(images, normalization)


def caption_batch(method: LLaFS, step: int, batch: int, seed: int) -> dict:
  """Stage (a) batch: embedded-benchmark training images and their ground-truth captions."""
  from fssjax.data import captions, synthetic  # pylint: disable=import-outside-toplevel
  size = int(method.config.data.image_size)
  imgs, encs = [], []
  for i in range(batch):
    index = (step * batch + i) % 4000
    image, instances = synthetic.render_image(seed, "train", index, size=size)
    imgs.append(image)
    encs.append(method.codec.caption(captions.synthetic_caption(image, instances), 1))
  x = _norm_images(np.stack(imgs), method.normalization)
  s = stack(encs)
  return {"query_image": x, "support_images": x[:, None], "support_masks":
          np.zeros((batch, 1, size, size), np.uint8), "query_mask": np.zeros((batch, size, size),
                                                                             np.uint8),
          **{f"llafs/{k}": v for k, v in s.items()}}


def pseudo_batch(method: LLaFS, step: int, num_steps: int, batch: int, seed: int) -> dict:
  """Stage (b) batch: pseudo-samples at the curriculum difficulty of `step`."""
  from fssjax.data import pseudo_samples as ps  # pylint: disable=import-outside-toplevel
  size = int(method.config.data.image_size)
  spec = ps.PseudoSampleSpec(size=size, max_given=int(method.opts["num_points"]) - 1)
  d = ps.curriculum_difficulty(step, num_steps)
  codec = method.codec
  qi, si, qm, sm, encs = [], [], [], [], []
  for i in range(batch):
    s = ps.make_pseudo_sample(seed * 1_000_003 + step * batch + i, d, spec)
    # The given vertices: a prefix of the answer's polygon (the codec's points and grid).
    _, qp = codec.polygons(s.query_mask)
    given = qp[0][:s.given_vertices] if (qp and s.given_vertices) else None
    encs.append(codec.episode([s.support_mask], s.query_mask, -1, given))
    qi.append(s.query_image)
    si.append(s.support_image)
    qm.append(s.query_mask)
    sm.append(s.support_mask)
  to8 = lambda x: np.clip(np.rint(np.stack(x) * 255), 0, 255).astype(np.uint8)  # noqa: E731
  st = stack(encs)
  return {"query_image": _norm_images(to8(qi), method.normalization),
          "support_images": _norm_images(to8(si), method.normalization)[:, None],
          "query_mask": np.stack(qm).astype(np.uint8),
          "support_masks": np.stack(sm).astype(np.uint8)[:, None],
          "class_id": np.full((batch,), -1, np.int32),
          **{f"llafs/{k}": v for k, v in st.items()}, "difficulty": np.float32(d)}


def locate_batches(method: LLaFS, steps: int, batch: int, seed: int, data: str):
  """Stage 'locate' batches: training episodes of the base classes (`data='episodes'`, the
  method's data config through `fssjax.data.pipeline.train_loader`) or curriculum
  pseudo-samples (`'pseudo'`); only the image and mask fields."""
  keys = ("query_image", "query_mask", "support_images", "support_masks", "class_id")
  if data == "pseudo":
    for i in range(steps):
      b = pseudo_batch(method, i, steps, batch, seed)
      yield {k: b[k] for k in keys}
    return
  from fssjax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(method.config.to_dict())
  config.train.num_steps = steps  # the stream's length
  source = sources.build_source(config.data, "train")
  classes = sources.fold_classes_for(config.data, "train", source)
  loader = pipeline.train_loader(config, source, classes, normalization=method.normalization,
                                 seed=seed, global_batch_size=batch, process_index=0,
                                 process_count=1, worker_count=0)
  it = iter(loader)
  for _ in range(steps):
    b = next(it)
    yield {k: np.asarray(b[k]) for k in keys if k in b}


def run_stages(method: LLaFS, params: PyTree, frozen: PyTree) -> PyTree:
  """Stages (a) then (b) of `model.stages` on `params` (each loaded from its cache file when
  present, else trained and saved); returns the params (c) starts from."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  stages = {k: dict(v) for k, v in dict(method.opts["stages"] or {}).items()}
  unknown = sorted(set(stages) - set(STAGE_ORDER))
  if unknown:
    raise ConfigError(f"config.model.stages: unknown stage(s) {unknown}; expected "
                      f"{list(STAGE_ORDER)}")
  for name, spec in stages.items():
    bad = sorted(set(spec) - STAGE_KEYS)
    if bad:
      raise ConfigError(f"config.model.stages.{name}: unknown key(s) {bad}; expected "
                        f"{sorted(STAGE_KEYS)}")
  if int(stages.get("locate", {}).get("steps", 0)) > 0:
    method.check_locate()
    if stages["locate"].get("data", "episodes") not in LOCATE_DATA:
      raise ConfigError(f"config.model.stages.locate.data={stages['locate']['data']!r}; "
                        f"expected one of {list(LOCATE_DATA)}")
  todo = [s for s in STAGE_ORDER if int(stages.get(s, {}).get("steps", 0)) > 0]
  # Resume from the last finished stage.
  start = 0
  for i in range(len(todo) - 1, -1, -1):
    path = stage_path(method, todo[i])
    if os.path.isfile(path):
      flat = load_file(path)
      params = base.replace_leaves(params, {}, [(k, lambda v=v: v) for k, v in flat.items()])[0]
      logging.info("LLaFS: stage %s loaded from %s", todo[i], path)
      start = i + 1
      break
  for name in todo[start:]:
    params = train_stage(method, name, stages[name], params, frozen)
    path = stage_path(method, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: np.asarray(v) for k, v in base.leaf_paths(params).items()}, tmp)
    os.replace(tmp, path)
    logging.info("LLaFS: stage %s saved to %s", name, path)
  return params


def train_stage(method: LLaFS, name: str, spec: Mapping[str, Any], params: PyTree,
                frozen: PyTree) -> PyTree:
  """One pretraining stage: Adam (linear warm-up over 10% of the steps, cosine decay) on the
  stage's trainable subset of `params`; logs the loss every `log_every` steps."""
  steps, bsz = int(spec["steps"]), int(spec.get("batch", 4))
  lr, log_every = float(spec.get("lr", 1e-3)), int(spec.get("log_every", 10))
  seed = int(method.config.seed) + 17 * {"align": 1, "curriculum": 2, "locate": 3}[name]
  skip = tuple(STAGE_FROZEN_PARTS[name]) + tuple(spec.get("frozen", ()))
  patterns = [p for p in method.trainable_patterns() if not p.startswith(skip)] if skip else None
  if patterns == []:  # pylint: disable=g-explicit-bool-comparison
    logging.warning("LLaFS stage %s: nothing to train (config.model.trainable has no pattern "
                    "outside %s); skipped", name, list(skip))
    return params
  if patterns is None:
    train, rest = params, {}
  else:
    train, rest = base.partition(params, patterns)
  warm = max(steps // 10, 1)
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(steps, warm + 1))
  # The learning rate enters as an argument (not a constant of the program), so the step
  # compiles to the same program for any step count (XLA's persistent cache reuses it).
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b2=0.95))
  state = opt.init(train)
  keys = ("refine_weight", "locate_weight", "visual_grad", "truth_tokens")
  saved = {k: method.opts[k] for k in keys}

  loss = method.loss
  if name == "locate":
    loss = functools.partial(method.locate_loss, refine_batch=int(spec.get("refine_batch", 0)))

  def loss_fn(train, rest, frozen, batch, rng):
    p = base.merge(train, rest)
    return loss(p, frozen, batch, rng)

  @jax.jit
  def step_fn(train, state, rest, frozen, batch, rng, lr_now):
    (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(train, rest, frozen, batch, rng)
    upd, state = opt.update(g, state, train)
    upd = jax.tree.map(lambda u: -lr_now * u, upd)
    return optax.apply_updates(train, upd), state, aux

  if name == "align":  # captions: the LLM writes text, no mask to refine or locate; the
    # stage exists to train the visual side
    method.opts.update(refine_weight=0.0, locate_weight=0.0, visual_grad=True, truth_tokens=0.0)
  batches = (locate_batches(method, steps, bsz, seed, str(spec.get("data", "episodes")))
             if name == "locate" else None)
  t0 = time.perf_counter()
  try:
    for i in range(steps):
      if name == "align":
        b = caption_batch(method, i, bsz, seed)
      elif name == "locate":
        b = next(batches)
      else:
        b = pseudo_batch(method, i, steps, bsz, seed)
      b.pop("difficulty", None)
      b = {k: jnp.asarray(v) for k, v in b.items()}
      train, state, aux = step_fn(train, state, rest, frozen, b, jax.random.PRNGKey(seed + i),
                                  jnp.float32(sched(i)))
      # Synchronous steps: the next batch is built (tokenizer, OpenCV) only once this step's
      # host callbacks are done (a step running concurrently with the host work stalled).
      jax.block_until_ready(aux)
      if (i + 1) % log_every == 0 or i == 0 or i + 1 == steps:
        aux = {k: float(v) for k, v in aux.items()}
        logging.info("LLaFS stage %s step %d/%d: %s (%.1f s/step)", name, i + 1, steps,
                     ", ".join(f"{k} {v:.4g}" for k, v in sorted(aux.items())),
                     (time.perf_counter() - t0) / (i + 1))
  finally:
    method.opts.update(saved)
  return base.merge(train, rest)
