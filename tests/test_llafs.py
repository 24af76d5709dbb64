"""Tests of LLaFS (fssjax.methods.llafs) with tiny models.

A tiny random LLaMA (1 layer, width 16, the SmolLM2 tokenizer and its 49152-token
vocabulary), the small from-scratch ResNet, a 1-layer Q-Former with 4 queries, 32 x 32
images, a 4 x 4 coordinate grid and 6-point polygons, so that the answers stay short. The
method and its jitted functions are built once per module (compilation dominates).
"""

import importlib.util
import json
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



# ----------------------------------------------------------------------------------------
# Attributes and the region-attribute table ('full' instruction).

CLIP_DIR = str(REPO / "tests" / "fixtures" / "clip" / "tiny")
ATTRS = {"red star": ["red colour", "five points", "a cat"],
         "blue disk": ["blue colour", "round", "a cat"]}  # "a cat" is shared


def _attribute_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("attrs") / "attributes.json"
  path.write_text(json.dumps(ATTRS))
  return str(path)


def table_config(attributes, **model):
  return tiny_config(**dict(dict(instruction="full", attributes=attributes, region_table=True,
                                 clip=CLIP_DIR, class_names=tuple(ATTRS),
                                 max_prompt_tokens=240, max_new_tokens=8, region_segments=4,
                                 region_tokens=2),
                            **model))


def two_colour_batch(b=2):
  """Support: a disk, left half red and right half blue, on grey (SLIC splits it at the
  colour edge); query as make_batch's."""
  from fssjax.data import transforms
  base_b = make_batch(b=b)
  yy, xx = np.mgrid[:S, :S]
  disk = (yy - 16) ** 2 + (xx - 16) ** 2 < 120
  img = np.full((S, S, 3), 128, np.uint8)
  img[disk & (xx < 16)] = (220, 30, 30)
  img[disk & (xx >= 16)] = (30, 30, 220)
  s = np.stack([transforms.normalize(np.roll(img, i, 1), "imagenet") for i in range(b)])
  sm = np.stack([np.roll(disk, i, 1) for i in range(b)]).astype(np.uint8)
  return dict(base_b, support_images=jnp.asarray(s[:, None]),
              support_masks=jnp.asarray(sm[:, None]),
              class_id=jnp.asarray(np.arange(b) % 2, jnp.int32))


@pytest.fixture(scope="module")
def table_setup(tmp_path_factory):
  method = get_method(table_config(_attribute_file(tmp_path_factory)))
  batch = two_colour_batch()
  params, frozen = base.initialize(method, jax.random.PRNGKey(0), batch)
  v = base.merge(params, frozen)
  regions = jax.jit(method.region_inputs)(v, batch)  # labels, sims, present
  return method, batch, params, frozen, regions


def test_full_instruction_has_the_attribute_sentence(table_setup):
  method = table_setup[0]  # a JSON attribute file; no table without similarities
  sm = np.asarray(make_batch()["support_masks"][0, 0])
  text = "".join(p for p in method.codec.episode_parts([sm], 1) if isinstance(p, str))
  assert "Blue disk has blue colour; round; a cat.\n" in text  # every attribute, shared too
  assert "red colour" not in text and "Region-attribute table" not in text
  no_class = "".join(p for p in method.codec.episode_parts([sm], -1) if isinstance(p, str))
  assert " has " not in no_class
  # The embedded benchmark's exact descriptions.
  synth = get_method(tiny_config(instruction="full", attributes="synthetic",
                                 max_prompt_tokens=240))
  from fssjax.data import synthetic
  cat = synthetic.categories()[3]
  text = "".join(p for p in synth.codec.episode_parts([sm], 3) if isinstance(p, str))
  sentence = [line for line in text.split("\n") if " has " in line]
  assert len(sentence) == 1 and sentence[0].startswith(cat.name[:1].upper() + cat.name[1:]
                                                         + " has the shape of")
  for colour in cat.colours:
    assert f"; {colour} colour;" in sentence[0]
  assert sentence[0].endswith(f"; a {cat.size} size.")


def _table_rows(text):
  rows = {}
  for line in text.split("\n"):
    if line.startswith("region "):
      head, attrs = line.split(": ", 1)
      rows[int(head.split()[1])] = attrs.split("; ")
  return rows


def test_region_table_rows_follow_the_clip_similarity(table_setup):
  from fssjax.data import transforms
  from fssjax.nn import clip as nc
  from fssjax.nn import clip_vision as cv
  from fssjax.priors import instruction as ins
  from fssjax.weights import clip as wc
  method, batch, _, _, regions = table_setup
  labels, sims, present = map(np.asarray, regions)
  config, cparams = wc.load_clip_model(CLIP_DIR)
  model = nc.CLIPModel(config)
  for i in range(2):
    cls = int(batch["class_id"][i])
    distinct = [a for a in ATTRS[list(ATTRS)[cls]] if a != "a cat"]
    # Superpixels: SLIC on the un-normalised support image, split at the colour edge.
    img = np.clip(np.rint((np.asarray(batch["support_images"][i, 0]) * transforms.IMAGENET_STD
                           + transforms.IMAGENET_MEAN) * 255), 0, 255).astype(np.uint8)
    want = ins.superpixels(img, np.asarray(batch["support_masks"][i, 0]), n_segments=4,
                           max_regions=4)
    np.testing.assert_array_equal(labels[i, 0], want)
    ids = [r for r in range(1, 5) if (want == r).any()]
    assert len(ids) >= 2 and present[i, 0].tolist() == [r in ids for r in range(1, 5)]
    # The similarity, independently: PIL crops (instruction.masked_crops) through the Flax
    # CLIP towers and projections, cosine to the attribute texts.
    tok = wc.load_clip_tokenizer(CLIP_DIR)
    image_features = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                      method=model.get_image_features))
    text_features = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m,
                                                        method=model.get_text_features))

    def image_encoder(crops):
      x = (crops / 255.0 - np.asarray(cv.CLIP_MEAN)) / np.asarray(cv.CLIP_STD)
      return np.asarray(image_features(cparams, x.astype(np.float32)))

    def text_encoder(texts):
      return np.asarray(text_features(cparams, *wc.tokenize(tok, texts, config)))

    sim = ins.embedding_similarity(image_encoder, text_encoder, size=config.vision.image_size)
    ref = sim(img, np.stack([want == r for r in ids]), distinct)
    got = sims[i, 0][np.asarray(ids) - 1][:, :len(distinct)]
    np.testing.assert_allclose(got, ref, atol=0.01)  # measured: 1.4e-3
    # The table in the prompt: each distinguishing attribute on its argmax region (the
    # method's similarities), the shared one left out.
    enc = method._host_layout(np.asarray(batch["support_masks"]),
                              np.asarray(batch["query_mask"]),
                              np.asarray(batch["class_id"]), sims, present)
    text = method.codec.answer_text(enc[0][i][enc[3][i] > 0])
    expect = {}
    for a, attr in enumerate(distinct):
      expect.setdefault(ids[int(np.argmax(got[:, a]))], []).append(attr)
      if np.sort(ref[:, a])[-1] - np.sort(ref[:, a])[-2] > 0.1:  # clear winner: the same
        assert ids[int(np.argmax(ref[:, a]))] in expect and attr in expect[
            ids[int(np.argmax(ref[:, a]))]]
    assert _table_rows(text) == expect
    assert "a cat" in text.split("Region-attribute table")[0]  # the sentence keeps it
    assert "a cat" not in text.split("Region-attribute table")[1]


def test_region_tokens_are_spliced_at_the_region_placeholders(table_setup):
  method, batch, params, frozen, (labels, sims, present) = table_setup
  v = base.merge(params, frozen)
  codec = method.codec
  q, r, n = 4, 4, 2
  ids, vis, _, mask, _ = method._host_layout(
      np.asarray(batch["support_masks"]), np.asarray(batch["query_mask"]),
      np.asarray(batch["class_id"]), np.asarray(sims), np.asarray(present))

  @jax.jit
  def spliced(v, ids, vis):
    visual = method.visual_tokens(v, batch["query_image"], batch["support_images"],
                                  batch["support_masks"], labels)
    emb = method._embed(v["params"]["llm"], ids, vis, visual)
    # Independently: the Q-Former with the region channel = superpixel reg, per region.
    feats = method._features(v, batch["support_images"][:, 0])
    masks = (labels[:, 0, None] == jnp.arange(1, r + 1)[:, None, None]).astype(jnp.float32)
    chan = llafs._area_resize(masks.reshape((2 * r,) + masks.shape[2:]), feats.shape[1:3])
    tok = method._tokens(v, jnp.repeat(feats, r, axis=0), chan)
    return visual.shape[1], emb, tok.reshape(2, r, n, q // n, -1).mean(3)

  width, emb, want = spliced(v, jnp.asarray(ids), jnp.asarray(vis))
  assert width == 2 * q + 1 * r * n  # support, query, then K R n region tokens
  for i in range(2):
    text = codec.answer_text(ids[i][mask[i] > 0])
    rows = _table_rows(text)
    assert rows
    region_slots = vis[i][vis[i] >= 2 * q]
    assert len(region_slots) == n * len(rows)
    for reg in rows:
      start = 2 * q + (reg - 1) * n  # support 0, region reg: (K + 1) Q + (k R + reg - 1) n
      pos = np.nonzero(vis[i] == start)[0]
      assert len(pos) == 1
      p0 = int(pos[0])
      np.testing.assert_array_equal(vis[i][p0:p0 + n], np.arange(start, start + n))
      # The slot stands where the table row has its <region> placeholder.
      before = codec.answer_text(ids[i][:p0][mask[i][:p0] > 0])
      after = codec.answer_text(ids[i][p0 + n:][mask[i][p0 + n:] > 0])
      assert before.endswith(f"region {reg} ") and after.startswith(": ")
      # Its tokens: the Q-Former with the region channel = that superpixel, pooled in n
      # groups, written into the LLM's input embeddings.
      np.testing.assert_allclose(np.asarray(emb[i, p0:p0 + n]), np.asarray(want[i, reg - 1]),
                                 atol=1e-5)
    # The image slots are untouched by the regions: support 0 then the query.
    np.testing.assert_array_equal(vis[i][(vis[i] >= 0) & (vis[i] < 2 * q)], np.arange(2 * q))


def test_region_table_loss_and_predict_run_jitted(table_setup):
  method, batch, params, frozen, _ = table_setup
  loss, aux = jax.jit(method.loss)(params, frozen, batch, jax.random.PRNGKey(0))
  assert np.isfinite(float(loss)) and float(aux["ce"]) > 0
  assert int(aux["llafs/truncated_prompts"]) == 0
  # CLIP is frozen and loaded (not the zeros of init).
  assert not any(k.startswith("params/clip") for k in base.leaf_paths(params))
  clip = {k: np.asarray(x) for k, x in base.leaf_paths(frozen).items()
          if k.startswith("params/clip/")}
  assert "params/clip/visual_projection/kernel" in clip
  assert all(np.abs(x).max() > 0 for x in clip.values())
  method.reset_generation_stats()
  scores = jax.jit(method.predict)(params, frozen, batch)
  assert scores.shape == (2, S, S) and np.isfinite(np.asarray(scores)).all()
  assert method.generation_stats()["answers"] == 2


def test_attribute_and_table_settings_are_checked(tmp_path):
  for value in ("nope", str(tmp_path / "missing.json")):
    with pytest.raises(base.ConfigError, match=r"config.model.attributes=.*expected '' \(none\)"):
      get_method(tiny_config(instruction="full", attributes=value))
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(["red colour"]))
  with pytest.raises(base.ConfigError, match="expected a JSON object"):
    get_method(tiny_config(instruction="full", attributes=str(bad)))
  with pytest.raises(base.ConfigError, match="needs config.model.instruction='full'"):
    get_method(tiny_config(instruction="compact", attributes="synthetic"))
  with pytest.raises(base.ConfigError, match=r"region_table=True needs config.model.attributes"):
    get_method(tiny_config(instruction="full", region_table=True, clip=CLIP_DIR))
  with pytest.raises(base.ConfigError, match=r"needs config.model.clip"):
    get_method(tiny_config(instruction="full", attributes="synthetic", region_table=True))
  with pytest.raises(base.ConfigError, match="region_tokens=3"):
    get_method(table_config("synthetic", region_tokens=3))
  with pytest.raises(base.ConfigError, match="shared_with='fold'"):
    get_method(table_config("synthetic", shared_with="fold"))
  with pytest.raises(base.ConfigError, match="config.model.attribute_llm: .*unknown keys"):
    get_method(tiny_config(instruction="full", attributes="llm",
                           attribute_llm=dict(bogus=1))).attribute_source()
  # A CLIP vision tower alone is not a CLIPModel.
  vision_only = str(REPO / "tests" / "fixtures" / "llava" / "clip")
  with pytest.raises(base.ConfigError, match="config.model.clip=.*CLIPModel config"):
    get_method(table_config("synthetic", clip=vision_only)).clip_model()
  c = table_config("synthetic", clip=str(tmp_path / "no_clip"))
  assert any("model.clip" in line and "CLIPModel" in line
             for line in llafs.LLaFS.missing_inputs(c))


def test_configs_attributes_and_region_table():
  llafs_coco, llafs_pascal = _config_module("llafs_coco"), _config_module("llafs_pascal")
  c = llafs_coco.get_config("attributes=/data/attrs.json,clip=/w/no_such_clip")
  assert (c.model.attributes, c.model.clip, c.model.region_table) == (
      "/data/attrs.json", "/w/no_such_clip", True)
  lines = llafs.LLaFS.missing_inputs(c)
  assert any("model.clip = '/w/no_such_clip'" in line for line in lines)
  assert any("model.attributes = '/data/attrs.json'" in line for line in lines)
  p = llafs_pascal.get_config("attributes=llm")
  assert (p.model.attributes, p.model.region_table) == ("llm", False)
  demo = llafs_coco.get_config("demo=True")
  assert (demo.model.instruction, demo.model.attributes, demo.model.region_table) == (
      "compact", "", False)


def test_snapped_tokens_are_digit_embeddings_with_a_straight_through_gradient():
  method = get_method(tiny_config(num_query_tokens=12, snap_tokens=True))
  batch = make_batch()
  params, frozen = base.initialize(method, jax.random.PRNGKey(0), batch)
  llm = base.merge(params, frozen)["params"]["llm"]
  e = np.asarray(llm["model"]["embed_tokens"]["embedding"])[method.digit_ids()]  # [4, 16]
  rng = np.random.default_rng(0)
  want = rng.integers(0, 4, size=(2, 5))
  # Near digit `want` (the random embeddings have std 0.02, neighbours ~0.1 apart).
  x = e[want] + 0.004 * rng.normal(size=(2, 5, 16)).astype(np.float32)
  snapped = np.asarray(method.snap(llm, jnp.asarray(x)))
  np.testing.assert_allclose(snapped, e[want], rtol=0, atol=1e-7)  # x + (hard - x)
  assert np.abs(x - e[want]).max() > 1e-3
  c = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  g = jax.grad(lambda t: jnp.sum(method.snap(llm, t) * c))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(g), np.asarray(c), rtol=0, atol=1e-6)


def test_a_stage_keeps_its_frozen_parts():
  c = tiny_config(stages=dict(curriculum=dict(steps=2, batch=2, lr=1e-2,
                                              frozen=("params/qformer",))),
                  stage_dir="")
  method = get_method(c)
  batch = make_batch()
  params, frozen = base.partition(method.init(jax.random.PRNGKey(0), batch),
                                  method.trainable_patterns())
  after = base.leaf_paths(llafs.train_stage(method, "curriculum", c.model.stages.curriculum,
                                            params, frozen))
  before = base.leaf_paths(params)
  moved = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
  assert any("lora_" in k for k in moved)
  assert not any(k.startswith("params/qformer/") for k in moved)


def test_truth_tokens_and_visual_grad():
  # truth_tokens = 1: every episode's image tokens are the digit embeddings of its polygon;
  # visual_grad = False: the LLM loss leaves the visual side without gradient (LoRA learns).
  method = get_method(tiny_config(num_query_tokens=12, truth_tokens=1.0, visual_grad=False,
                                  snap_tokens=True))
  batch = make_batch()
  params, frozen = base.initialize(method, jax.random.PRNGKey(0), batch)
  v = base.merge(params, frozen)
  vis = method.visual_tokens(v, batch["query_image"], batch["support_images"],
                             batch["support_masks"])
  e = np.asarray(method.digit_embeddings(v["params"]["llm"]))
  tgt = np.asarray(method.vertex_targets(batch)).reshape(2, -1)  # [B, (K + 1) 2P]
  assert (tgt >= 0).all() and tgt.shape == (2, 24)
  truth = method.truth_visual(v, vis, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(np.asarray(truth), e[tgt])
  # The query's digits are its answer polygon's coordinates (x1, y1, ..., x6, y6).
  _, g = method.codec.polygons(np.asarray(batch["query_mask"][0]))
  np.testing.assert_array_equal(tgt[0, 12:], np.asarray(g[0]).reshape(-1))
  grads, _ = jax.grad(lambda p: method.loss(p, frozen, batch, jax.random.PRNGKey(1)),
                      has_aux=True)(params)
  flat = base.leaf_paths(grads)
  assert all(float(jnp.abs(x).max()) == 0 for k, x in flat.items()
             if k.startswith("params/qformer/"))
  assert max(float(jnp.abs(x).max()) for k, x in flat.items() if "lora_" in k) > 0
  # The default (visual_grad=True) trains the Q-Former through the LLM loss.
  method2 = get_method(tiny_config(num_query_tokens=12))
  grads2, _ = jax.grad(lambda p: method2.loss(p, frozen, batch, jax.random.PRNGKey(1)),
                       has_aux=True)(params)
  assert max(float(jnp.abs(x).max()) for k, x in base.leaf_paths(grads2).items()
             if k.startswith("params/qformer/")) > 0


def test_stage_cache_keys_follow_what_each_stage_reads():
  stages = dict(align=dict(steps=2), locate=dict(steps=3), curriculum=dict(steps=4))

  def paths(**changes):
    m = get_method(tiny_config(num_query_tokens=12, stages=changes.pop("stages", stages),
                               **changes))
    return {s: llafs.stage_path(m, s) for s in ("align", "locate", "curriculum")}

  ref = paths()
  more_b = paths(stages=dict(stages, curriculum=dict(steps=9)))
  assert more_b["align"] == ref["align"] and more_b["locate"] == ref["locate"]
  assert more_b["curriculum"] != ref["curriculum"]
  # Generation-only keys change no stage; the (b)/(c)-loss keys only stage (b).
  assert paths(max_new_tokens=12) == ref
  truth = paths(truth_tokens=0.5)
  assert truth["locate"] == ref["locate"] and truth["curriculum"] != ref["curriculum"]
  # Another fold's training classes: every stage is retrained.
  c = tiny_config(num_query_tokens=12, stages=stages)
  c.data.fold = 1
  m = get_method(c)
  assert all(llafs.stage_path(m, s) != ref[s] for s in ref)


def test_generation_counts_skip_padding_rows_and_count_cut_prompts():
  method = get_method(tiny_config(max_prompt_tokens=20))
  codec = method.codec
  ids = [codec.encode("((1,1),(3,1),(3,3),(1,3),(0,2),(0,1))")] * 3
  tokens = np.asarray(ids, np.int32)
  lengths = np.full(3, tokens.shape[1], np.int32)
  method.reset_generation_stats()
  method._host_coarse(tokens, lengths, (S, S), True, np.asarray([True, True, False]))  # pylint: disable=protected-access
  st = method.generation_stats()
  assert (st["answers"], st["ok"], st["new_tokens"]) == (2, 2, 2 * tokens.shape[1])
  # A prompt longer than max_prompt_tokens (20) is cut and counted; a padding row (no
  # support foreground) is not.
  batch = make_batch(b=2)
  sm = np.asarray(batch["support_masks"]).copy()
  sm[1] = 0
  method._host_prompt(sm, np.zeros(2, np.int32))  # pylint: disable=protected-access
  assert method.generation_stats()["truncated_prompts"] == 1


def test_settings_are_checked_before_weights_load():
  with pytest.raises(base.ConfigError, match="snap_tokens"):
    get_method(tiny_config(grid=12, num_query_tokens=12, snap_tokens=True))
  with pytest.raises(base.ConfigError, match=r"truth_tokens > 0 give .* 12 query tokens"):
    get_method(tiny_config(num_query_tokens=4, truth_tokens=0.5))
  with pytest.raises(base.ConfigError, match=r"in \[0, 1\]"):
    get_method(tiny_config(num_query_tokens=12, truth_tokens=2.0))
  with pytest.raises(base.ConfigError, match="visual_layout='polygon'"):
    get_method(tiny_config(visual_layout="polygon", num_query_tokens=4))
  c = tiny_config(stages=dict(align=dict(steps=2)))
  c.data.dataset = "coco20i"
  with pytest.raises(base.ConfigError, match="captions only for the embedded benchmark"):
    get_method(c)
