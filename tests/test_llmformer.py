"""LLMFormer (fssjax.nn.llmformer, fssjax.methods.llmformer): training, the three attention
switches, open-vocabulary classification, dense prediction at the label size.

Tiny shapes and a deterministic bag-of-words text encoder (each word a fixed random vector,
a text = the normalised sum of its words: compositional like a sentence encoder, no download).
"""

import hashlib
import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fssjax import configlib
from fssjax.data import dense
from fssjax.evaluators import InMemoryDenseSource
from fssjax.methods import llmformer as L
from fssjax.methods.base import partition
from fssjax.nn import llmformer as nl
from fssjax.nn import mask2former as m2f
from fssjax.priors.scene_graph import Relation, SceneObject, ScenePriors

D = 16


class WordsEncoder:
  """Bag-of-words text embeddings (unit vectors), deterministic."""

  dim = D

  def encode(self, texts):
    out = np.zeros((len(texts), D), np.float32)
    for i, t in enumerate(texts):
      for w in t.split():
        seed = int(hashlib.md5(w.encode()).hexdigest()[:8], 16)
        out[i] += np.random.default_rng(seed).standard_normal(D)
      out[i] /= np.linalg.norm(out[i]) + 1e-6
    return out


def _config(**attn):
  c = configlib.base_config()
  c.method = "llmformer"
  c.model = ml_collections.ConfigDict(dict(
      encoder="resnet_tiny", hidden_dim=16, feature_size=32, mask_feature_size=16,
      num_queries=6, decoder_layers=2, encoder_layers=1, num_heads=2, dim_feedforward=32,
      encoder_feedforward_dim=32, max_objects=3, max_attributes=6, max_relations=4,
      max_targets=3, num_points=64, **attn))
  return c


def _random_priors(rng, b=1, n=3, a=6, r=4):
  return nl.Priors(
      objects=jnp.asarray(rng.standard_normal((b, n, D)), jnp.float32),
      object_valid=jnp.ones((b, n), bool),
      attributes=jnp.asarray(rng.standard_normal((b, a, D)), jnp.float32),
      attribute_owner=jnp.asarray(rng.integers(0, n, (b, a)), jnp.int32),
      attribute_valid=jnp.ones((b, a), bool),
      relations=jnp.asarray(rng.standard_normal((b, r, D)), jnp.float32),
      relation_pairs=jnp.asarray(rng.integers(0, n, (b, r, 2)), jnp.int32),
      relation_valid=jnp.ones((b, r), bool))


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  """Tiny shapes: XLA's optimisation passes cost more than they save here."""
  before = bool(jax.config.values.get("jax_disable_most_optimizations", False))
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def trained(fast_compile):  # pylint: disable=redefined-outer-name,unused-argument
  """A tiny LLMFormer (all attentions) trained 25 steps on one image; the loss history.
  Only the transformer decoder and the classifier are trained (the backward pass through the
  encoder and the deformable pixel decoder would triple the compile time; the demo trains
  everything)."""
  c = _config()
  c.model.trainable = ("params/transformer_module/.*", "params/classifier/.*")
  method = L.LLMFormer(c, text_encoder=WordsEncoder())
  rng = np.random.default_rng(0)
  s = 32
  label = np.zeros((s, s), np.int64)
  label[:, 16:] = 1
  label[8:20, 4:12] = 2
  image = np.zeros((s, s, 3), np.float32)
  image[label == 1] = (1.0, -1.0, 0.5)
  image[label == 2] = (-1.0, 1.0, -0.5)
  image += 0.1 * rng.standard_normal(image.shape).astype(np.float32)
  classes, masks = dense.semantic_targets(label, 255, 3)
  batch = dict(image=image[None], target_classes=classes[None], target_masks=masks[None])
  for k, v in zip(nl.PRIOR_KEYS, _random_priors(rng)):
    batch[k] = np.asarray(v)
  params, frozen = partition(jax.jit(method.init)(jax.random.PRNGKey(0), batch),
                             method.trainable_patterns())
  batch["class_embeddings"] = method.class_embeddings(["solid square", "dotted star",
                                                       "striped circle"])
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  step = L.make_train_step(method, tx)
  losses = []
  for i in range(25):
    params, opt, m = step(params, opt, frozen, batch, jax.random.PRNGKey(i))
    losses.append(float(m["loss"]))
  return method, params, frozen, losses


def test_loss_falls_on_a_tiny_batch(trained):
  _, _, _, losses = trained
  assert all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.65 * losses[0], " ".join(f"{x:.1f}" for x in losses)


def test_predict_dense_returns_label_size_maps(trained):
  method, params, frozen, _ = trained
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 255, (40, 52, 3), np.uint8), rng.integers(0, 255, (37, 45, 3),
                                                                      np.uint8)]
  labels = [rng.integers(0, 3, im.shape[:2]).astype(np.int32) for im in images]
  src = InMemoryDenseSource(images, labels, ["a", "b", "new name"])
  res = L.evaluate_dense(method, params, frozen, src, bank=None, image_size=32, examples=2)
  assert res["n_images"] == 2
  for (im, lab, pred), label in zip(res["examples"], labels):
    assert pred.shape == label.shape and pred.min() >= 0 and pred.max() < 3
  # The generic dense evaluator's interface: logits at a quarter of the input.
  out = jax.eval_shape(lambda p, f, b: method.predict_dense(p, f, b, ("a", "b", "new name")),
                       params, frozen, {"image": np.zeros((1, 32, 64, 3), np.float32)})
  assert out.shape == (1, 8, 16, 3)


_APPLY = {}
ALL_ON = dict(semantic_attention=True, scaled_visual_attention=True, relation_attention=True)


def _module(attn):
  cfg = nl.LLMFormerConfig(
      decoder=m2f.Mask2FormerConfig(feature_size=16, mask_feature_size=16, hidden_dim=16,
                                    decoder_layers=2, num_attention_heads=2,
                                    dim_feedforward=32, num_queries=5),
      prior_dim=D, text_dim=D, **attn)
  return nl.LLMFormerTransformerModule(cfg, 16)


def _decoder_outputs(attn: dict, priors):
  """(params, outputs, (features, mask_features)) of a tiny `LLMFormerTransformerModule`
  with the attentions `attn`. One set of parameters (initialised with every attention on;
  a switched-off attention's parameters are simply unused), one jitted apply per setting."""
  key = tuple(sorted(attn.items()))
  if key not in _APPLY:
    _APPLY[key] = jax.jit(_module(attn).apply)
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.standard_normal((1, s, s, 16)), jnp.float32) for s in (2, 4, 8)]
  mask_features = jnp.asarray(rng.standard_normal((1, 16, 16, 16)), jnp.float32)
  if "params" not in _APPLY:
    _APPLY["params"] = jax.jit(_module(ALL_ON).init)(jax.random.PRNGKey(1), feats,
                                                     mask_features, priors)
  params = _APPLY["params"]
  return params, _APPLY[key](params, feats, mask_features, priors), (feats, mask_features)


OFF = dict(semantic_attention=False, scaled_visual_attention=False, relation_attention=False)


def test_all_attentions_off_is_mask2former_decoder():
  priors = _random_priors(np.random.default_rng(0))
  params, out, (feats, mf) = _decoder_outputs(OFF, priors)
  ref_cfg = m2f.Mask2FormerConfig(feature_size=16, mask_feature_size=16, hidden_dim=16,
                                  decoder_layers=2, num_attention_heads=2, dim_feedforward=32,
                                  num_queries=5)
  ref = jax.jit(m2f.Mask2FormerTransformerModule(ref_cfg, 16).apply)(params, feats, mf)
  np.testing.assert_allclose(out["masks_queries_logits"][-1], ref["masks_queries_logits"][-1],
                             rtol=1e-6, atol=1e-6)
  # Nothing of the prior attentions is created when they are off.
  shapes = jax.eval_shape(_module(OFF).init, jax.random.PRNGKey(1), feats, mf, priors)
  assert set(shapes["params"]) == set(jax.eval_shape(
      m2f.Mask2FormerTransformerModule(ref_cfg, 16).init, jax.random.PRNGKey(1), feats,
      mf)["params"])


def test_query_and_level_embeddings_start_as_published():
  # N(0, 1), PyTorch's nn.Embedding default, kept by Mask2Former and transformers. Flax's
  # default (std 1 / sqrt(width) = 0.25 here) let the decoder layers collapse every query
  # onto one mask and class: the plain decoder of the demo never learned to classify.
  priors = _random_priors(np.random.default_rng(0))
  params, _, (feats, mf) = _decoder_outputs(OFF, priors)
  ref = m2f.Mask2FormerTransformerModule(m2f.Mask2FormerConfig(
      feature_size=16, mask_feature_size=16, hidden_dim=16, decoder_layers=2,
      num_attention_heads=2, dim_feedforward=32, num_queries=5), 16)
  ref_params = jax.jit(ref.init)(jax.random.PRNGKey(2), feats, mf)
  for p in (params, ref_params):
    for name in ("queries_features", "queries_embedder", "level_embed"):
      std = float(jnp.std(p["params"][name]["embedding"]))
      assert 0.7 < std < 1.3, (name, std)


def _changed(a, b):
  return float(jnp.max(jnp.abs(a["masks_queries_logits"][-1] - b["masks_queries_logits"][-1])))


def test_relation_attention_switch():
  rng = np.random.default_rng(0)
  priors = _random_priors(rng)
  other = priors._replace(relation_pairs=priors.relation_pairs[..., ::-1],
                          relations=priors.relations * -1.0)
  on = dict(OFF, relation_attention=True)
  _, a, _ = _decoder_outputs(on, priors)
  _, b, _ = _decoder_outputs(on, other)
  assert _changed(a, b) > 1e-4
  # No relation at all: zero bias.
  none = priors._replace(relation_valid=jnp.zeros_like(priors.relation_valid))
  bias, _ = jax.jit(nl.RelationAttention(16, 2).init_with_output)(
      jax.random.PRNGKey(0), jnp.ones((1, 5, 16)), jnp.ones((1, 3, 16)), none.object_valid,
      jnp.ones((1, 4, 16)), none.relation_pairs, none.relation_valid)[0]
  assert float(jnp.abs(bias).max()) == 0.0
  # Off (the other two on, so priors are used): the graph is ignored.
  off = dict(semantic_attention=True, scaled_visual_attention=True, relation_attention=False)
  _, a, _ = _decoder_outputs(off, priors)
  _, b, _ = _decoder_outputs(off, other)
  assert _changed(a, b) == 0.0


def test_semantic_and_scaled_visual_attention_switches():
  rng = np.random.default_rng(0)
  priors = _random_priors(rng)
  new_objects = priors._replace(objects=priors.objects[:, ::-1] * 2.0)
  new_attrs = priors._replace(attributes=priors.attributes * -1.0)
  sem = dict(OFF, semantic_attention=True)
  _, a, _ = _decoder_outputs(sem, priors)
  _, b, _ = _decoder_outputs(sem, new_objects)
  assert _changed(a, b) > 1e-4
  scaled = dict(OFF, scaled_visual_attention=True)
  _, a, _ = _decoder_outputs(scaled, priors)
  _, b, _ = _decoder_outputs(scaled, new_attrs)
  assert _changed(a, b) > 1e-4
  w = a["scale_weights"][0]
  assert w.shape == (1, 5, 3)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-5)
  # Only the relation attention on: object / attribute changes reach the output only through
  # the graph's assignment, attribute embeddings not at all.
  rel = dict(OFF, relation_attention=True)
  _, a, _ = _decoder_outputs(rel, priors)
  _, b, _ = _decoder_outputs(rel, new_attrs)
  assert _changed(a, b) == 0.0


def test_open_vocabulary_classifier_scores_a_name_never_trained_on():
  shapes = ["circle", "square", "star", "triangle"]
  textures = ["dotted", "striped", "solid", "gridded"]
  names = [f"{t} {s}" for s in shapes for t in textures]
  unseen = [f"{textures[i]} {shapes[i]}" for i in range(4)]
  seen = [n for n in names if n not in unseen]
  enc = WordsEncoder()
  emb = {n: e for n, e in zip(names, enc.encode(names))}
  rng = np.random.default_rng(0)
  mix = rng.standard_normal((D, 24)).astype(np.float32)  # mask states = mix(text) + noise

  def states(ns, k):
    x = np.stack([emb[n] for n in ns for _ in range(k)]) @ mix
    return jnp.asarray(x + 0.05 * rng.standard_normal(x.shape), jnp.float32)

  head = nl.OpenVocabularyClassifier(D)
  text_seen = jnp.asarray(np.stack([emb[n] for n in seen]))
  x_train = states(seen, 8)
  y_train = jnp.repeat(jnp.arange(len(seen)), 8)
  params = head.init(jax.random.PRNGKey(0), x_train[None], text_seen)
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    def loss(p):
      logits = head.apply(p, x_train[None], text_seen)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()
    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  for _ in range(300):
    params, opt = step(params, opt)
  text_all = jnp.asarray(np.stack([emb[n] for n in names]))
  x_unseen = states(unseen, 10)[None]
  logits = head.apply(params, x_unseen, text_all)[0]
  assert logits.shape == (40, len(names) + 1)  # + no object
  # One name list per example ([B, K, D]) scores as the shared list ([K, D]).
  np.testing.assert_allclose(head.apply(params, x_unseen, text_all[None])[0], logits,
                             rtol=1e-6, atol=1e-6)
  pred = np.asarray(jnp.argmax(logits[:, :-1], -1))
  truth = np.repeat([names.index(n) for n in unseen], 10)
  assert (pred == truth).mean() >= 0.8, (pred, truth)


def test_prior_bank_and_description_candidates():
  p = ScenePriors(objects=(SceneObject("star", ("small", "red", "dotted")),
                           SceneObject("circle", ("large", "striped")),
                           SceneObject("square", ("solid",))),
                  relations=(Relation(0, "left of", 1), Relation(2, "above", 0)),
                  text="")
  bank = L.PriorBank.build([p, None], L.TextCache(WordsEncoder()), max_objects=2,
                           max_attributes=4, max_relations=4)
  a = bank.arrays
  assert a["object_valid"].tolist() == [[True, True], [False, False]]
  # The third object is dropped with its attribute and its relation; 5 attributes -> 4.
  assert a["attribute_owner"][0].tolist() == [0, 0, 0, 1]
  assert a["relation_valid"][0].tolist() == [True, False, False, False]
  assert a["relation_pairs"][0, 0].tolist() == [0, 1]
  np.testing.assert_allclose(a["objects"][0, 1], WordsEncoder().encode(["circle"])[0],
                             rtol=1e-6)
  b = bank.batch([1, 0])
  assert b["prior_objects"].shape == (2, 2, D)
  assert L.description_candidates(p) == ["red dotted star", "striped circle", "solid square"]


def test_without_data_or_weights_the_run_stops_at_once_naming_them(tmp_path):
  cfg = "configs/llmformer_cocostuff.py"
  arg = f"root={tmp_path}/nowhere,weights={tmp_path}/resnet50.safetensors"
  with pytest.raises(SystemExit) as e:
    L.main([f"--config={cfg}:{arg}", f"--workdir={tmp_path}/run"])
  text = str(e.value)
  assert "resnet50.safetensors" in text
  for name in ("coco_stuff_171", "ade20k_150", "ade20k_847", "pascal_context_59",
               "pascal_context_459", "pascal_voc_20"):
    assert name in text, text
  assert f"--config={cfg}:demo" in text
  assert not (tmp_path / "run").exists()


def test_real_config_without_encoder_weights_is_refused(tmp_path):
  spec = importlib.util.spec_from_file_location("llmf_cfg", "configs/llmformer_cocostuff.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  missing = L.LLMFormer.missing_inputs(mod.get_config(f"root={tmp_path}"))
  assert any(m.startswith("model.encoder_weights is empty: the resnet50 encoder")
             for m in missing), missing
  demo = L.LLMFormer.missing_inputs(mod.get_config("demo"))
  assert not any("encoder_weights" in m for m in demo), demo


class _OracleLLMFormer(L.LLMFormer):
  """An LLMFormer whose dense scores come from a perfect 'vision': a pixel whose (normalised)
  red channel is positive looks like a dotted star, any other like a striped circle; its
  score for a name is the cosine of that look with the name's text embedding. The candidate
  names, their embeddings and the mapping to data set classes are the real code's."""

  def dense_logits(self, params, frozen, image, text_embeddings, priors=None):
    looks = jnp.asarray(WordsEncoder().encode(["dotted star", "striped circle"]))
    red = image[:, ::4, ::4, 0] > 0
    pixel = jnp.where(red[..., None], looks[0], looks[1])  # [B, h, w, D]
    t = jnp.asarray(text_embeddings)
    t = jnp.broadcast_to(t, (image.shape[0],) + t.shape[-2:])
    return jnp.einsum("bhwd,bkd->bhwk", pixel, t)


def test_candidate_free_mode_takes_the_names_from_each_description(trained):
  # Three identical images (red dotted star left, striped circle right); only their
  # descriptions differ. With no candidate list, each image is scored with the names its
  # description gives, mapped to the nearest data set name.
  s = 32
  image = np.zeros((s, s, 3), np.uint8)
  image[:, :16] = (255, 0, 0)
  label = np.full((s, s), 2, np.int32)
  label[:, :16] = 1
  names = ["solid square", "dotted star", "striped circle"]
  src = InMemoryDenseSource([image] * 3, [label] * 3, names)
  both = ScenePriors(objects=(SceneObject("star", ("small", "red", "dotted")),
                              SceneObject("circle", ("large", "striped"))), relations=(),
                     text="")
  square = ScenePriors(objects=(SceneObject("square", ("large", "solid")),), relations=(),
                       text="")
  priors = [both, square, None]
  assert L.description_candidates(both) == ["red dotted star", "striped circle"]
  oracle = _OracleLLMFormer(_config(), text_encoder=WordsEncoder())
  res = L.evaluate_dense(oracle, {}, {}, src, image_size=s, candidates="description",
                         priors=priors, examples=3)
  preds = [p for _, _, p in res["examples"]]
  np.testing.assert_array_equal(preds[0], label)  # both objects named: right everywhere
  assert (preds[1] == 0).all()  # only "solid square" named: that is all it can say
  assert (preds[2] == 0).all()  # no description: class 0 (documented)
  assert res["protocol"]["candidates"] == "description"
  # The same images with the data set's names: the description no longer matters.
  res = L.evaluate_dense(oracle, {}, {}, src, image_size=s, candidates="dataset", examples=3)
  for _, _, p in res["examples"]:
    np.testing.assert_array_equal(p, label)
  # The trained network in the same mode: every predicted class is a described name's.
  method, params, frozen, _ = trained
  res = L.evaluate_dense(method, params, frozen, src, image_size=s, candidates="description",
                         priors=[both, square, square], examples=3)
  preds = [p for _, _, p in res["examples"]]
  assert set(np.unique(preds[0])) <= {1, 2}
  assert set(np.unique(preds[1])) == {0} and set(np.unique(preds[2])) == {0}
