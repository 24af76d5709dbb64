"""LLMFormer (Shi, Dao, Cai, "LLMFormer: Large Language Model for Open-Vocabulary Semantic
Segmentation", IJCV 2024) as an fssjax method: open-vocabulary semantic segmentation with
priors parsed from an image description. No code was released; the network and the choices
made where the paper is silent are in `fssjax.nn.llmformer`; here are the data, the loss, the
prediction, the evaluation and the training loop.

Inputs per image (declared, precomputed): the image, and the description's priors
(`fssjax.priors.scene_graph.ScenePriors`) embedded with MiniLM (`PriorBank`): object names,
attribute words with their owner object, relation triplets, padded to `model.max_objects`,
`model.max_attributes`, `model.max_relations` (extra ones are dropped, in order). Priors come
from the embedded benchmark's exact scenes (`SyntheticDenseSource.priors`) or from a
`python -m fssjax.priors.describe_images` JSON file for real sets (`model.priors_files`,
one per data set name; without one an image has no priors and the attentions leave the
queries unchanged).

Class names: embedded with the same MiniLM (`SentenceEncoder.minilm()`, unit vectors); where
a data set's name is a comma-separated synonym list (`fssjax.data.class_names`, FC-CLIP's
lists) only the first synonym is embedded (ours; FC-CLIP averages synonyms and prompt
templates). The classifier compares each mask with them, so any list of names can be scored
(open vocabulary).

Training (`train_and_evaluate`, its own loop: the generic trainer draws few-shot episodes):
batches of whole images resized to `data.image_size` squared (ours; the published recipe of
Mask2Former crops large-scale-jittered 640 crops), targets one binary mask per class present
(`fssjax.data.dense.semantic_targets`), Hungarian matching and the Mask2Former losses
(`fssjax.nn.matching.set_criterion`: class 2, mask BCE 5, Dice 5 on `model.num_points`
uncertain points, no-object weight 0.1) on the output of every decoder layer (auxiliary
losses, summed), AdamW.

Evaluation (`evaluate_dense`, the published open-vocabulary protocol): whole image, shorter
side resized to `data.image_size` (640 by default; `fssjax.data.dense.resize_for_eval`),
padded to a multiple of 32 (bottom / right, zeros after normalisation, cropped from the
logits), Mask2Former's `semantic_inference`, logits resized back to the label's size
(bilinear, half-pixel) and the argmax scored by `fssjax.metrics.DenseAccumulator`
(detectron2's mIoU). `candidates='dataset'`: the evaluated set's class names;
`candidates='description'`: no list is given, each image's candidates are its parsed objects
(object phrase without the size word: attributes + name, e.g. "red dotted circle"), and each
candidate's predicted pixels are scored as the data set class whose name embedding is nearest
to the candidate's (cosine) -- the names come from the image's description only.

Without a prior-aware evaluator the method also serves the generic dense evaluator
(`predict_dense`, priors taken from the batch's `prior_*` keys when present, else none).

Entry point: `python -m fssjax.methods.llmformer --config=configs/llmformer_cocostuff.py:demo
--workdir=runs/llmformer_demo`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fssjax.data import transforms
from fssjax.methods.base import ConfigError, Method
from fssjax.nn import llmformer as llm
from fssjax.nn import mask2former as m2f
from fssjax.nn import matching

PyTree = Any


# ------------------------------------------------------------------------------------------
# Text embeddings of class names and priors.


class RecordingEncoder:
  """Collects the texts `embed_priors` asks for (returns zeros): one pass to list them."""

  def __init__(self, dim: int):
    self.dim = dim
    self.texts: list[str] = []

  def encode(self, texts):
    self.texts.extend(texts)
    return np.zeros((len(texts), self.dim), np.float32)


class LookupEncoder:
  """Serves precomputed embeddings of known texts (`table`: text -> [D])."""

  def __init__(self, table: Mapping[str, np.ndarray], dim: int):
    self.table, self.dim = table, dim

  def encode(self, texts):
    return np.stack([self.table[t] for t in texts]) if texts else np.zeros((0, self.dim))


class TextCache:
  """A text encoder (`encode(texts) -> [n, D]`, e.g. `SentenceEncoder.minilm()`) with a
  memo of every text embedded (each distinct text is encoded once)."""

  def __init__(self, encoder):
    self.encoder = encoder
    self.dim = int(encoder.dim)
    self.table: dict[str, np.ndarray] = {}

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    todo = sorted({t for t in texts if t not in self.table})
    if todo:
      emb = np.asarray(self.encoder.encode(todo), np.float32)
      self.table.update(zip(todo, emb))
    return (np.stack([self.table[t] for t in texts]).astype(np.float32) if len(texts)
            else np.zeros((0, self.dim), np.float32))


def class_name_text(name: str) -> str:
  """The text embedded for a class name: its first synonym (FC-CLIP lists are
  comma-separated synonyms)."""
  return str(name).split(",")[0].strip()


class PriorBank:
  """Padded prior embeddings of every image of a split (host numpy arrays [n_images, ...],
  the fields of `fssjax.nn.llmformer.Priors`).

  Built from a list of `ScenePriors` (None = an image without a description) with the texts
  of `fssjax.priors.scene_graph.embed_priors` (object names, attribute words, relation
  triplets), each distinct text embedded once.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.arrays = dict(arrays)

  def __len__(self) -> int:
    return int(self.arrays["objects"].shape[0])

  @classmethod
  def build(cls, priors: Sequence[Any], text: TextCache, *, max_objects: int,
            max_attributes: int, max_relations: int) -> "PriorBank":
    from fssjax.priors.scene_graph import embed_priors  # pylint: disable=import-outside-toplevel
    d = text.dim
    rec = RecordingEncoder(d)
    for p in priors:
      if p is not None:
        embed_priors(p, rec, d)
    text.encode(rec.texts)
    look = LookupEncoder(text.table, d)
    n = len(priors)
    out = dict(objects=np.zeros((n, max_objects, d), np.float32),
               object_valid=np.zeros((n, max_objects), bool),
               attributes=np.zeros((n, max_attributes, d), np.float32),
               attribute_owner=np.zeros((n, max_attributes), np.int32),
               attribute_valid=np.zeros((n, max_attributes), bool),
               relations=np.zeros((n, max_relations, d), np.float32),
               relation_pairs=np.zeros((n, max_relations, 2), np.int32),
               relation_valid=np.zeros((n, max_relations), bool))
    for i, p in enumerate(priors):
      if p is None:
        continue
      e = embed_priors(p, look, d)
      k = min(len(e.objects), max_objects)
      out["objects"][i, :k] = e.objects[:k]
      out["object_valid"][i, :k] = True
      keep = np.nonzero(e.attribute_owner < k)[0][:max_attributes]
      out["attributes"][i, :len(keep)] = e.attributes[keep]
      out["attribute_owner"][i, :len(keep)] = e.attribute_owner[keep]
      out["attribute_valid"][i, :len(keep)] = True
      keep = np.nonzero((e.relation_pairs < k).all(-1))[0][:max_relations]
      out["relations"][i, :len(keep)] = e.relations[keep]
      out["relation_pairs"][i, :len(keep)] = e.relation_pairs[keep]
      out["relation_valid"][i, :len(keep)] = True
    return cls(out)

  def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """{'prior_<field>': array [len(indices), ...]} for a batch."""
    idx = np.asarray(indices, np.int64)
    return {f"prior_{k}": self.arrays[k][idx] for k in llm.Priors._fields}

  def save(self, path: str) -> None:
    np.savez_compressed(path, **self.arrays)

  @classmethod
  def load(cls, path: str) -> "PriorBank":
    with np.load(path) as z:
      return cls({k: z[k] for k in z.files})


def source_priors(source, priors_file: str = "") -> list:
  """The `ScenePriors` of each image of a dense source: from `priors_file` (a describe_images
  JSON; images it lacks get None), else the source's own exact priors (`source.priors(i)`, the
  embedded benchmark), else None for every image."""
  n = len(source)
  if priors_file:
    from fssjax.priors.describe_images import load_priors  # pylint: disable=import-outside-toplevel
    table = load_priors(priors_file)
    return [table.get(i) for i in range(n)]
  if hasattr(source, "priors"):
    return [source.priors(i) for i in range(n)]
  return [None] * n


# ------------------------------------------------------------------------------------------
# The method.


class LLMFormer(Method):
  """LLMFormer (module docstring). `config.model` keys: MODEL_DEFAULTS."""

  MODEL_DEFAULTS = dict(
      encoder="resnet50",            # resnet50 | resnet101 | resnet_tiny (from scratch)
      encoder_weights="",            # torchvision state dict (safetensors; .pth: allow_pickle)
      allow_pickle_weights=False,
      hidden_dim=256,                # Mask2Former's published sizes
      feature_size=256,
      mask_feature_size=256,
      num_queries=100,
      decoder_layers=10,             # 9 layers + the initial prediction
      encoder_layers=6,
      num_heads=8,
      dim_feedforward=2048,
      encoder_feedforward_dim=1024,
      semantic_attention=True,
      scaled_visual_attention=True,
      relation_attention=True,
      hard_scale_selection=False,
      max_objects=16,
      max_attributes=64,
      max_relations=64,
      max_targets=32,                # target masks per image (classes present)
      num_points=12544,              # Mask2Former's 112 x 112
      class_weight=2.0,
      mask_weight=5.0,
      dice_weight=5.0,
      no_object_weight=0.1,
      candidates="dataset",          # dataset | description (evaluation)
      priors_files=None,             # {data set name: describe_images JSON}
  )
  TRAINABLE = (".*",)
  normalization = "imagenet"
  align_corners = False
  evaluators = ("dense",)

  @staticmethod
  def own_training_loop(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`fssjax.main` hands training to `train_and_evaluate` below: the generic trainer draws
    few-shot episodes and has no dense (whole-image) training batches yet."""
    return train_and_evaluate(config, workdir)

  def __init__(self, config: ml_collections.ConfigDict, *, text_encoder=None):
    super().__init__(config)
    o = self.opts
    if o["encoder"] not in llm.ENCODERS:
      raise ConfigError(f"model.encoder={o['encoder']!r}; expected one of "
                        f"{sorted(llm.ENCODERS)}")
    if o["candidates"] not in ("dataset", "description"):
      raise ConfigError(f"model.candidates={o['candidates']!r}; expected 'dataset' or "
                        "'description'")
    from fssjax.methods.base import compute_dtype  # pylint: disable=import-outside-toplevel
    dec = m2f.Mask2FormerConfig(
        feature_size=int(o["feature_size"]), mask_feature_size=int(o["mask_feature_size"]),
        hidden_dim=int(o["hidden_dim"]), encoder_feedforward_dim=int(o["encoder_feedforward_dim"]),
        encoder_layers=int(o["encoder_layers"]), decoder_layers=int(o["decoder_layers"]),
        num_attention_heads=int(o["num_heads"]), dim_feedforward=int(o["dim_feedforward"]),
        num_queries=int(o["num_queries"]))
    self._text_encoder = text_encoder
    self._text: Optional[TextCache] = None
    self.net_config = llm.LLMFormerConfig(
        decoder=dec, encoder=str(o["encoder"]), prior_dim=self.text_dim,
        text_dim=self.text_dim, semantic_attention=bool(o["semantic_attention"]),
        scaled_visual_attention=bool(o["scaled_visual_attention"]),
        relation_attention=bool(o["relation_attention"]),
        hard_scale_selection=bool(o["hard_scale_selection"]), dtype=compute_dtype(self.config))
    self.module = llm.LLMFormerModel(self.net_config)

  # -- text ---------------------------------------------------------------------------------

  @property
  def text_dim(self) -> int:
    return int(getattr(self._text_encoder, "dim", 384)) if self._text_encoder is not None \
        else 384

  @property
  def text(self) -> TextCache:
    """The class-name / prior text encoder (MiniLM unless one was given), memoised."""
    if self._text is None:
      if self._text_encoder is None:
        from fssjax.priors.text_encoder import SentenceEncoder  # pylint: disable=import-outside-toplevel
        self._text_encoder = SentenceEncoder.minilm()
      self._text = TextCache(self._text_encoder)
    return self._text

  def class_embeddings(self, class_names: Sequence[str]) -> np.ndarray:
    """[K, D] unit text embeddings of the class names (host; call at trace time)."""
    return self.text.encode([class_name_text(n) for n in class_names])

  @classmethod
  def missing_inputs(cls, config: ml_collections.ConfigDict) -> list[str]:
    model = config.get("model", {})
    out = []
    w = str(model.get("encoder_weights", "") or "")
    if w and not os.path.exists(w):
      out.append(f"model.encoder_weights={w!r}: no such file (a torchvision ResNet state "
                 "dict saved as safetensors)")
    files = model.get("priors_files", None) or {}
    for name, path in dict(files).items():
      if path and not os.path.exists(path):
        out.append(f"model.priors_files[{name!r}]={path!r}: no such file (write it with "
                   "`python -m fssjax.priors.describe_images`)")
    return out

  # -- variables ----------------------------------------------------------------------------

  def _example(self, batch) -> tuple[jax.Array, llm.Priors]:
    image = jnp.asarray(batch["image"], jnp.float32)
    o = self.opts
    if llm.PRIOR_KEYS[0] in batch:
      priors = llm.priors_from_batch(batch, self.text_dim)
    else:
      priors = llm.Priors.empty(image.shape[0], self.text_dim, o["max_objects"],
                                o["max_attributes"], o["max_relations"])
    return image, priors

  def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> dict:
    image, priors = self._example(batch)
    text = jnp.zeros((2, self.text_dim), jnp.float32)
    return dict(self.module.init(rng, image, text, priors))

  def load_pretrained(self, params, frozen):
    w = str(self.opts["encoder_weights"] or "")
    if not w:
      return params, frozen
    from fssjax.methods.base import leaf_paths, replace_leaves  # pylint: disable=import-outside-toplevel
    from fssjax.weights import torchvision as tv  # pylint: disable=import-outside-toplevel
    sd = tv.read_state_dict(w, allow_pickle=bool(self.opts["allow_pickle_weights"]))
    values = []
    tree = {}
    for path in list(leaf_paths(params or {})) + list(leaf_paths(frozen)):
      parts = path.split("/")
      if len(parts) > 2 and parts[1] == "encoder":
        tree[path] = parts
    for path, parts in tree.items():
      key = tv.torch_key(parts[0], tuple(parts[2:]))
      if key not in sd:
        raise ValueError(f"{w}: no tensor {key!r} for the encoder leaf {path}")
      leaf = parts[-1]
      values.append((path, functools.partial(
          lambda k, lf: tv._to_flax(lf, np.asarray(sd[k], np.float32)), key, leaf)))  # pylint: disable=protected-access
    return replace_leaves(params, frozen, values)

  # -- forward ------------------------------------------------------------------------------

  def forward(self, params, frozen, image, text_embeddings, priors: Optional[llm.Priors]):
    from fssjax.methods.base import merge  # pylint: disable=import-outside-toplevel
    return self.module.apply(merge(params, frozen), image, text_embeddings, priors)

  def loss(self, params, frozen, batch, rng):
    """Mask2Former's set loss on every decoder output (auxiliary losses), summed.

    batch: image [B, S, S, 3], target_classes int32 [B, T] (index into the batch's
    `class_embeddings` [K, D], -1 padding), target_masks [B, T, S, S], prior_* keys.
    """
    o = self.opts
    image, priors = self._example(batch)
    out = self.forward(params, frozen, image, batch["class_embeddings"], priors)
    total, metrics = 0.0, {}
    n_layers = len(out["class_logits"])
    for l in range(n_layers):
      losses = matching.set_criterion(
          jax.random.fold_in(rng, l), out["class_logits"][l], out["mask_logits"][l],
          batch["target_classes"], batch["target_masks"], num_points=int(o["num_points"]),
          class_weight=float(o["class_weight"]), mask_weight=float(o["mask_weight"]),
          dice_weight=float(o["dice_weight"]), no_object_weight=float(o["no_object_weight"]))
      total = total + losses["loss"]
      if l == n_layers - 1:
        metrics = {k: v for k, v in losses.items() if k.startswith("loss_")}
    metrics["loss"] = total
    return total, metrics

  def dense_logits(self, params, frozen, image, text_embeddings, priors=None) -> jax.Array:
    """[B, H/4, W/4, K] semantic scores (`semantic_inference` of the last layer)."""
    out = self.forward(params, frozen, image, text_embeddings, priors)
    return m2f.semantic_inference(out["class_logits"][-1], out["mask_logits"][-1])

  def predict_dense(self, params, frozen, batch, class_names):
    """The dense evaluator's interface (`fssjax.evaluators.DenseMethod`): logits
    [B, H/4, W/4, K]; priors from the batch's `prior_*` keys, none when absent."""
    text = jnp.asarray(self.class_embeddings(class_names))
    priors = (llm.priors_from_batch(batch, self.text_dim) if llm.PRIOR_KEYS[0] in batch
              else None)
    return self.dense_logits(params, frozen, batch["image"], text, priors)

  def predict(self, params, frozen, batch):
    raise TypeError("LLMFormer is a semantic segmentation method: it has no few-shot "
                    "`predict`; evaluate it with a 'dense' evaluator (predict_dense) or "
                    "fssjax.methods.llmformer.evaluate_dense")


METHOD = LLMFormer


# ------------------------------------------------------------------------------------------
# Data.


def palette(n: int = 256) -> np.ndarray:
  """The fixed label-map palette: PASCAL VOC's bit-interleaved colour map (uint8 [n, 3]);
  the ignore label is drawn black, index 0 too (VOC's background)."""
  out = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    out[i] = (r, g, b)
  return out


def colorize(label: np.ndarray, ignore: int = 255) -> np.ndarray:
  """Label map [H, W] -> uint8 [H, W, 3] in the fixed palette (ignore = white)."""
  pal = palette(256)
  label = np.asarray(label)
  out = pal[np.where(label == ignore, 0, (label + 1) % 256)]
  out[label == ignore] = 255
  return out


class DenseBatches:
  """Random training batches of a dense source (host numpy): whole images resized to S x S
  (bilinear; labels nearest), mask-classification targets and the images' priors.

  Args:
    source: a `DenseSource`. bank: its `PriorBank`. image_size: S (a multiple of 32).
    batch_size, max_targets, seed, normalization.
  """

  def __init__(self, source, bank: PriorBank, *, image_size: int, batch_size: int,
               max_targets: int, seed: int, normalization: str = "imagenet"):
    from fssjax.data import dense  # pylint: disable=import-outside-toplevel
    self._dense = dense
    self.source, self.bank = source, bank
    self.size, self.batch_size, self.max_targets = int(image_size), int(batch_size), int(max_targets)
    self.normalization = normalization
    self.rng = np.random.default_rng(seed)
    self.ignore = int(getattr(source, "ignore_label", 255))

  def example(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image, label = self.source.load(int(index))
    s = self.size
    if image.shape[:2] != (s, s):
      image = transforms.resize_image(image, s, s)
      label = transforms.resize_nearest(np.asarray(label), s, s)
    x = transforms.normalize(np.asarray(image), self.normalization)
    classes, masks = self._dense.semantic_targets(label, self.ignore, self.max_targets)
    return x, classes, masks

  def __iter__(self):
    while True:
      idx = self.rng.integers(0, len(self.source), self.batch_size)
      xs, cs, ms = zip(*(self.example(i) for i in idx))
      batch = dict(image=np.stack(xs), target_classes=np.stack(cs), target_masks=np.stack(ms))
      batch.update(self.bank.batch(idx))
      yield batch


# ------------------------------------------------------------------------------------------
# Evaluation.


def _pad32(x: np.ndarray) -> np.ndarray:
  h, w = x.shape[:2]
  ph, pw = (-h) % 32, (-w) % 32
  return np.pad(x, ((0, ph), (0, pw), (0, 0))) if ph or pw else x


def description_candidates(priors) -> list[str]:
  """Candidate names of one image from its parsed description: each object's phrase without
  size / twin words (attributes + name), in order, duplicates dropped."""
  size_words = {"tiny", "small", "medium", "large", "left", "right", "upper", "lower",
                "middle"}
  out = []
  if priors is None:
    return out
  for o in priors.objects:
    words = [a for a in o.attributes if a not in size_words] + [o.name]
    phrase = " ".join(words)
    if phrase not in out:
      out.append(phrase)
  return out


def evaluate_dense(method: LLMFormer, params, frozen, source, *, bank: Optional[PriorBank],
                   image_size: int = 640, max_size: int = 2560, class_names=None,
                   candidates: str = "dataset", priors: Optional[Sequence[Any]] = None,
                   use_priors: bool = True, max_images: int = 0, batch_size: int = 8,
                   examples: int = 0) -> dict:
  """Scores `method` on a dense source with the open-vocabulary protocol (module docstring).

  Args:
    source: a `DenseSource`; bank: its `PriorBank` (None or use_priors=False: no priors).
    image_size: the shorter side (640 published); max_size: its cap on the longer side.
    class_names: the candidate names (default: the source's).
    candidates: 'dataset' or 'description' (needs `priors`: the `ScenePriors` per image).
    examples: > 0: also return that many (image uint8, truth, prediction) triples.

  Returns:
    the `DenseAccumulator` result (miou, per_class_iou, ...) plus class_names {i: name},
    n_images, protocol, wall_time_s and 'examples'.
  """
  from fssjax import metrics  # pylint: disable=import-outside-toplevel
  from fssjax.data import dense  # pylint: disable=import-outside-toplevel
  names = tuple(class_names or source.class_names)
  k = len(names)
  ignore = int(getattr(source, "ignore_label", 255))
  acc = metrics.DenseAccumulator(k, ignore=ignore)
  text = jnp.asarray(method.class_embeddings(names))
  name_emb = np.asarray(text)
  n = len(source) if not max_images else min(len(source), int(max_images))
  start = time.perf_counter()

  @jax.jit
  def run(params, frozen, image, text, prior_batch):
    pri = llm.Priors(*(prior_batch[key] for key in llm.PRIOR_KEYS)) if prior_batch else None
    return method.dense_logits(params, frozen, image, text, pri)

  shown = []
  i = 0
  while i < n:
    group, shape = [], None
    while i < n and len(group) < batch_size:
      image, label = source.load(i)
      small = dense.resize_for_eval(np.asarray(image), image_size, max_size)
      x = _pad32(transforms.normalize(small, method.normalization))
      if shape is not None and x.shape != shape:
        break
      shape = x.shape
      group.append((i, image, label, small.shape[:2], x))
      i += 1
    idx = [g[0] for g in group]
    pb = bank.batch(idx) if (bank is not None and use_priors) else {}
    if candidates == "description":
      for j, (index, image, label, (h, w), x) in enumerate(group):
        cands = description_candidates(priors[index] if priors is not None else None)
        if not cands:
          pred = np.zeros(label.shape, np.int64)  # nothing named: class 0 everywhere
        else:
          cemb = method.text.encode(cands)
          logits = run(params, frozen, x[None], jnp.asarray(cemb),
                       {kk: v[j:j + 1] for kk, v in pb.items()})
          hh, ww = -(-h // 4), -(-w // 4)
          lab = np.asarray(dense.predict_label_map(logits[0, :hh, :ww], *label.shape))
          to_class = np.argmax(cemb @ name_emb.T, -1)
          pred = to_class[lab]
        acc.update(pred, label)
        if len(shown) < examples:
          shown.append((np.asarray(image), np.asarray(label), pred))
      continue
    logits = run(params, frozen, np.stack([g[4] for g in group]), text, pb)
    for j, (index, image, label, (h, w), _) in enumerate(group):
      hh, ww = -(-h // 4), -(-w // 4)
      pred = dense.predict_label_map(logits[j, :hh, :ww], *label.shape)
      acc.update(pred, label)
      if len(shown) < examples:
        shown.append((np.asarray(image), np.asarray(label), pred))
  res = acc.result()
  res.update(class_names=dict(enumerate(names)), n_images=n, evaluator="dense",
             wall_time_s=time.perf_counter() - start, examples=shown,
             protocol=dict(short_side=image_size, max_size=max_size, candidates=candidates,
                           priors=bool(bank is not None and use_priors),
                           source=getattr(source, "name", "")))
  return res


def example_picture(examples, ignore: int = 255) -> np.ndarray:
  """Rows of [image | truth | prediction] (fixed palette) as one uint8 [H, W, 3] picture."""
  rows = []
  for image, truth, pred in examples:
    rows.append(np.concatenate([image, colorize(truth, ignore), colorize(pred, ignore)], 1))
  return np.concatenate(rows, 0) if rows else np.zeros((8, 8, 3), np.uint8)


# ------------------------------------------------------------------------------------------
# Training.


def make_optimizer(config):
  o = config.optimizer
  steps = int(config.train.num_steps)
  warm = int(o.get("warmup_steps", 0))
  sched = optax.warmup_cosine_decay_schedule(0.0, float(o.lr), max(warm, 1), max(steps, warm + 1))
  chain = []
  if float(o.get("clip_norm", 0.0) or 0.0) > 0:
    chain.append(optax.clip_by_global_norm(float(o.clip_norm)))
  chain.append(optax.adamw(sched, weight_decay=float(o.get("weight_decay", 0.0))))
  return optax.chain(*chain)


def make_train_step(method: LLMFormer, tx):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, frozen, batch, rng):
    (loss, metrics), grads = jax.value_and_grad(method.loss, has_aux=True)(
        params, frozen, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return params, opt_state, metrics
  return step


def _source(data) -> Any:
  from fssjax import evaluators  # pylint: disable=import-outside-toplevel
  return evaluators.dense_source(data)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains LLMFormer on `config.data` (a dense data block, `data.train`) and scores the dense
  `config.evals`, for each variant of `config.variants` (model overrides; one run per
  variant in `workdir/<variant>`). Writes TensorBoard scalars, the example pictures (image |
  truth | prediction in the fixed palette) and `results.json`; returns the results.

  Raises:
    MissingInputsError: files named by the config that do not exist (checked first).
  """
  from fssjax import monitoring  # pylint: disable=import-outside-toplevel
  from fssjax.checks import MissingInputsError  # pylint: disable=import-outside-toplevel
  from fssjax.methods import base  # pylint: disable=import-outside-toplevel
  missing = missing_inputs(config)
  if missing:
    raise MissingInputsError("\n".join(missing))
  os.makedirs(workdir, exist_ok=True)
  variants = dict(config.get("variants", None) or {"default": {}})
  train_data = config.data.train
  src = _source(train_data)
  evals = {name: _source(e.data) for name, e in config.evals.items()}
  t0 = time.perf_counter()
  all_results = {}
  text = None
  banks = {}
  for vname, overrides in variants.items():
    cfg = ml_collections.ConfigDict(config.to_dict())
    for key, value in dict(overrides).items():
      cfg.model[key] = value
    method = LLMFormer(cfg, text_encoder=text.encoder if text else None)
    if text is not None:
      method._text = text  # pylint: disable=protected-access
    text = method.text
    o = method.opts
    pf = dict(o["priors_files"] or {})
    if "train" not in banks:
      print(f"[llmformer] embedding priors of {len(src)} training images", flush=True)
      banks["train"] = PriorBank.build(source_priors(src, pf.get("train", "")), text,
                                       max_objects=o["max_objects"],
                                       max_attributes=o["max_attributes"],
                                       max_relations=o["max_relations"])
      for name, es in evals.items():
        plist = source_priors(es, pf.get(name, ""))
        banks[name] = (PriorBank.build(plist, text, max_objects=o["max_objects"],
                                       max_attributes=o["max_attributes"],
                                       max_relations=o["max_relations"]), plist)
    vdir = os.path.join(workdir, vname)
    writer = monitoring.create_writer(vdir)
    train_names = tuple(src.class_names)
    class_emb = method.class_embeddings(train_names)
    it = iter(DenseBatches(src, banks["train"], image_size=int(cfg.data.image_size),
                           batch_size=int(cfg.train.batch_size),
                           max_targets=int(o["max_targets"]), seed=int(cfg.seed)))
    first = next(it)
    first["class_embeddings"] = class_emb
    init_key, train_key = jax.random.split(jax.random.PRNGKey(int(cfg.seed)))
    params, frozen = base.initialize(method, init_key,
                                     {k: v[:1] for k, v in first.items() if k != "class_embeddings"})
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"[llmformer:{vname}] {n_params:,} trainable parameters; attentions: semantic="
          f"{o['semantic_attention']} scaled_visual={o['scaled_visual_attention']} relation="
          f"{o['relation_attention']}", flush=True)
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    step_fn = make_train_step(method, tx)
    steps = int(cfg.train.num_steps)
    log_every = int(cfg.train.log_every)
    tv = time.perf_counter()
    batch = first
    for s in range(steps):
      if s:
        batch = next(it)
        batch["class_embeddings"] = class_emb
      params, opt_state, m = step_fn(params, opt_state, frozen, batch,
                                     jax.random.fold_in(train_key, s))
      if (s + 1) % log_every == 0 or s + 1 == steps:
        m = {k: float(v) for k, v in m.items()}
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"[llmformer:{vname}] non-finite loss at step {s + 1}")
        writer.write_scalars(s + 1, {f"train/{k}": v for k, v in m.items()})
        rate = (s + 1) / (time.perf_counter() - tv)
        print(f"[llmformer:{vname}] step {s + 1}/{steps} loss {m['loss']:.3f} (ce "
              f"{m['loss_cross_entropy']:.3f} mask {m['loss_mask']:.3f} dice "
              f"{m['loss_dice']:.3f}) {rate:.2f} steps/s", flush=True)
    results = {}
    for name, e in config.evals.items():
      bank, plist = banks[name]
      r = evaluate_dense(method, params, frozen, evals[name], bank=bank,
                         image_size=int(e.data.get("image_size", 640)),
                         candidates=str(e.get("candidates", "dataset")), priors=plist,
                         max_images=int(e.data.get("max_images", 0) or 0),
                         batch_size=int(config.eval.batch_size), examples=4)
      pic = example_picture(r.pop("examples"), int(getattr(evals[name], "ignore_label", 255)))
      writer.write_images(steps, {f"{name}/image_truth_prediction": pic[None]})
      monitoring.write_eval(writer, steps, dict(r, evaluator="dense"), prefix=name)
      print(f"[llmformer:{vname}] {name}: mIoU {r['miou']:.2f} ({r['n_images']} images, "
            f"{len(evals[name].class_names)} candidate names)", flush=True)
      results[name] = {k: v for k, v in r.items() if k != "confusion_matrix"}
    writer.flush()
    writer.close()
    all_results[vname] = results
  out = dict(results=monitoring.jsonable(all_results), wall_time_s=time.perf_counter() - t0)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
  return out


def missing_inputs(config) -> list[str]:
  """Every input file or data root the config names that does not exist (one line each),
  checked before anything runs."""
  out = list(LLMFormer.missing_inputs(config))
  blocks = [("data.train", config.data.train)] + [(f"evals.{k}.data", e.data)
                                                  for k, e in config.evals.items()]
  for key, data in blocks:
    ds = str(data.get("dataset", ""))
    if ds == "synthetic_dense":
      continue
    root = str(data.get("root", "") or "")
    from fssjax.data import dense  # pylint: disable=import-outside-toplevel
    try:
      dense.resolve_root(ds, root)
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).split("\n")[0]
      out.append(f"{key}: {ds} data not found ({first})")
  return out


def main(argv=None) -> int:
  """`python -m fssjax.methods.llmformer --config=FILE[:args] --workdir=DIR`."""
  import argparse  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  a = p.parse_args(argv)
  path, _, arg = a.config.partition(":")
  spec = importlib.util.spec_from_file_location("llmformer_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(arg or None)
  from fssjax.checks import MissingInputsError  # pylint: disable=import-outside-toplevel
  try:
    out = train_and_evaluate(config, a.workdir)
  except MissingInputsError as e:
    raise SystemExit(f"llmformer: missing inputs:\n{e}\nPoint the config at them (see the "
                     f"docstring of {path}) or run the offline demo, which needs nothing "
                     f"downloaded:\n  python -m fssjax.methods.llmformer --config={path}:demo "
                     f"--workdir=runs/llmformer_demo") from None
  print(json.dumps({v: {k: round(r["miou"], 2) for k, r in res.items()}
                    for v, res in out["results"].items()}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
