"""DSV-LFS as an fssjax method (Karimi and Poullis: DSV-LFS: Unifying LLM-Driven Semantic Cues
with Visual Features for Robust Few-Shot Segmentation, CVPR 2025; published code
aminpdik/DSV-LFS, built on LISA).

Per episode (published `DSVLFSForCausalLM.model_forward`):

  * a multimodal LLM (LLaVA-1.5: CLIP ViT-L/14-336 tower, MLP projector, LLaMA-family LLM
    with LoRA on q_proj / v_proj) reads one conversation, teacher-forced in training and in
    evaluation: the user turn is the query image, the class description paragraph and a
    request to segment the class with those features (`QUESTION`, the published
    `SHORT_QUESTION_LIST3[0]`), the answer a short sentence ending in the new token `[SEM]`
    (`ANSWER`, the published `ANSWER_LIST[0]`); the last hidden state at `[SEM]` goes
    through Linear-ReLU-Linear (`text_hidden_fcs`) to the 256-d sparse (semantic) prompt;
  * dense matching (`fssjax.nn.dense_matching.DenseMatching`) of the outputs of all SAM
    encoder blocks of the query and of the masked support gives the dense (visual) prompt;
  * SAM's mask decoder (trainable) turns the query's image embedding and both prompts into
    low-resolution mask logits (`multimask_output=False`), postprocessed as SAM does to the
    scored view;
  * loss = ce_weight x LLM cross-entropy on the answer tokens + bce_weight x sigmoid BCE +
    dice_weight x Dice (sigmoid, scale 1000, eps 1e-6, LISA's `dice_loss`), 1.0 / 2.0 / 0.5.

Trainable by default (published): the LoRA factors, the token embedding (and `lm_head` when
it is not tied), the prompt projection, the SAM mask decoder and the matching block; the
vision tower, projector, SAM image and prompt encoders and the LLM base weights are frozen.
The optimiser (AdamW 3e-4, betas (0.9, 0.95), no weight decay, 100 warm-up steps, linear
decay, clip 1.0, bf16) lives in the configs (configs/dsv_lfs_coco.py).

Prompt modes (`model.prompt_mode`): 'both' (published), 'semantic' (no support: SAM's
no-mask dense embedding replaces the visual prompt), 'visual' (no LLM: no sparse token, no
cross-entropy). `model.eval_prompt_mode` evaluates a trained model in another mode;
`model.prompt_dropout` p (not published; the CPU demo) trains 'both' with a fraction p of
the steps in a single-prompt mode (p/2 'visual', p/2 'semantic', drawn per step; one pass
computes the three prompt sets and keeps the drawn mode's logits and cross-entropy,
`_dropout_forward`), so that one model can be evaluated in all three modes.

K shots (`model.kshot`): 'vote' (the paper; the evaluator runs K one-shot passes and votes,
HSNet's rule) or 'attention' (beyond the published code: the K dense prompts are averaged
with per-position softmax weights from a small learned scorer, `kshot_attention`, trained
with K-shot episodes, e.g. `data.shot=K` or `data.train_shot_max`).

Image tokens for the LLM (`model.vision_tower`): 'clip' (published: CLIP ViT penultimate
layer without [CLS] -> projector, 576 tokens at 336 x 336, square resize) or 'sam' (the CPU
demo: the frozen SAM encoder's image embedding average-pooled to `image_token_grid`^2 tokens
-> a trainable projector; no CLIP tower).

Views and text: the batch carries the SAM input (`query_image@sam`, longest side
`sam_image_size` + zero padding as published, or a square resize) and, for 'clip',
`query_image@clip`; the conversation comes tokenised from the data workers (`text@dsv`,
`ConversationTokenizer`: one sequence per class, the image as `image_tokens` placeholder ids
-200 as LLaVA's `IMAGE_TOKEN_INDEX`, right padded). Masks are scored at `data.image_size`
(published 400 x 400); support masks are mapped into SAM's frame and SAM's output back
(`fssjax.nn.dense_matching.support_mask_at` / `masks_to_scored_view`).

Descriptions (`model.descriptions`): '' = the data set's own (`fssjax.priors.describe`: the
shipped COCO / PASCAL files, the synthetic benchmark's exact sidecar), or a describe output
file. `description_sentences` n > 0 keeps the first n sentences (the CPU demo: 1, the
sentence naming shape and texture). `description_noise` f (a study the paper leaves open):
in each description a fraction f of the attributes (sentences) is dropped or, with
probability 1/2, swapped with the attribute at the same place of another class's
description; deterministic given `description_noise_seed`.

Weights: `model.llm` (a transformers LLaMA directory, a GGUF file, or 'smollm2' for the
offline SmolLM2-135M-Instruct) or random from `model.llm_config`; `model.sam` (HF SamModel
directory / safetensors, or an official `sam_vit_*.pth` with `allow_pickle_weights`) or the
demo's own SAM pretraining (`model.sam_pretrain`, stage 1: see `pretrain_sam`), else random
from `model.sam_config`; the CLIP tower and projector from `model.llava` (a LLaVA-1.5
checkpoint read by `fssjax.weights.llava`) or random from `model.clip_config`. New
vocabulary rows ([SEM]) start as LISA's (normal, std 0.02). `model.host_init` (default on)
draws the initial values with NumPy on the host (`host_init_values`); off, Flax's
initialisers run on the devices (for models larger than one host's memory).
`model.scan_layers` runs the LLM's decoder layers as one `nn.scan` body (one compiled layer
instead of one per layer: the CPU demo's 30-layer SmolLM2 compiles in a fraction of the time;
the parameters live stacked under `language_model/model/layers/...` [num_layers, ...], loaded
checkpoints are stacked by `fssjax.nn.llama.stack_layers`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time
from typing import Any, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fssjax import metrics
from fssjax.data.base import IGNORE
from fssjax.methods import base
from fssjax.methods.base import ConfigError, Method, PyTree, compute_dtype
from fssjax.nn import dense_matching as dm
from fssjax.nn import llama as nl
from fssjax.nn import sam as sam_lib

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for an image feature position
SEM_TOKEN = "[SEM]"
TEXT_NAME = "dsv"
SAM_VIEW = "sam"
CLIP_VIEW = "clip"
PROMPT_MODES = ("both", "semantic", "visual")
KSHOT_MODES = ("vote", "attention")
# Published user turn and answer (aminpdik/DSV-LFS utils/utils.py SHORT_QUESTION_LIST3[0],
# ANSWER_LIST[0]); {prop} is the class description.
QUESTION = ("<image>\nthis one is a query image.\n{prop} \nThis paragraph outlines the visual "
            "features of {class_name} that distinguish it from other similar categories.\n "
            "Please use distinguishing visual features to segment {class_name} in the query "
            "image.")
ANSWER = "It is [SEM]."
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The "
                "assistant gives helpful, detailed, and polite answers to the human's questions.")
# Chat formats: (text before the user turn, between user turn and answer, after the answer,
# prepend BOS). 'llava_v1': LLaVA-1.5's conv_vicuna_v1 (LISA / DSV-LFS); 'chatml': the
# SmolLM2 / Qwen chat format (without the default system prompt).
CONVERSATIONS = {
    "llava_v1": (LLAVA_SYSTEM + " USER: ", " ASSISTANT: ", "</s>", True),
    "chatml": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", False),
}

_DEFAULTS = dict(
    llm="",
    llm_config={},
    tokenizer="",
    llava="",
    clip="",
    vision_tower="clip",
    clip_config={},
    image_token_grid=2,
    sam="",
    sam_config="vit_h",
    sam_resize="longest_side",
    sam_pretrain={},
    sam_pretrain_dir="",
    allow_pickle_weights=False,
    prompt_mode="both",
    eval_prompt_mode="",
    prompt_dropout=0.0,
    kshot="vote",
    matching_channels=(16, 128, 256),
    matching_blocks=(),
    lora_rank=8,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_targets=("q_proj", "v_proj"),
    conversation="llava_v1",
    question=QUESTION,
    answer=ANSWER,
    descriptions="",
    description_sentences=0,
    description_noise=0.0,
    description_noise_seed=0,
    max_text_length=0,
    ce_weight=1.0,
    bce_weight=2.0,
    dice_weight=0.5,
    loss_boundary="ignore",
    remat=False,
    scan_layers=False,
    host_init=True,
    dtype="",
)

# Published trainable set (regular expressions over init's '/'-joined paths).
_TRAINABLE = (
    r"language_model/.*lora_(A|B)/.*",
    r"language_model/model/embed_tokens/.*",
    r"language_model/lm_head/.*",
    r"text_hidden_fcs/.*",
    r"sam/mask_decoder/.*",
    r"dense_matching/.*",
    r"kshot_attention/.*",
)


# ----------------------------------------------------------------------------------------
# Text: descriptions, noise, the conversation.


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def split_attributes(text: str) -> list[str]:
  """A description's attributes: its sentences (split after '.', '!' or '?')."""
  return [s for s in _SENTENCE.split(text.strip()) if s]


def noisy_descriptions(descriptions: Mapping[str, str], fraction: float, seed: int = 0
                       ) -> dict[str, str]:
  """Each description with round(fraction x n) of its n attributes (sentences, at least one
  when fraction > 0) dropped or, with probability 1/2, replaced by the attribute at the same
  place of another class's description (an attribute of the wrong class). Deterministic in
  (seed, class name); fraction 0 returns the texts unchanged.

  Raises:
    ValueError: fraction outside [0, 1].
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"description_noise = {fraction}; expected a fraction in [0, 1]")
  if fraction == 0.0:
    return dict(descriptions)
  names = sorted(descriptions)
  parts = {n: split_attributes(descriptions[n]) for n in names}
  out = {}
  for name in names:
    key = int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(key)
    attrs = list(parts[name])
    k = min(len(attrs), max(1, int(round(fraction * len(attrs)))))
    chosen = sorted(rng.choice(len(attrs), size=k, replace=False).tolist())
    others = [o for o in names if o != name]
    for i in chosen:
      if others and rng.random() < 0.5:
        other = parts[others[int(rng.integers(len(others)))]]
        attrs[i] = other[min(i, len(other) - 1)] if other else None
      else:
        attrs[i] = None
    out[name] = " ".join(a for a in attrs if a)
  return out


class ConversationTokenizer:
  """Tokenises the DSV-LFS conversation of a class (the `tokenizer` of the `text@dsv`
  TextSpec: `encode(class_name) -> ids`).

  ids = [BOS] prefix + question(prop=description, class_name) with '<image>' replaced by
  `image_tokens` copies of IMAGE_TOKEN_INDEX + mid + answer (+ suffix). The answer is
  tokenised on its own, so its `answer_length` ids (with [SEM] at `sem_offset`) end every
  sequence: the method finds them from the sequence length.

  Attributes:
    sem_id: the id of the added [SEM] token. pad_id: the padding id. vocab_size: the
    tokenizer's vocabulary size with [SEM].
  """

  def __init__(self, tokenizer: Any, descriptions: Mapping[str, str], *, question: str,
               answer: str, conversation: str, image_tokens: int):
    import tokenizers  # pylint: disable=import-outside-toplevel
    if conversation not in CONVERSATIONS:
      raise ConfigError(f"model.conversation = {conversation!r}; expected one of "
                        f"{sorted(CONVERSATIONS)}")
    if SEM_TOKEN not in answer:
      raise ConfigError(f"model.answer = {answer!r} must contain {SEM_TOKEN}")
    if question.count("<image>") != 1:
      raise ConfigError(f"model.question must contain '<image>' once, got {question!r}")
    # A private copy of the fast tokenizer with [SEM] added (the caller's stays unchanged).
    self.tok = tokenizers.Tokenizer.from_str(tokenizer.tok.to_str())
    self.tok.add_special_tokens([SEM_TOKEN])
    self.sem_id = int(self.tok.token_to_id(SEM_TOKEN))
    self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
    self.bos_id = tokenizer.bos_id
    self.pad_id = int(tokenizer.pad_id)
    self.descriptions = dict(descriptions)
    self.question, self.answer = question, answer
    self.prefix, self.mid, self.suffix, self.add_bos = CONVERSATIONS[conversation]
    self.image_tokens = int(image_tokens)
    self.answer_ids = self._ids(self.answer + self.suffix)
    self.answer_length = len(self.answer_ids)
    self.sem_offset = self.answer_ids.index(self.sem_id)

  def _ids(self, text: str) -> list[int]:
    return list(self.tok.encode(text, add_special_tokens=False).ids) if text else []

  def description(self, class_name: str) -> str:
    if class_name not in self.descriptions:
      raise ConfigError(f"DSV-LFS: no description of class {class_name!r} (model."
                        f"descriptions has {len(self.descriptions)} classes, e.g. "
                        f"{sorted(self.descriptions)[:3]})")
    return self.descriptions[class_name]

  def prompt_ids(self, class_name: str) -> list[int]:
    q = self.question.format(prop=self.description(class_name), class_name=class_name)
    before, after = q.split("<image>")
    ids = [self.bos_id] if self.add_bos and self.bos_id is not None else []
    ids += self._ids(self.prefix + before)
    ids += [IMAGE_TOKEN_INDEX] * self.image_tokens
    ids += self._ids(after + self.mid)
    return ids

  def encode(self, class_name: str) -> list[int]:
    return self.prompt_ids(class_name) + self.answer_ids

  def max_length(self) -> int:
    return max(len(self.encode(n)) for n in self.descriptions)


def load_class_descriptions(config: ml_collections.ConfigDict, spec: str) -> dict[str, str]:
  """{class name: description} for `model.descriptions` (see the module docstring); the
  data set's own file for '' (COCO and PASCAL together for the cross-domain configs, so a
  model trained on one is evaluated on the other)."""
  from fssjax.priors import describe  # pylint: disable=import-outside-toplevel
  if spec and spec not in describe.DATASETS:
    with open(spec, encoding="utf-8") as f:
      doc = json.load(f)
    return {c["name"]: c["description"] for c in doc["classes"]}
  if spec:
    return describe.load_descriptions(spec)
  dataset = str(config.data.dataset)
  if dataset == "synthetic":
    return describe.load_descriptions("synthetic")
  out = {}
  for name in ("coco", "pascal"):
    for k, v in describe.load_descriptions(name).items():
      out.setdefault(k, v)
  return out


@functools.lru_cache(maxsize=4)
def _load_tokenizer(spec: str):
  """`fssjax.priors.tokenizer.load_tokenizer`, once per spec (a GGUF tokenizer takes seconds
  to rebuild; `ConversationTokenizer` copies it before adding [SEM])."""
  from fssjax.priors.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  return load_tokenizer(spec)


def first_sentences(text: str, n: int) -> str:
  return " ".join(split_attributes(text)[:n]) if n > 0 else text


# ----------------------------------------------------------------------------------------
# Small modules.


class PromptProjection(nn.Module):
  """Linear(D, D) -> ReLU -> Linear(D, out) (published `text_hidden_fcs[0]`; the trailing
  Dropout(0.0) is the identity). Parameter names follow the nn.Sequential indices."""

  hidden: int
  out: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="layers_0")(x))
    return nn.Dense(self.out, dtype=self.dtype, name="layers_2")(x)


class KShotAttention(nn.Module):
  """Learned K-shot aggregation of dense prompts [B, K, h, w, C] -> [B, h, w, C]: per
  position, softmax over K of a score MLP (C -> C/4 -> 1) of each shot's prompt."""

  dtype: Any = None

  @nn.compact
  def __call__(self, dense):
    c = dense.shape[-1]
    s = nn.relu(nn.Dense(max(c // 4, 1), dtype=self.dtype, name="score_in")(dense))
    s = nn.Dense(1, dtype=self.dtype, name="score_out")(s).astype(jnp.float32)
    w = jax.nn.softmax(s, axis=1)
    return jnp.sum(w * dense.astype(jnp.float32), axis=1)


def dice_loss(logits: jax.Array, target: jax.Array, valid: jax.Array, scale: float = 1000.0,
              eps: float = 1e-6) -> jax.Array:
  """LISA's dice loss per mask [B] (sigmoid, both terms divided by `scale`)."""
  p = jax.nn.sigmoid(logits) * valid
  t = target * valid
  num = 2.0 * jnp.sum(p / scale * t, axis=(1, 2))
  den = jnp.sum(p / scale, axis=(1, 2)) + jnp.sum(t / scale, axis=(1, 2))
  return 1.0 - (num + eps) / (den + eps)


def sigmoid_bce(logits: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean binary cross-entropy with logits over each mask's valid pixels [B]."""
  ce = optax.sigmoid_binary_cross_entropy(logits, target)
  return jnp.sum(ce * valid, axis=(1, 2)) / jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1.0)


def _sam_config(spec: Any) -> sam_lib.SamConfig:
  if isinstance(spec, sam_lib.SamConfig):
    return spec.validate()
  if isinstance(spec, str):
    return sam_lib.sam_config(spec)
  d = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
  return sam_lib.SamConfig.from_hf(dict(d, model_type="sam"), "config.model.sam_config")


# ----------------------------------------------------------------------------------------
# The method.


def host_init_values(names: Sequence[str], shapes: Sequence[tuple], seed_bits: np.ndarray
                     ) -> list[np.ndarray]:
  """Initial float32 values of the leaves `names` ('/'-joined paths) with NumPy, seeded by
  `seed_bits`, by leaf name, as the modules' own initialisers draw them: LoRA A uniform
  +-1/sqrt(in) and B zeros (PEFT); kernels normal(0, 1/sqrt(fan_in)) (Flax's LeCun rule,
  untruncated); biases, SAM's absolute / relative position tables zeros; norm scales and
  RMSNorm weights ones; the LLM's token embedding normal(0, 0.02); the other embedding
  tables (SAM prompt / output tokens, CLIP positions) and SAM's Fourier matrix normal(0, 1).
  The published weights replace the pretrained parts in `load_pretrained`.

  Raises:
    ValueError: a leaf no rule covers (named).
  """
  gen = np.random.default_rng(np.asarray(seed_bits, np.uint32).ravel())
  out = []
  for name, shape in zip(names, shapes):
    leaf = name.rsplit("/", 1)[-1]
    shape = tuple(shape)
    if name.endswith("lora_A/kernel"):
      bound = 1.0 / math.sqrt(shape[-2])
      v = gen.uniform(-bound, bound, shape)
    elif name.endswith("lora_B/kernel") or leaf in ("bias", "pos_embed", "rel_pos_h",
                                                     "rel_pos_w"):
      v = np.zeros(shape)
    elif leaf == "kernel":
      # Stacked layers (`scan_layers`: 'language_model/model/layers/...', [L, in, out]):
      # the fan-in leaves out the leading layer axis.
      fan = shape[1:-1] if name.startswith("language_model/model/layers/") else shape[:-1]
      v = gen.standard_normal(shape) / math.sqrt(max(int(np.prod(fan)), 1))
    elif leaf in ("scale", "weight"):
      v = np.ones(shape)
    elif leaf == "embedding":
      v = gen.standard_normal(shape) * (0.02 if name.startswith("language_model/") else 1.0)
    elif leaf in ("positional_embedding", "class_embedding"):
      v = gen.standard_normal(shape)
    else:
      raise ValueError(f"host_init_values: no rule for parameter {name!r}")
    out.append(np.asarray(v, np.float32))
  return out


class DSVLFS(Method):
  """DSV-LFS behind the fssjax Method interface (see the module docstring)."""

  MODEL_DEFAULTS = _DEFAULTS
  TRAINABLE = _TRAINABLE
  threshold = 0.0
  normalization = "imagenet"  # the scored view (only pictures use it; SAM has its own view)
  align_corners = False
  interpolation = "bilinear"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    m = self.opts
    for key, allowed in (("prompt_mode", PROMPT_MODES), ("kshot", KSHOT_MODES),
                         ("vision_tower", ("clip", "sam")),
                         ("sam_resize", ("longest_side", "square")),
                         ("loss_boundary", ("ignore", "background"))):
      if m[key] not in allowed:
        raise ConfigError(f"config.model.{key} = {m[key]!r}; expected one of {list(allowed)}")
    self.mode = m["prompt_mode"]
    self.eval_mode = m["eval_prompt_mode"] or self.mode
    if self.eval_mode not in PROMPT_MODES:
      raise ConfigError(f"config.model.eval_prompt_mode = {self.eval_mode!r}; expected '' or "
                        f"one of {list(PROMPT_MODES)}")
    self.prompt_dropout = float(m["prompt_dropout"])
    if not 0.0 <= self.prompt_dropout <= 1.0 or (self.prompt_dropout and self.mode != "both"):
      raise ConfigError(f"config.model.prompt_dropout = {self.prompt_dropout} must be in "
                        "[0, 1], and > 0 only with prompt_mode='both'")
    self.kshot = "joint" if m["kshot"] == "attention" else "vote"
    self.dtype = compute_dtype(config)
    remat = bool(m["remat"])

    # SAM.
    self.sam_config = _sam_config(m["sam_config"])
    v = self.sam_config.vision_config
    self.sam_size = int(v.image_size)
    self.sam_encoder = sam_lib.SamVisionEncoder(v, self.dtype, remat=remat)
    self.sam_prompt = sam_lib.SamPromptEncoder(self.sam_config.prompt_encoder_config,
                                               self.dtype)
    self.sam_decoder = sam_lib.SamMaskDecoder(self.sam_config.mask_decoder_config, self.dtype)
    width = int(self.sam_config.mask_decoder_config.hidden_size)
    channels = tuple(int(c) for c in m["matching_channels"])
    if channels[-1] != width:
      raise ConfigError(f"config.model.matching_channels = {channels}: the last must be the "
                        f"SAM prompt width {width}")
    blocks = tuple(int(i) for i in m["matching_blocks"]) or tuple(range(v.num_hidden_layers))
    if any(not 0 <= i < v.num_hidden_layers for i in blocks):
      raise ConfigError(f"config.model.matching_blocks = {blocks}: block indexes of a "
                        f"{v.num_hidden_layers}-block SAM encoder expected")
    self.blocks = blocks
    self.matching = dm.DenseMatching(channels, dtype=self.dtype)

    # LLM and its tokenizer.
    self.llm_config = self._llm_config()
    self.text = None
    if self.uses_llm:
      self.text = self._conversation_tokenizer()
      vocab = max(self.llm_config.vocab_size, self.text.vocab_size)
      self.base_vocab = self.llm_config.vocab_size
      self.llm_config = dataclasses.replace(
          self.llm_config, vocab_size=vocab, lora_rank=int(m["lora_rank"]),
          lora_alpha=float(m["lora_alpha"]), lora_dropout=float(m["lora_dropout"]),
          lora_targets=tuple(m["lora_targets"])).validate("DSV-LFS LLM")
      scan = bool(m["scan_layers"])
      self.llm = nl.LlamaForCausalLM(self.llm_config, self.dtype, remat=remat,
                                     scan_layers=scan)
      self.llm_train = nl.LlamaForCausalLM(self.llm_config, self.dtype, remat=remat,
                                           scan_layers=scan, deterministic=False)
      d = self.llm_config.hidden_size
      self.prompt_proj = PromptProjection(d, width, self.dtype)
      from fssjax.nn.llava import LlavaProjector  # pylint: disable=import-outside-toplevel
      self.projector = LlavaProjector(d, dtype=self.dtype)
      if m["vision_tower"] == "clip":
        from fssjax.nn import clip_vision  # pylint: disable=import-outside-toplevel
        cc = m["clip_config"]
        self.clip_config = getattr(self, "_llava_vision", None) or (
            clip_vision.CLIPVisionConfig(**dict(cc)) if cc
            else clip_vision.clip_vision_config("vit_l_14_336"))
        self.clip = clip_vision.CLIPVisionModel(self.clip_config, self.dtype, remat=remat)
    self.kshot_attention = KShotAttention(self.dtype) if m["kshot"] == "attention" else None

  # ---------------------------------------------------------------------------------------
  # Configuration helpers.

  @property
  def uses_llm(self) -> bool:
    return self.mode != "visual" or self.eval_mode != "visual"

  @property
  def image_tokens(self) -> int:
    if self.opts["vision_tower"] == "sam":
      return int(self.opts["image_token_grid"]) ** 2
    cc = getattr(self, "clip_config", None)
    if cc is None:
      from fssjax.nn import clip_vision  # pylint: disable=import-outside-toplevel
      cc = (clip_vision.CLIPVisionConfig(**dict(self.opts["clip_config"]))
            if self.opts["clip_config"] else clip_vision.clip_vision_config("vit_l_14_336"))
    return cc.num_patches

  def _llm_path(self) -> str:
    path = self.opts["llm"]
    if path == "smollm2":
      from fssjax.priors.local_lm import smollm2_path  # pylint: disable=import-outside-toplevel
      return smollm2_path()
    return path

  def _llava(self, parts: tuple):
    from fssjax.weights import llava as llava_weights  # pylint: disable=import-outside-toplevel
    return llava_weights.load_llava(self.opts["llava"], vision_tower=self.opts["clip"] or None,
                                    allow_pickle=bool(self.opts["allow_pickle_weights"]),
                                    parts=parts)

  def _llm_config(self) -> nl.LlamaConfig:
    m = self.opts
    if m["llava"] and not m["llm"]:
      cfg, _ = self._llava(())
      if m["vision_tower"] == "clip":
        self._llava_vision = cfg.vision
      return cfg.text
    if m["llm"]:
      from fssjax.weights import llama as wl  # pylint: disable=import-outside-toplevel
      path = self._llm_path()
      if path.endswith(".gguf"):
        return wl.gguf_config(wl.read_gguf(path), path)
      with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return nl.LlamaConfig.from_hf(json.load(f), os.path.join(path, "config.json"))
    cfg = dict(m["llm_config"] or {})
    if not cfg:
      raise ConfigError("DSV-LFS needs an LLM: config.model.llm (a transformers LLaMA "
                        "directory, a GGUF file or 'smollm2') or config.model.llm_config (a "
                        "transformers LlamaConfig dict, random weights)")
    return nl.LlamaConfig.from_hf(cfg, "config.model.llm_config")

  def _conversation_tokenizer(self) -> ConversationTokenizer:
    m = self.opts
    spec = m["tokenizer"] or (m["llm"] if m["llm"] == "smollm2" else
                              (self._llm_path() if m["llm"] else m["llava"]))
    if not spec:
      raise ConfigError("DSV-LFS: config.model.tokenizer is empty (a tokenizer.json, a "
                        "tokenizer directory, a GGUF file or 'smollm2')")
    tok = _load_tokenizer(spec)
    desc = load_class_descriptions(self.config, str(m["descriptions"]))
    desc = {k: first_sentences(v, int(m["description_sentences"])) for k, v in desc.items()}
    desc = noisy_descriptions(desc, float(m["description_noise"]),
                              int(m["description_noise_seed"]))
    return ConversationTokenizer(tok, desc, question=str(m["question"]),
                                 answer=str(m["answer"]), conversation=str(m["conversation"]),
                                 image_tokens=self.image_tokens)

  @classmethod
  def missing_inputs(cls, config: ml_collections.ConfigDict) -> list[str]:
    m = config.get("model", {})
    out = []
    for key, what in (("llm", "a transformers LLaMA directory or a .gguf file (or 'smollm2')"),
                      ("sam", "a transformers SamModel directory / .safetensors, or an "
                              "official sam_vit_*.pth with allow_pickle_weights"),
                      ("llava", "a LLaVA-1.5 checkpoint directory (llava-hf or original)"),
                      ("clip", "a transformers CLIPVisionModel directory (the tower of an "
                               "original-layout LLaVA checkpoint)"),
                      ("tokenizer", "a tokenizer.json / tokenizer directory / .gguf")):
      path = str(m.get(key, "") or "")
      if path and path != "smollm2" and not os.path.exists(path):
        out.append(f"model.{key} = {path!r}: no such file or directory "
                   f"({os.path.abspath(path)}); expected {what}")
    if not (m.get("llm", "") or m.get("llava", "") or m.get("llm_config", None)):
      out.append("model.llava is empty: DSV-LFS needs LLaVA-1.5 weights (a llava-hf or an "
                 "original-layout checkpoint directory; or model.llm, a LLaMA-family "
                 "directory / GGUF)")
    if (not m.get("sam", "") and isinstance(m.get("sam_config", ""), str)
        and m.get("sam_config", "") in ("vit_b", "vit_l", "vit_h")
        and not dict(m.get("sam_pretrain", None) or {}).get("steps", 0)):
      out.append(f"model.sam is empty: the {m.get('sam_config')} SAM image encoder is frozen "
                 "and needs its published weights (a transformers SamModel directory, or "
                 "sam_vit_*.pth with allow_pickle=True)")
    return out

  def trainable_patterns(self) -> list[str]:
    given = self.config.get("model", {}).get("trainable", None)
    if given is not None:
      return super().trainable_patterns()
    pats = list(_TRAINABLE)
    if not self.uses_llm:
      pats = [p for p in pats if not p.startswith(("language_model", "text_hidden"))]
    else:
      if self.llm_config.tie_word_embeddings:
        pats.remove(r"language_model/lm_head/.*")
      if not self.llm_config.lora_rank:
        pats.remove(r"language_model/.*lora_(A|B)/.*")
    if self.kshot_attention is None:
      pats.remove(r"kshot_attention/.*")
    if self.uses_llm and self.opts["vision_tower"] == "sam":
      pats.append(r"multi_modal_projector/.*")  # random init: trained (demo deviation)
    return pats

  def views(self) -> list:
    from fssjax.data.views import ViewSpec  # pylint: disable=import-outside-toplevel
    out = [ViewSpec(SAM_VIEW, self.sam_size, resize=self.opts["sam_resize"],
                    normalization="sam", pad_value=0.0)]
    if self.uses_llm and self.opts["vision_tower"] == "clip":
      out.append(ViewSpec(CLIP_VIEW, self.clip_config.image_size, interpolation="bicubic",
                          normalization="clip"))
    return out

  def texts(self) -> list:
    if not self.uses_llm:
      return []
    from fssjax.data.views import TextSpec  # pylint: disable=import-outside-toplevel
    length = int(self.opts["max_text_length"]) or self.text.max_length()
    return [TextSpec(TEXT_NAME, field="class_name", tokenizer=self.text, max_length=length)]

  # ---------------------------------------------------------------------------------------
  # Parameters.

  def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> dict:
    """{sam: {vision_encoder, prompt_encoder, mask_decoder}, dense_matching, and with an LLM
    language_model, multi_modal_projector, text_hidden_fcs (and vision_tower for 'clip'),
    kshot_attention for the learned K-shot aggregation}; pure and traceable.

    With `model.host_init` (default) the values are `host_init_values`' (NumPy, seeded by
    `rng`'s bits) made in a `jax.pure_callback`: compiling Flax's threefry initialisers of a
    30-layer LLM takes minutes on a loaded CPU. Otherwise Flax's own initialisers run (use it
    for models too large for one host's memory)."""
    if not self.opts["host_init"]:
      return self._flax_init(rng)
    shapes = jax.eval_shape(self._flax_init, rng)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
    structs = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for _, x in flat]
    key = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng

    def host(bits):
      return host_init_values(names, [x.shape for x in structs], np.asarray(bits))

    values = jax.pure_callback(host, structs, key)
    return jax.tree_util.tree_unflatten(treedef, values)

  def _flax_init(self, rng: jax.Array) -> dict:
    keys = iter(jax.random.split(rng, 12))
    s = self.sam_size
    v = self.sam_config.vision_config
    img = jnp.zeros((1, s, s, 3), jnp.float32)
    enc = self.sam_encoder.init(next(keys), img)["params"]
    g = v.grid_size
    width = int(self.sam_config.mask_decoder_config.hidden_size)
    prompt = self.sam_prompt.init(next(keys))["params"]
    emb = jnp.zeros((1, g, g, width), jnp.float32)
    dec = self.sam_decoder.init(next(keys), emb, jnp.zeros((1, g, g, width)),
                                jnp.zeros((1, 1, width)), emb, False)["params"]
    feats = [jnp.zeros((1, g, g, v.hidden_size), jnp.float32)] * len(self.blocks)
    out = {"sam": {"vision_encoder": enc, "prompt_encoder": prompt, "mask_decoder": dec},
           "dense_matching": self.matching.init(next(keys), feats, feats)["params"]}
    if self.kshot_attention is not None:
      out["kshot_attention"] = self.kshot_attention.init(
          next(keys), jnp.zeros((1, 2, g, g, width)))["params"]
    if self.uses_llm:
      cfg = self.llm_config
      ids = jnp.zeros((1, 4), jnp.int32)
      out["language_model"] = self.llm.init(next(keys), ids)["params"]
      out["text_hidden_fcs"] = self.prompt_proj.init(
          next(keys), jnp.zeros((1, cfg.hidden_size)))["params"]
      if self.opts["vision_tower"] == "clip":
        cc = self.clip_config
        out["vision_tower"] = self.clip.init(
            next(keys), jnp.zeros((1, cc.image_size, cc.image_size, 3)))["params"]
        feat_dim = cc.hidden_size
      else:
        feat_dim = width
      out["multi_modal_projector"] = self.projector.init(
          next(keys), jnp.zeros((1, feat_dim)))["params"]
    return out

  def load_pretrained(self, params: PyTree | None, frozen: PyTree) -> tuple[Any, Any]:
    """The LLM (+ [SEM] row), SAM (a checkpoint or the demo's stage-1 pretraining) and the
    LLaVA tower / projector, tensor by tensor into the sharded trees."""
    items = []
    if self.uses_llm and (self.opts["llm"] or self.opts["llava"]):
      items += self._llm_items()
    if self.opts["sam"]:
      items += self._sam_checkpoint_items()
    elif dict(self.opts["sam_pretrain"] or {}).get("steps", 0):
      path = self.pretrained_sam_path()
      if not os.path.isfile(path):
        pretrain_sam(self, path)
      items += self._sam_file_items(path)
    else:
      logging.warning("DSV-LFS: no config.model.sam and no sam_pretrain: the FROZEN SAM image "
                      "encoder is random (only meaningful for tests and benchmarks)")
    if self.uses_llm and self.opts["llava"]:
      items += self._llava_items()
    return base.replace_leaves(params, frozen, items)

  def _llm_items(self):
    if self.opts["llm"]:
      from fssjax.weights import llama as wl  # pylint: disable=import-outside-toplevel
      path = self._llm_path()
      cfg, loaded = wl.load(path)
    else:
      path = self.opts["llava"]
      full, tree = self._llava(("language_model",))
      cfg, loaded = full.text, tree["language_model"]
    if self.opts["scan_layers"] and "layers" not in loaded["model"]:
      loaded = nl.stack_layers(loaded)  # the nn.scan layout: [num_layers, ...] leaves
    flat = base.leaf_paths(loaded)
    vocab = self.llm_config.vocab_size
    items = []
    for p, value in flat.items():
      if p == "model/embed_tokens/embedding" or p == "lm_head/kernel":
        def grow(value=value, p=p):
          value = np.asarray(value, np.float32)
          rows = value if p.startswith("model") else value.T
          extra = vocab - rows.shape[0]
          if extra > 0:  # LISA / DSV-LFS: resize_token_embeddings, new rows normal(0, 0.02)
            new = np.random.default_rng(0).normal(0.0, 0.02, (extra, rows.shape[1]))
            rows = np.concatenate([rows, new.astype(np.float32)], axis=0)
          return rows if p.startswith("model") else rows.T
        items.append(("language_model/" + p, grow))
      else:
        items.append(("language_model/" + p, lambda value=value: np.asarray(value)))
    logging.info("DSV-LFS: LLM weights from %s (%d tensors, vocabulary %d -> %d with %s)",
                 path, len(flat), cfg.vocab_size, vocab, SEM_TOKEN)
    return items

  def _sam_checkpoint_items(self):
    from fssjax.weights import sam as sam_weights  # pylint: disable=import-outside-toplevel
    _, loaded = sam_weights.load_sam(self.opts["sam"],
                                     allow_pickle=bool(self.opts["allow_pickle_weights"]))
    return [("sam/" + p, lambda v=v: np.asarray(v)) for p, v in base.leaf_paths(loaded).items()]

  def _sam_file_items(self, path: str):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    tensors = load_file(path)
    logging.info("DSV-LFS: SAM from the stage-1 pretraining %s", path)
    return [("sam/" + k, lambda v=v: v) for k, v in tensors.items()]

  def _llava_items(self):
    if self.opts["vision_tower"] != "clip":
      return []  # the 'sam' image tokens have their own (trained) projector
    parts = ("multi_modal_projector", "vision_tower")
    _, loaded = self._llava(parts)
    items = []
    for p, v in base.leaf_paths(loaded).items():
      if p.startswith(("vision_tower/", "multi_modal_projector/")):
        items.append((p, lambda v=v: np.asarray(v)))
    return items

  def pretrained_sam_path(self) -> str:
    """The stage-1 SAM file of this config (cached by a hash of everything it depends on)."""
    settings = dict(sam=self.sam_config.to_hf(), pretrain=dict(self.opts["sam_pretrain"]),
                    data=dict(dataset=str(self.config.data.dataset),
                              root=str(self.config.data.root), fold=int(self.config.data.fold),
                              image_size=int(self.config.data.image_size),
                              resize=self.opts["sam_resize"]),
                    seed=int(self.config.seed), version=1)
    if self.opts["scan_layers"]:  # the stacked LLM layout changes the initial draws
      settings["llm_scan_layers"] = True
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = self.opts["sam_pretrain_dir"] or os.path.join(
        os.path.expanduser("~"), ".cache", "fssjax", "dsv_lfs_sam")
    return os.path.join(root, f"sam_{key}.safetensors")

  # ---------------------------------------------------------------------------------------
  # Forward pieces.

  def _encode(self, p: PyTree, images: jax.Array):
    """SAM encoder: (embedding [N, g, g, D], selected block outputs), no gradient."""
    emb, hidden = self.sam_encoder.apply({"params": p["sam"]["vision_encoder"]}, images,
                                         output_hidden_states=True)
    hidden = [hidden[i] for i in self.blocks]
    return jax.lax.stop_gradient(emb), [jax.lax.stop_gradient(h) for h in hidden]

  def _dense_prompts(self, p: PyTree, q_feats, batch, shots: Sequence[int]) -> jax.Array:
    """Visual prompts [B, len(shots), g, g, D] of the given support indexes: the supports of
    all rows and shots go through the SAM encoder and the matching block as one batch of
    B x len(shots) rows (the query features repeated per shot)."""
    n = len(shots)
    idx = jnp.asarray(shots)
    s_img = batch[f"support_images@{SAM_VIEW}"][:, idx]
    b = s_img.shape[0]
    flat = lambda x: x.reshape((b * n,) + x.shape[2:])  # noqa: E731  rows (b, shot)
    _, s_feats = self._encode(p, flat(s_img))
    fg = flat((batch["support_masks"][:, idx] == 1).astype(jnp.float32))
    hw = flat(batch[f"support_size@{SAM_VIEW}"][:, idx])
    s_feats = dm.mask_support_features(
        s_feats, lambda grid: dm.support_mask_at(fg, hw, self.sam_size, grid))
    if n > 1:
      q_feats = [jnp.repeat(f, n, axis=0) for f in q_feats]
    out = self.matching.apply({"params": p["dense_matching"]}, q_feats, s_feats)
    return out.reshape((b, n) + out.shape[1:])

  def _image_tokens(self, p: PyTree, batch, q_emb) -> jax.Array:
    """Projected image features [B, P, D_llm] for the LLM."""
    if self.opts["vision_tower"] == "clip":
      out = self.clip.apply({"params": p["vision_tower"]}, batch[f"query_image@{CLIP_VIEW}"],
                            output_hidden_states=True)
      feats = jax.lax.stop_gradient(out["hidden_states"][-2][:, 1:])
    else:
      g = int(self.opts["image_token_grid"])
      b, h, w, c = q_emb.shape
      feats = q_emb.astype(jnp.float32).reshape(b, g, h // g, g, w // g, c).mean(axis=(2, 4))
      feats = feats.reshape(b, g * g, c)
    return self.projector.apply({"params": p["multi_modal_projector"]}, feats)

  def _semantic(self, p: PyTree, batch, q_emb, rng, train: bool):
    """(sparse prompt [B, 1, D] float32, answer cross-entropy scalar)."""
    ids = batch[f"text@{TEXT_NAME}"].astype(jnp.int32)
    mask = batch[f"text_mask@{TEXT_NAME}"].astype(jnp.int32)
    b, t = ids.shape
    lm = self.llm_train if train else self.llm
    lp = {"params": p["language_model"]}
    is_img = ids == IMAGE_TOKEN_INDEX
    embeds = lm.apply(lp, jnp.where(is_img, 0, ids), method=lm.embed)
    feats = self._image_tokens(p, batch, q_emb)
    from fssjax.nn.llava import splice_image_features  # pylint: disable=import-outside-toplevel
    embeds = splice_image_features(embeds, is_img, feats.reshape(-1, feats.shape[-1]))
    kw = {"rngs": {"dropout": rng}} if train and self.llm_config.lora_dropout > 0 else {}
    hidden = lm.apply(lp, inputs_embeds=embeds, attention_mask=mask, logits=False,
                      **kw)["hidden"]
    length = jnp.sum(mask, axis=1)
    n = self.text.answer_length
    start = length - n  # first answer token
    sem = jnp.take_along_axis(hidden, (start + self.text.sem_offset)[:, None, None], axis=1)
    sparse = self.prompt_proj.apply({"params": p["text_hidden_fcs"]}, sem[:, 0])
    pos = start[:, None] - 1 + jnp.arange(n)[None, :]  # positions predicting the answer
    h = jnp.take_along_axis(hidden, pos[..., None], axis=1)
    logits = lm.apply(lp, h, method=lm.head)
    targets = jnp.take_along_axis(ids, pos + 1, axis=1)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    return sparse[:, None, :].astype(jnp.float32), ce

  def _decode(self, p: PyTree, q_emb, sparse, dense, batch, repeat: int = 1) -> jax.Array:
    """Mask logits [B x repeat, S, S] at the scored view (`repeat` > 1: each query row's
    prompts come `repeat` times in a row, e.g. one per support of a K-shot vote)."""
    pe = self.sam_prompt.apply({"params": p["sam"]["prompt_encoder"]},
                               method=self.sam_prompt.image_pe)
    q_size = batch[f"query_size@{SAM_VIEW}"]
    if repeat > 1:
      q_emb, sparse, q_size = (jnp.repeat(x, repeat, axis=0) for x in (q_emb, sparse, q_size))
    low, _ = self.sam_decoder.apply({"params": p["sam"]["mask_decoder"]}, q_emb, pe, sparse,
                                    dense, False)
    size = batch["query_image"].shape[1:3]
    return dm.masks_to_scored_view(low[:, 0].astype(jnp.float32), q_size, self.sam_size, size)

  def _no_mask_dense(self, p: PyTree, b: int) -> jax.Array:
    _, dense = self.sam_prompt.apply({"params": p["sam"]["prompt_encoder"]})
    return jnp.broadcast_to(dense, (b,) + dense.shape[1:])

  def forward(self, p: PyTree, batch, rng, mode: str, train: bool,
              shots: Sequence[int] = (0,)):
    """(mask logits [B, S, S] float32, answer cross-entropy) in prompt mode `mode`, with the
    supports `shots` (their dense prompts aggregated when there are several)."""
    query = self._query(p, batch, rng, mode, train)
    return self._from_query(p, batch, query, mode, shots), query[3]

  def _query(self, p: PyTree, batch, rng, mode: str, train: bool):
    """The support-independent part: (SAM embedding, block outputs, sparse prompt, CE)."""
    q_emb, q_feats = self._encode(p, batch[f"query_image@{SAM_VIEW}"])
    b = q_emb.shape[0]
    width = q_emb.shape[-1]
    if mode == "visual":
      sparse, ce = jnp.zeros((b, 0, width), jnp.float32), jnp.zeros((), jnp.float32)
    else:
      sparse, ce = self._semantic(p, batch, q_emb, rng, train)
    return q_emb, q_feats, sparse, ce

  def _dropout_forward(self, p: PyTree, batch, rng, index, shots: Sequence[int]):
    """`forward` in mode PROMPT_MODES[index] (index traced: 0 'both', 1 'semantic',
    2 'visual') for `prompt_dropout`: one pass computes the query part, the LLM and the
    visual prompt once and SAM's decoder for the three prompt sets, and `jnp.where` keeps
    the drawn mode's logits and CE (the visual mode's CE is 0), so the gradients are that
    mode's (the others get zero cotangents). This replaces a `lax.switch` over three
    `forward`s, whose train step took 1.9x the CPU time of a plain 'both' step in the CPU
    demo (4.65 s vs 2.48 s; the branches' residuals and operands go through the
    conditional); a 'visual' step now pays the LLM pass it does not use."""
    q_emb, q_feats, sparse, ce = self._query(p, batch, rng, "both", True)
    b, width = q_emb.shape[0], q_emb.shape[-1]
    visual = self._dense(p, batch, q_feats, "both", shots)
    logits_both = self._decode(p, q_emb, sparse, visual, batch)
    logits_sem = self._decode(p, q_emb, sparse, self._no_mask_dense(p, b), batch)
    logits_vis = self._decode(p, q_emb, jnp.zeros((b, 0, width), jnp.float32), visual, batch)
    logits = jnp.where(index == 0, logits_both, jnp.where(index == 1, logits_sem, logits_vis))
    return logits, jnp.where(index == 2, jnp.zeros_like(ce), ce)

  def _from_query(self, p: PyTree, batch, query, mode: str, shots: Sequence[int]):
    """Mask logits [B, S, S] from `_query`'s output and the supports `shots`."""
    q_emb, q_feats, sparse, _ = query
    return self._decode(p, q_emb, sparse, self._dense(p, batch, q_feats, mode, shots), batch)

  def _dense(self, p: PyTree, batch, q_feats, mode: str, shots: Sequence[int]) -> jax.Array:
    """The dense prompt [B, g, g, D]: SAM's no-mask embedding ('semantic'), else the visual
    prompt of the supports `shots` (aggregated when there are several)."""
    if mode == "semantic":
      return self._no_mask_dense(p, q_feats[0].shape[0])
    dense_k = self._dense_prompts(p, q_feats, batch, shots)
    if dense_k.shape[1] == 1:
      return dense_k[:, 0]
    if self.kshot_attention is not None:
      return self.kshot_attention.apply({"params": p["kshot_attention"]}, dense_k)
    return jnp.mean(dense_k, axis=1)

  # ---------------------------------------------------------------------------------------
  # Training and prediction.

  def _mask_loss(self, logits, query_mask):
    target = (query_mask == 1).astype(jnp.float32)
    if self.opts["loss_boundary"] == "ignore":
      valid = (query_mask != IGNORE).astype(jnp.float32)
    else:
      valid = jnp.ones_like(target)
    return (jnp.mean(sigmoid_bce(logits, target, valid)),
            jnp.mean(dice_loss(logits, target, valid)), target, valid)

  def loss(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    p = base.merge(params, frozen)
    k = batch["support_images"].shape[1]
    shots = tuple(range(k)) if self.kshot_attention is not None else (0,)
    r_mode, r_drop = jax.random.split(rng)
    if self.prompt_dropout > 0:
      u = jax.random.uniform(r_mode)
      index = jnp.where(u < self.prompt_dropout / 2, 2,
                        jnp.where(u < self.prompt_dropout, 1, 0))
      logits, ce = self._dropout_forward(p, batch, r_drop, index, shots)
    else:
      logits, ce = self.forward(p, batch, r_drop, self.mode, True, shots)
    bce, dice, target, valid = self._mask_loss(logits, batch["query_mask"])
    m = self.opts
    total = float(m["ce_weight"]) * ce + float(m["bce_weight"]) * bce + float(
        m["dice_weight"]) * dice
    pred = (logits > 0).astype(jnp.float32)
    inter = jnp.sum(pred * target * valid)
    union = jnp.sum(jnp.maximum(pred, target) * valid)
    return total, {"ce_loss": ce, "mask_bce_loss": bce, "mask_dice_loss": dice,
                   "fg_iou": inter / jnp.maximum(union, 1.0)}

  def predict(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
    """Mask logits [B, S, S] (foreground where > 0) in `eval_prompt_mode`. K > 1 supports:
    the learned aggregation ('attention'), or K one-shot passes voted as HSNet ('vote'; the
    evaluator normally runs the K passes itself and votes at the scored size)."""
    return self.predict_modes(params, frozen, batch, (self.eval_mode,))[self.eval_mode]

  def predict_modes(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array],
                    modes: Sequence[str] = PROMPT_MODES) -> dict[str, jax.Array]:
    """{mode: mask logits [B, S, S]} of one trained model in several prompt modes, each
    exactly what `predict` gives with `eval_prompt_mode=mode`, sharing the work the modes
    have in common: the SAM encoder pass of the query, one LLM pass (the semantic prompt of
    'both' and 'semantic') and one visual prompt per support set ('both' and 'visual'); only
    SAM's mask decoder runs once per mode. K > 1 'vote': the query part once, one visual
    prompt and decoder pass per support (batched as B x K rows), voted (HSNet's rule).

    Raises:
      ValueError: an unknown mode, or a mode that needs the LLM in a model built without
        one (prompt_mode = eval_prompt_mode = 'visual').
    """
    bad = [m for m in modes if m not in PROMPT_MODES or (m != "visual" and not self.uses_llm)]
    if bad:
      raise ValueError(f"predict_modes: modes {bad} are not available; this model has "
                       f"{list(PROMPT_MODES) if self.uses_llm else ['visual']}")
    p = base.merge(params, frozen)
    k = batch["support_images"].shape[1]
    rng = jax.random.PRNGKey(0)  # unused outside training (no dropout)
    q_emb, q_feats = self._encode(p, batch[f"query_image@{SAM_VIEW}"])
    b, width = q_emb.shape[0], q_emb.shape[-1]
    sparse = None
    if any(m != "visual" for m in modes):
      sparse, _ = self._semantic(p, batch, q_emb, rng, False)
    joint = k == 1 or self.kshot_attention is not None
    dense = None
    if any(m != "semantic" for m in modes):
      if joint:
        dense = self._dense(p, batch, q_feats, "both", tuple(range(k)))
      else:  # one visual prompt per support, as rows (b, shot)
        dense = self._dense_prompts(p, q_feats, batch, tuple(range(k)))
        dense = dense.reshape((b * k,) + dense.shape[2:])
    out = {}
    for m in modes:
      sp = jnp.zeros((b, 0, width), jnp.float32) if m == "visual" else sparse
      if m == "semantic":  # no support: one pass whatever K
        out[m] = self._decode(p, q_emb, sp, self._no_mask_dense(p, b), batch)
      elif joint:
        out[m] = self._decode(p, q_emb, sp, dense, batch)
      else:  # K one-shot passes (one decoder batch of B x K rows), voted
        logits = self._decode(p, q_emb, sp, dense, batch, repeat=k)
        fg = (logits > 0).reshape((b, k) + logits.shape[1:])
        out[m] = jnp.where(metrics.vote(fg), 0.5, -0.5)
    return out


METHOD = DSVLFS


# ----------------------------------------------------------------------------------------
# Stage 1 of the CPU demo: SAM pretrained on the base classes with point and box prompts.


def pretrain_sam(method: DSVLFS, path: str) -> None:
  """Trains the whole SAM (encoder, prompt encoder, decoder) from scratch on the training
  (base-class) masks of `method.config`'s data with one prompt per mask -- a random foreground
  point (probability 1/2) or the mask's bounding box -- as Segment Anything's interactive
  training does in its first iteration, with BCE + Dice on the scored view; saves the 'sam'
  subtree as safetensors at `path` (so a rerun skips this stage).

  `config.model.sam_pretrain` keys: steps, batch (default 16), lr (1e-3), warmup (50),
  log_every (25). AdamW, linear warm-up, cosine decay, clip 1.0.
  """
  from fssjax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
  from fssjax.train import _init_batch  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  opts = dict(method.opts["sam_pretrain"])
  unknown = sorted(set(opts) - {"steps", "batch", "lr", "warmup", "log_every"})
  if unknown:
    raise ConfigError(f"config.model.sam_pretrain: unknown keys {unknown}; known: steps, "
                      "batch, lr, warmup, log_every")
  steps = int(opts["steps"])
  batch_size = int(opts.get("batch", 16))
  config = ml_collections.ConfigDict(method.config.to_dict())
  config.train.num_steps = steps  # the stream's length
  source = sources.build_source(config.data, "train")
  classes = sources.fold_classes_for(config.data, "train", source)
  loader = pipeline.train_loader(
      config, source, classes, normalization=method.normalization, seed=int(config.seed) + 1,
      global_batch_size=batch_size, process_index=0, process_count=1, worker_count=0,
      views=[v for v in method.views() if v.name == SAM_VIEW])
  it = iter(loader)
  schedule = optax.warmup_cosine_decay_schedule(0.0, float(opts.get("lr", 1e-3)),
                                                int(opts.get("warmup", 50)), steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
  first = next(it)
  params = method.init(jax.random.PRNGKey(int(config.seed) + 7), _init_batch(first))["sam"]
  opt_state = tx.init(params)
  size = method.sam_size

  def loss_fn(p, b, key):
    emb, _ = method.sam_encoder.apply({"params": p["vision_encoder"]},
                                      b[f"query_image@{SAM_VIEW}"])
    mask = b["query_mask"]
    fg = (mask == 1)
    n, hh, ww = fg.shape
    hw = b[f"query_size@{SAM_VIEW}"].astype(jnp.float32)
    k1, k2 = jax.random.split(key)
    # A random foreground pixel (Gumbel argmax), and the mask's box, in SAM's frame.
    g = jax.random.gumbel(k1, fg.shape)
    flat = jnp.argmax(jnp.where(fg, g, -jnp.inf).reshape(n, -1), axis=1)
    yy, xx = (flat // ww).astype(jnp.float32), (flat % ww).astype(jnp.float32)
    sy, sx = hw[:, 0] / hh, hw[:, 1] / ww
    point = jnp.stack([(xx + 0.5) * sx - 0.5, (yy + 0.5) * sy - 0.5], -1)[:, None]
    rows, cols = jnp.any(fg, axis=2), jnp.any(fg, axis=1)
    ar_h, ar_w = jnp.arange(hh, dtype=jnp.float32), jnp.arange(ww, dtype=jnp.float32)
    y0 = jnp.min(jnp.where(rows, ar_h, hh), 1)
    y1 = jnp.max(jnp.where(rows, ar_h, -1), 1)
    x0 = jnp.min(jnp.where(cols, ar_w, ww), 1)
    x1 = jnp.max(jnp.where(cols, ar_w, -1), 1)
    box = jnp.stack([x0 * sx, y0 * sy, (x1 + 1) * sx - 1, (y1 + 1) * sy - 1], -1)
    pp = {"params": p["prompt_encoder"]}
    sp_pt, dense = method.sam_prompt.apply(pp, point, jnp.ones((n, 1), jnp.int32))
    sp_box, _ = method.sam_prompt.apply(pp, None, None, box)
    use_box = jax.random.bernoulli(k2, 0.5, (n,))[:, None, None]
    # Point prompt: [point, not-a-point]; box prompt: [corner, corner]: both two tokens.
    sparse = jnp.where(use_box, sp_box, sp_pt)
    dense = jnp.broadcast_to(dense, (n,) + dense.shape[1:])
    pe = method.sam_prompt.apply(pp, method=method.sam_prompt.image_pe)
    low, _ = method.sam_decoder.apply({"params": p["mask_decoder"]}, emb, pe, sparse, dense,
                                      False)
    logits = dm.masks_to_scored_view(low[:, 0].astype(jnp.float32),
                                     b[f"query_size@{SAM_VIEW}"], size, (hh, ww))
    target = fg.astype(jnp.float32)
    valid = (mask != IGNORE).astype(jnp.float32)
    loss = jnp.mean(sigmoid_bce(logits, target, valid)) + jnp.mean(
        dice_loss(logits, target, valid))
    pred = (logits > 0).astype(jnp.float32)
    iou = jnp.sum(pred * target * valid) / jnp.maximum(
        jnp.sum(jnp.maximum(pred, target) * valid), 1.0)
    return loss, iou

  @jax.jit
  def step(p, o, b, key):
    (loss, iou), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, b, key)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss, iou

  keys = ("query_mask", f"query_image@{SAM_VIEW}", f"query_size@{SAM_VIEW}")
  log_every = int(opts.get("log_every", 25))
  start = time.perf_counter()
  batch = first
  logging.info("DSV-LFS stage 1: pretraining SAM (%d steps, batch %d) -> %s", steps,
               batch_size, path)
  for i in range(steps):
    if i:
      batch = next(it)
    b = {k: jnp.asarray(batch[k]) for k in keys}
    params, opt_state, loss, iou = step(params, opt_state, b,
                                        jax.random.PRNGKey(int(config.seed) * 100003 + i))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      elapsed = time.perf_counter() - start
      logging.info("DSV-LFS stage 1: step %d/%d loss %.4f fg IoU %.3f (%.1f s, %.2f s/step)",
                   i + 1, steps, float(loss), float(iou), elapsed, elapsed / (i + 1))
      print(f"[dsv_lfs stage 1] step {i + 1}/{steps} loss {float(loss):.4f} "
            f"fg_iou {float(iou):.3f} ({elapsed:.0f} s)", flush=True)
  it.close()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  flat = {k: np.asarray(v, np.float32) for k, v in base.leaf_paths(params).items()}
  tmp = path + ".tmp"
  save_file(flat, tmp)
  os.replace(tmp, path)
  logging.info("DSV-LFS stage 1: saved %s", path)
