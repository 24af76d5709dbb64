"""LLMFormer (Shi, Dao, Cai, "LLMFormer: Large Language Model for Open-Vocabulary Semantic
Segmentation", IJCV 2024) as an fssjax method: open-vocabulary semantic segmentation with
priors parsed from an image description. No code was released; the network and the choices
made where the paper is silent are in `fssjax.nn.llmformer`; here are the inputs, the loss and
the prediction. Training and evaluation are the generic ones (`fssjax.train` with the dense
training stream, `fssjax.evaluators.DenseEvaluator`).

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

Training (`fssjax.train`, `train_data = 'dense'`: `fssjax.data.pipeline.dense_train_loader`
over the dense data block `config.data.train`, with orbax checkpoints and exact resume):
whole images resized to `data.image_size` squared (ours; the published recipe of Mask2Former
crops large-scale-jittered 640 crops), with what `dense_inputs` declares: the priors, the
training class names' embeddings and one binary mask per class present (`mask_targets`,
`fssjax.data.dense.semantic_targets`), Hungarian matching and the Mask2Former losses
(`fssjax.nn.matching.set_criterion`: class 2, mask BCE 5, Dice 5 on `model.num_points`
uncertain points, no-object weight 0.1) on the output of every decoder layer (auxiliary
losses, summed), the optimiser of `fssjax.optim` (AdamW).

Evaluation (`fssjax.evaluators.DenseEvaluator`, the published open-vocabulary protocol):
whole image, shorter side resized to the evaluator's `data.image_size` (640 by default;
`fssjax.data.dense.resize_for_eval`), padded to a multiple of 32 (bottom / right, zeros
after normalisation; never scored), Mask2Former's `semantic_inference`, scores upsampled to
the padded input, cropped and resized back to the label's size (bilinear, half-pixel) and the
argmax scored by `fssjax.metrics.DenseAccumulator` (detectron2's mIoU); each image's priors
reach `predict_dense` as the batch's `prior_*` rows (`dense_inputs`).
`candidates='dataset'`: the evaluated set's class names;
`candidates='description'`: no list is given, each image's candidates are its parsed objects
(object phrase without the size word: attributes + name, e.g. "red dotted circle"), and each
candidate's predicted pixels are scored as the data set class whose name embedding is nearest
to the candidate's (cosine) -- the names come from the image's description only (the
evaluator's `candidates='description'`). `evaluate_dense` runs that evaluator on a source
with prebuilt priors (tests, notebooks).

Entry point: `python -m fssjax.main --config=configs/llmformer_cocostuff.py:demo
--workdir=runs/llmformer_demo` (`config.variants`: one run per variant in WORKDIR/<name>);
`python -m fssjax.methods.llmformer` with the same flags is an alias.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fssjax import evaluators as evaluators_lib
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
      # Called at trace time too (predict_dense under jit): a JAX encoder then runs eagerly.
      with jax.ensure_compile_time_eval():
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
  train_data = "dense"  # fssjax.train feeds `loss` whole images of config.data.train
  evaluation_keys = ("candidates",)  # model keys that only change evaluation

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
      if self._text_encoder is None:  # MiniLM, loaded once per process (variants share it)
        if "minilm" not in _DEFAULT_TEXT:
          from fssjax.priors.text_encoder import SentenceEncoder  # pylint: disable=import-outside-toplevel
          _DEFAULT_TEXT["minilm"] = TextCache(SentenceEncoder.minilm())
        self._text = _DEFAULT_TEXT["minilm"]
        self._text_encoder = self._text.encoder
      else:
        self._text = TextCache(self._text_encoder)
    return self._text

  def class_embeddings(self, class_names: Sequence[str]) -> np.ndarray:
    """[K, D] unit text embeddings of the class names (host; call at trace time)."""
    return self.text.encode([class_name_text(n) for n in class_names])

  def dense_inputs(self, source, split: str):
    """`fssjax.methods.base.DenseInputs` of a dense source: the prior embeddings of each
    image ('prior_*', `PriorBank`; from `model.priors_files[key]`, key 'train' for training,
    else the source's data set name such as 'ade20k_150', else the source's exact priors,
    else none), each image's description candidates (`description_candidates`); for training
    also the class-name embeddings of the source ('class_embeddings' [K, D]) and the
    mask-classification targets (`fssjax.data.dense.semantic_targets`, `model.max_targets`).
    Built once per (source, priors file, sizes, text encoder) in a process."""
    from fssjax.methods.base import DenseInputs  # pylint: disable=import-outside-toplevel
    o = self.opts
    files = dict(o["priors_files"] or {})
    name = str(getattr(source, "name", ""))
    bench = str(getattr(source, "benchmark", "") or name.split("-")[0])
    pfile = files.get("train", "") if split == "train" else (
        files.get(bench, "") or files.get(name, ""))
    key = (name, len(source), pfile, int(o["max_objects"]), int(o["max_attributes"]),
           int(o["max_relations"]), id(self.text))
    if key not in _BANKS:
      plist = source_priors(source, pfile)
      if any(p is not None for p in plist):
        print(f"[llmformer] embedding the priors of {len(plist)} images of {name}",
              flush=True)
      bank = PriorBank.build(plist, self.text, max_objects=int(o["max_objects"]),
                             max_attributes=int(o["max_attributes"]),
                             max_relations=int(o["max_relations"]))
      _BANKS[key] = (bank, [tuple(description_candidates(p)) for p in plist])
    bank, cands = _BANKS[key]
    per_image = {f"prior_{k}": bank.arrays[k] for k in llm.Priors._fields}
    if split != "train":
      return DenseInputs(per_image=per_image, candidates=cands)
    return DenseInputs(
        per_image=per_image,
        shared={"class_embeddings": self.class_embeddings(tuple(source.class_names))},
        targets=functools.partial(mask_targets, max_targets=int(o["max_targets"])),
        candidates=cands)

  @classmethod
  def missing_inputs(cls, config: ml_collections.ConfigDict) -> list[str]:
    """Missing weights, priors files and dense data roots (data.train, evals.*.data)."""
    model = config.get("model", {})
    out = []
    w = str(model.get("encoder_weights", "") or "")
    encoder = str(model.get("encoder", "") or "")
    if not w and encoder.startswith("resnet") and encoder != "resnet_tiny":
      out.append(f"model.encoder_weights is empty: the {encoder} encoder starts from ImageNet "
                 "weights as every published Mask2Former / FC-CLIP recipe does (a torchvision "
                 "ResNet state dict saved as safetensors; `weights=` in the config's argument)")
    if w and not os.path.exists(w):
      out.append(f"model.encoder_weights={w!r}: no such file (a torchvision ResNet state "
                 "dict saved as safetensors)")
    files = model.get("priors_files", None) or {}
    for name, path in dict(files).items():
      if path and not os.path.exists(path):
        out.append(f"model.priors_files[{name!r}]={path!r}: no such file (write it with "
                   "`python -m fssjax.priors.describe_images`)")
    return out  # dense data roots: `fssjax.checks.preflight` checks them for every method

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
    `class_embeddings` [K, D], or [B, K, D] one list per example; -1 padding),
    target_masks [B, T, S, S], prior_* keys.
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
    [B, H/4, W/4, K]; priors from the batch's `prior_*` keys, none when absent; the class
    names' text from the batch's `class_embeddings` [B, K, D] when present (one candidate
    list per image), else `class_names` embedded."""
    text = (jnp.asarray(batch["class_embeddings"], jnp.float32) if "class_embeddings" in batch
            else jnp.asarray(self.class_embeddings(class_names)))
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


def mask_targets(label: np.ndarray, ignore_label: int, *, max_targets: int
                 ) -> dict[str, np.ndarray]:
  """The training targets of one label map (run in the data workers): {'target_classes'
  int32 [T], 'target_masks' float32 [T, S, S]} (`fssjax.data.dense.semantic_targets`)."""
  from fssjax.data import dense  # pylint: disable=import-outside-toplevel
  classes, masks = dense.semantic_targets(label, ignore_label, max_targets)
  return {"target_classes": classes, "target_masks": masks}


# The fixed palette and pictures live with the dense evaluator (kept here for old imports).
palette = evaluators_lib.palette
colorize = evaluators_lib.colorize
example_picture = evaluators_lib.example_picture


# ------------------------------------------------------------------------------------------
# Evaluation.


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


def evaluate_dense(method: LLMFormer, params, frozen, source, *,
                   bank: Optional[PriorBank] = None, image_size: int = 640,
                   max_size: int = 2560, candidates: str = "dataset",
                   priors: Optional[Sequence[Any]] = None, batch_size: int = 8,
                   examples: int = 0) -> dict:
  """Scores `method` on a dense source with `fssjax.evaluators.DenseEvaluator` (the
  open-vocabulary protocol), with prebuilt priors: for tests and notebooks (runs use
  `fssjax.main`, whose evaluators build the priors through `LLMFormer.dense_inputs`).

  Args:
    source: a `DenseSource`; bank: its `PriorBank` (None: no priors).
    image_size: the shorter side (640 published); max_size: its cap on the longer side.
    candidates: 'dataset' or 'description' (needs `priors`: the `ScenePriors` per image).
    examples: > 0: also return that many (image uint8, truth, prediction) triples.

  Returns:
    the dense evaluator's results plus 'examples'.
  """
  from fssjax.methods.base import DenseInputs  # pylint: disable=import-outside-toplevel
  per_image = ({f"prior_{k}": bank.arrays[k] for k in llm.Priors._fields}
               if bank is not None else {})
  cands = ([tuple(description_candidates(p)) for p in priors] if priors is not None
           else None)
  ev = evaluators_lib.DenseEvaluator(
      "dense", ml_collections.ConfigDict(dict(image_size=image_size, max_size=max_size)),
      every=0, prefix="dense", batch_size=batch_size, source=source, candidates=candidates,
      num_summary=examples, inputs=DenseInputs(per_image=per_image, candidates=cands))
  res = ev.run(method, params, frozen)
  res["examples"] = ev.last_examples
  return res


# ------------------------------------------------------------------------------------------
# Training helpers (runs train through `fssjax.train`; `python -m fssjax.main`).


def make_train_step(method: LLMFormer, tx):
  """A jitted `(params, opt_state, frozen, batch, rng) -> (params, opt_state, metrics)` with
  the optax transform `tx`: for tests and notebooks."""
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, frozen, batch, rng):
    (loss, metrics), grads = jax.value_and_grad(method.loss, has_aux=True)(
        params, frozen, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return params, opt_state, metrics
  return step


def missing_inputs(config) -> list[str]:
  """Every input file or data root the config names that does not exist (one line each)."""
  return LLMFormer.missing_inputs(config)


def main(argv=None) -> int:
  """`python -m fssjax.methods.llmformer --config=FILE[:args] --workdir=DIR`: the same run as
  `python -m fssjax.main` (the generic trainer; `config.variants` each in WORKDIR/<name>)."""
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
  from fssjax import main as main_lib  # pylint: disable=import-outside-toplevel
  from fssjax.checks import MissingInputsError  # pylint: disable=import-outside-toplevel
  try:
    main_lib.run_config(config, a.workdir)
  except MissingInputsError as e:
    raise SystemExit(f"llmformer: missing inputs:\n{e}\nPoint the config at them (see the "
                     f"docstring of {path}) or run the offline demo, which needs nothing "
                     f"downloaded:\n  python -m fssjax.main --config={path}:demo "
                     f"--workdir=runs/llmformer_demo") from None
  return 0


_DEFAULT_TEXT: dict = {}  # the shared MiniLM TextCache
_BANKS: dict = {}  # dense_inputs' prior banks, per source / priors file / sizes / encoder


if __name__ == "__main__":
  raise SystemExit(main())
