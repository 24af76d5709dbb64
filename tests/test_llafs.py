"""Tests of LLaFS (fssjax.methods.llafs) with tiny models.

A tiny random LLaMA (1 layer, width 16, the SmolLM2 tokenizer and its 49152-token
vocabulary), the small from-scratch ResNet, a 1-layer Q-Former with 4 queries, 32 x 32
images, a 4 x 4 coordinate grid and 6-point polygons, so that the answers stay short. The
method and its jitted functions are built once per module (compilation dominates).
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fssjax import configlib
from fssjax.methods import base, get_method
from fssjax.methods import llafs
from fssjax.nn import llama as nl
from fssjax.priors import polygons as poly

S = 32
TINY_LLM = dict(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                max_position_embeddings=512)


REPO = pathlib.Path(__file__).resolve().parent.parent


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def tiny_config(**model):
  c = configlib.base_config()
  c.method = "llafs"
  c.data.dataset = "synthetic"
  c.data.image_size = S
  m = dict(llm_config=TINY_LLM, tokenizer="smollm2", backbone="resnet_tiny", feature_tap=0,
           qformer=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32),
           num_query_tokens=4, position_channels=8, conversation="chatml",
           instruction="compact", num_points=6, grid=4, max_objects=1, max_prompt_tokens=64,
           max_answer_tokens=40, max_new_tokens=40, lora_rank=2, lora_dropout=0.0,
           refine_width=4, query_prior="prototype")
  m.update(model)
  c.model = ml_collections.ConfigDict(dict(m, trainable=None))
  return c


def make_batch(b=2, k=1, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:S, :S]
  qm = np.stack([((yy - 10 - 4 * i) ** 2 + (xx - 14) ** 2 < 40) for i in range(b)])
  sm = np.stack([[((yy - 16) ** 2 + (xx - 12 - 3 * j) ** 2 < 50) for j in range(k)]
                 for _ in range(b)])
  q = rng.normal(size=(b, S, S, 3)).astype(np.float32) + 2 * qm[..., None]
  s = rng.normal(size=(b, k, S, S, 3)).astype(np.float32) + 2 * sm[..., None]
  return {k_: jnp.asarray(v) for k_, v in dict(
      query_image=q, query_mask=qm.astype(np.uint8), support_images=s,
      support_masks=sm.astype(np.uint8), class_id=np.zeros(b, np.int32)).items()}


@pytest.fixture(scope="module")
def setup():
  method = get_method(tiny_config())
  batch = make_batch()
  params, frozen = base.initialize(method, jax.random.PRNGKey(0), batch)
  return method, batch, params, frozen


def test_registry_and_trainable_split(setup):
  method, _, params, frozen = setup
  assert isinstance(method, llafs.LLaFS)
  p = base.leaf_paths(params)
  f = base.leaf_paths(frozen)
  assert any("lora_A" in k for k in p) and any("lora_B" in k for k in p)
  assert not any("lora" in k for k in f)
  assert any(k.startswith("params/llm/model/embed_tokens") for k in f)
  assert any(k.startswith("params/qformer/") for k in p)
  assert any(k.startswith("params/refine/") for k in p)
  assert not any(k.startswith("params/backbone/") for k in p)  # frozen encoder (paper)


def test_layout_and_grid_round_trip(setup):
  method, batch, _, _ = setup
  codec = method.codec
  enc = codec.episode([np.asarray(batch["support_masks"][0, 0])],
                      np.asarray(batch["query_mask"][0]), 0)
  tp = codec.tp
  assert enc.ids.shape == (tp + codec.ta,)
  # Visual slots: support 0 then the query, Q each, inside the prompt.
  vis = enc.visual[enc.visual >= 0]
  np.testing.assert_array_equal(vis, np.arange(8))
  assert (np.nonzero(enc.visual >= 0)[0] < tp).all()
  # Labels: the answer tokens, shifted by one, decoding to the query polygon text.
  lab = enc.labels[enc.labels >= 0]
  text = codec.answer_text(lab)
  want, g = llafs.mask_polygon_text(np.asarray(batch["query_mask"][0]), num_points=6, grid=4,
                                    max_objects=1)
  assert text.startswith(want)
  assert (g[0] >= 0).all() and (g[0] <= 3).all()
  np.testing.assert_array_equal(enc.ids[tp:tp + len(lab)], lab)
  # Rasterising the answer covers the object (grid cells of 8 px).
  mask, res = llafs.rasterise_answer(want, (S, S), num_points=6, grid=4)
  assert res.status == "ok"
  assert poly.mask_iou(mask, np.asarray(batch["query_mask"][0])) > 0.3


def test_loss_falls_and_lora_keeps_base(setup):
  method, batch, params, frozen = setup
  opt = optax.adam(3e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state, rng):
    (l, aux), g = jax.value_and_grad(method.loss, has_aux=True)(params, frozen, batch, rng)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, l, aux

  p = params
  losses = []
  for i in range(8):
    p, state, l, aux = step(p, state, jax.random.PRNGKey(i))
    losses.append(float(l))
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 0.4, losses  # nats
  assert float(aux["ce"]) > 0 and "refine" in aux
  # LoRA-only training: the LLM base weights are frozen (not in params) and untouched; the
  # LoRA factors moved.
  before = base.leaf_paths(params)
  after = base.leaf_paths(p)
  moved = [k for k in before if "lora_B" in k and not np.array_equal(before[k], after[k])]
  assert moved
  merged = base.merge(p, frozen)
  for k, v in base.leaf_paths(frozen).items():
    assert np.array_equal(np.asarray(base.leaf_paths(merged)[k]), np.asarray(v)), k


def test_generate_parse_rasterise_refine(setup):
  method, batch, params, frozen = setup
  method.reset_generation_stats()
  scores = jax.jit(method.predict)(params, frozen, batch)
  assert scores.shape == (2, S, S) and scores.dtype == jnp.float32
  assert np.isfinite(np.asarray(scores)).all()
  st = method.generation_stats()
  assert st["answers"] == 2 and st["ok"] + st["repaired"] + st["failed"] == 2
  assert st["new_tokens"] > 0
  # A random LLM writes no polygon: counted as failed, scored as an empty coarse mask, and
  # the untrained refinement net returns the coarse mask (background everywhere).
  if st["failed"] == 2:
    assert (np.asarray(scores) < 0).all()
  # The same episodes and params again: the coarse masks come from the memo, nothing is
  # generated (or counted) again.
  again = jax.jit(method.predict)(params, frozen, batch)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(scores))
  assert method.generation_stats()["answers"] == 2


def test_malformed_answers_are_counted_not_raised(setup):
  method, _, _, _ = setup
  codec = method.codec
  texts = ["((1,1),(3,1),(3,3),(1,3),(0,2),(0,1))",  # ok (6 points on the 4-grid)
           "((1,1),(3,1),(3,3),(1",  # truncated: repaired (3 complete points)
           "((9,9),(1,1),(2,0),(3,1),(3,3),(1,3))",  # out of range: clipped
           "no polygon here",  # failed
           "((1,1),(2"]  # failed: one point
  ids = [codec.encode(t) for t in texts]
  n = max(map(len, ids))
  tokens = np.zeros((len(ids), n), np.int32)
  for i, t in enumerate(ids):
    tokens[i, :len(t)] = t
  lengths = np.asarray([len(t) for t in ids], np.int32)
  method.reset_generation_stats()
  masks, status = method._host_coarse(tokens, lengths, (S, S), True)  # pylint: disable=protected-access
  assert [poly.STATUSES[s] for s in status] == ["ok", "repaired", "repaired", "failed", "failed"]
  st = method.generation_stats()
  assert (st["ok"], st["repaired"], st["failed"]) == (1, 2, 2)
  assert masks[3].sum() == 0 and masks[4].sum() == 0 and masks[0].sum() > 0


def test_stage_a_trains_the_qformer_only_and_is_cached(tmp_path):
  c = tiny_config(stages=dict(align=dict(steps=2, batch=2, lr=1e-2)), stage_dir=str(tmp_path))
  method = get_method(c)
  batch = make_batch()
  params, frozen = base.partition(method.init(jax.random.PRNGKey(0), batch),
                                  method.trainable_patterns())
  p1, _ = method.load_pretrained(params, frozen)
  files = sorted(x.name for x in tmp_path.iterdir())
  assert len(files) == 1 and files[0].startswith("llafs_align_")
  before, after = base.leaf_paths(params), base.leaf_paths(p1)
  for k, v in after.items():  # captions have empty support masks: still finite
    assert np.isfinite(np.asarray(v)).all(), k
  moved = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
  assert any(k.startswith("params/qformer/") for k in moved)
  assert not any(k.startswith(("params/llm/", "params/refine/")) for k in moved)
  # A rerun loads the cached result instead of training.
  p2, _ = get_method(c).load_pretrained(params, frozen)
  for k, v in after.items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(base.leaf_paths(p2)[k]))


def test_stage_batches():
  method = get_method(tiny_config())
  cap = llafs.caption_batch(method, 0, 2, 0)
  text = method.codec.answer_text(cap["llafs/labels"][0][cap["llafs/labels"][0] >= 0])
  assert text.startswith("An image with")
  # Curriculum: difficulty rises over the steps, fewer vertices are given.
  easy = llafs.pseudo_batch(method, 0, 10, 1, 0)
  hard = llafs.pseudo_batch(method, 9, 10, 1, 0)
  assert float(easy["difficulty"]) == 0.0 and float(hard["difficulty"]) == 1.0
  n_easy = int((easy["llafs/mask"][0] == 1).sum())
  n_hard = int((hard["llafs/mask"][0] == 1).sum())
  assert n_easy > n_hard  # the 5 given points of 6 lengthen the easy prompt
  assert easy["query_image"].shape == (1, S, S, 3) and easy["support_masks"].shape == (1, 1, S, S)


def test_bad_settings_are_refused():
  with pytest.raises(base.ConfigError, match="query_prior"):
    get_method(tiny_config(query_prior="oracle"))
  with pytest.raises(base.ConfigError, match="needs an LLM"):
    get_method(tiny_config(llm_config={}))


def test_configs_paper_setting_demo_and_missing_llm():
  llafs_coco, llafs_pascal = _config_module("llafs_coco"), _config_module("llafs_pascal")
  coco, pascal = llafs_coco.get_config(""), llafs_pascal.get_config("fold=1")
  assert coco.data.dataset == "coco20i" and pascal.data.dataset == "pascal5i"
  assert coco.model.to_dict() == pascal.model.to_dict()
  assert coco.model.num_points == 16 and coco.model.instruction == "full"
  # CodeLLaMA-7B in transformers layout: rotary base 1e6, vocabulary 32016.
  cl = nl.LlamaConfig.from_hf(llafs_coco.CODELLAMA_7B)
  assert cl.rope_theta == 1e6 and cl.vocab_size == 32016
  # Without an LLM the preflight names it (the run stops before anything starts).
  lines = llafs.LLaFS.missing_inputs(coco)
  assert any("model.llm is empty" in l and "CodeLLaMA-7B" in l for l in lines)
  demo = llafs_coco.get_config("demo=True")
  assert demo.model.llm == "smollm2" and demo.data.dataset == "synthetic"
  assert not llafs.LLaFS.missing_inputs(demo)
  assert set(demo.evals.to_dict()) == {"fewshot", "polygons"}


def test_locate_stage_learns_vertex_digits_and_is_cached(tmp_path):
  # Stage 'locate' (ours): no LLM forward; each of the 2P query tokens is classified as the
  # digit of one coordinate of the answer polygon, by distance to the LLM's digit embeddings.
  c = tiny_config(num_query_tokens=12, vertices="extreme", position_linear=True,
                  stages=dict(locate=dict(steps=24, batch=4, lr=1e-2, data="pseudo",
                                          refine_batch=1)),
                  stage_dir=str(tmp_path), locate_weight=1.0)
  method = get_method(c)
  batch = make_batch()
  params, frozen = base.partition(method.init(jax.random.PRNGKey(0), batch),
                                  method.trainable_patterns())
  held = {k: jnp.asarray(v) for k, v in next(llafs.locate_batches(method, 1, 16, 99, "pseudo"))
          .items()}
  evaluate = jax.jit(lambda p: method.locate_loss(p, frozen, held, None)[1])
  m0 = evaluate(params)
  p1, _ = method.load_pretrained(params, frozen)
  m1 = evaluate(p1)
  files = sorted(x.name for x in tmp_path.iterdir())
  assert len(files) == 1 and files[0].startswith("llafs_locate_")
  # Held-out pseudo-samples: the token loss falls and the support tokens (region channel =
  # the support mask) name their coordinates' cells more often (measured: loss 30.7 -> 2.0,
  # support accuracy 0.21 -> 0.53 after 24 steps).
  assert float(m1["locate/tokens"]) < 0.3 * float(m0["locate/tokens"]), (m0, m1)
  assert float(m1["locate/support_accuracy"]) > float(m0["locate/support_accuracy"]) + 0.2
  before, after = base.leaf_paths(params), base.leaf_paths(p1)
  moved = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
  assert any(k.startswith("params/qformer/") for k in moved)
  assert any(k.startswith("params/refine/") for k in moved)
  assert not any(k.startswith("params/llm/") for k in moved)
  # The LLM loss with locate_weight adds the same terms (and stays finite).
  _, aux = jax.jit(method.loss)(p1, frozen, batch, jax.random.PRNGKey(0))
  assert np.isfinite(float(aux["loss"])) and "locate/query_accuracy" in aux
  # A rerun loads the cached stage.
  p2, _ = get_method(c).load_pretrained(params, frozen)
  for k, v in after.items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(base.leaf_paths(p2)[k]))


def test_locate_settings_are_checked():
  bad_grid = tiny_config(grid=16, num_query_tokens=12, locate_weight=1.0)
  with pytest.raises(base.ConfigError, match="grid"):
    get_method(bad_grid).check_locate()
  bad_q = tiny_config(num_query_tokens=4, locate_weight=1.0)
  with pytest.raises(base.ConfigError, match="2 x num_points = 12"):
    get_method(bad_q).check_locate()


def test_polygon_layout_makes_the_answer_a_copy_of_the_template():
  # visual_layout='polygon' (ours): an image's 2P visual tokens stand in the digits of a
  # one-object answer polygon, so that the answer is the template with each slot read as a
  # digit. Tokenised with the real SmolLM2 tokenizer (one token per digit).
  method = get_method(tiny_config(visual_layout="polygon", num_query_tokens=12,
                                  max_prompt_tokens=96))
  codec = method.codec
  t_ids, slots = codec.polygon_template()
  assert sorted(j for j in slots if j >= 0) == list(range(12))
  batch = make_batch()
  sm = np.asarray(batch["support_masks"][0, 0])
  enc = codec.episode([sm], np.asarray(batch["query_mask"][0]), 0)
  ids, vis = enc.ids[:codec.tp], enc.visual[:codec.tp]
  # Support 0's slots (indices 0..11) then the query's (12..23), in coordinate order.
  np.testing.assert_array_equal(vis[vis >= 0], np.arange(24))
  # The support template followed by the support's polygon text: replacing each support
  # slot by the digit of its coordinate gives exactly the polygon text's tokens.
  support_text, g = codec.polygons(sm)
  digits = np.asarray(g[0]).reshape(-1)  # x1, y1, ..., x6, y6
  start = int(np.nonzero(vis == 0)[0][0]) - 1  # the template's first token: '((('
  span = list(ids[start:start + len(t_ids)])
  filled = [codec.encode(str(digits[j]))[0] if j >= 0 else t for t, j in zip(span, slots)]
  assert filled == codec.encode(support_text)
  assert list(ids[start + len(t_ids):start + 2 * len(t_ids)]) == codec.encode(support_text)
  # The answer has the same token layout as the query's template.
  answer = enc.ids[codec.tp:codec.tp + len(t_ids)]
  q0 = int(np.nonzero(vis == 12)[0][0]) - 1
  assert [a for a, j in zip(answer, slots) if j < 0] == \
      [t for t, j in zip(ids[q0:q0 + len(t_ids)], slots) if j < 0]
  # It needs one token per coordinate.
  with pytest.raises(base.ConfigError, match="num_query_tokens = 2 x num_points"):
    get_method(tiny_config(visual_layout="polygon", num_query_tokens=4)).codec  # pylint: disable=expression-not-assigned
  with pytest.raises(base.ConfigError, match="visual_layout"):
    get_method(tiny_config(visual_layout="grid")).codec  # pylint: disable=expression-not-assigned

