"""Tests of DSV-LFS (fssjax.methods.dsv_lfs, fssjax.nn.dense_matching) with tiny models.

A tiny random LLaMA (1 layer, width 16; the SmolLM2 tokenizer, so the vocabulary is 49153
with [SEM]) and a tiny SAM-layout model (32 x 32 input, 4 x 4 grid, 2 blocks of width 256, so
that the 8-device run has a SAM kernel of 2^18 elements to shard). Compilation dominates the
run time, so the module compiles four model programs in all: the train step (6 steps, whose
first loss is also the 1-device reference of the 8-device run), one program holding every
prediction the tests compare (all prompt modes, the swapped-input variants, the K-shot vote
and its one-shot passes), and, in the 8-device subprocess, the sharded loss. They compile
with XLA's backend (LLVM) optimisation level 0 (`FAST_COMPILE`): half the compile time, the
same HLO and the same numbers (the tests check values, not speed).
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fssjax import configlib
from fssjax.methods import base, get_method
from fssjax.methods import dsv_lfs
from fssjax.nn import dense_matching as dm
from fssjax.nn.ops import interpolation_matrix, resize_bilinear

S = 32  # scored view and SAM input
# Per-program XLA options of the tests' jitted model programs (see the module docstring).
FAST_COMPILE = {"xla_backend_optimization_level": 0}

TINY_SAM = dict(
    vision_config=dict(hidden_size=256, output_channels=32, num_hidden_layers=2,
                       num_attention_heads=4, image_size=S, patch_size=8, window_size=2,
                       global_attn_indexes=[1], num_pos_feats=16, mlp_dim=1024),
    prompt_encoder_config=dict(hidden_size=32, image_size=S, patch_size=8),
    mask_decoder_config=dict(hidden_size=32, mlp_dim=32, num_attention_heads=2,
                             iou_head_hidden_dim=16, num_hidden_layers=1,
                             num_multimask_outputs=1, iou_head_depth=2))
TINY_LLM = dict(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                max_position_embeddings=256)


def tiny_config(**model):
  c = configlib.base_config()
  c.method = "dsv_lfs"
  c.data.dataset = "synthetic"
  c.data.image_size = S
  m = dict(llm_config=TINY_LLM, tokenizer="smollm2", vision_tower="sam", image_token_grid=2,
           sam_config=TINY_SAM, sam_resize="square", matching_channels=(4, 8, 32),
           conversation="chatml", description_sentences=1, question="<image>{prop}",
           lora_dropout=0.0)
  m.update(model)
  c.model = ml_collections.ConfigDict(dict(m, trainable=None))
  return c


def make_batch(method, k=1, b=2, seed=0):
  rng = np.random.default_rng(seed)
  tok = method.text
  length = method.texts()[0].max_length if method.texts() else 8
  ids = np.full((b, length), 0, np.int32)
  mask = np.zeros((b, length), np.uint8)
  names = ["striped star", "solid circle", "dotted ring", "gridded cross"]
  for i in range(b):
    if tok is not None:
      e = tok.encode(names[i % len(names)])
      ids[i, :len(e)] = e
      mask[i, :len(e)] = 1
  yy, xx = np.mgrid[:S, :S]
  qm = np.stack([((yy - 8 - 4 * i) ** 2 + (xx - 14) ** 2 < 60) for i in range(b)])
  sm = np.stack([[((yy - 14) ** 2 + (xx - 10 - 3 * j) ** 2 < 50) for j in range(k)]
                 for _ in range(b)])
  q = rng.normal(size=(b, S, S, 3)).astype(np.float32) + 2 * qm[..., None]
  s = rng.normal(size=(b, k, S, S, 3)).astype(np.float32) + 2 * sm[..., None]
  batch = dict(query_image=q, query_mask=qm.astype(np.uint8), support_images=s,
               support_masks=sm.astype(np.uint8), class_id=np.zeros(b, np.int32))
  batch["query_image@sam"] = q
  batch["support_images@sam"] = s
  batch["query_size@sam"] = np.full((b, 2), S, np.int32)
  batch["support_size@sam"] = np.full((b, k, 2), S, np.int32)
  if tok is not None:
    batch["text@dsv"], batch["text_mask@dsv"] = ids, mask
  return {k_: jnp.asarray(v) for k_, v in batch.items()}


@pytest.fixture(scope="module")
def both():
  method = get_method(tiny_config())
  batch = make_batch(method)
  params, frozen = base.initialize(method, jax.random.PRNGKey(0), batch)
  return method, params, frozen, batch


def _rows(*batches):
  """Batches with the same keys concatenated along the batch axis (rows are independent)."""
  return {k: jnp.concatenate([b[k] for b in batches]) for k in batches[0]}


def _shot(batch, j):
  """The one-shot batch of support j of a K-shot batch."""
  out = dict(batch)
  for key in ("support_images", "support_masks", "support_images@sam", "support_size@sam"):
    out[key] = batch[key][:, j:j + 1]
  return out


@pytest.fixture(scope="module")
def trained(both):
  """Six Adam steps from the initial parameters: (losses, last aux, params)."""
  import optax  # pylint: disable=import-outside-toplevel
  method, params, frozen, batch = both
  tx = optax.adam(1e-2)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def step(p, o):
    (loss, aux), g = jax.value_and_grad(
        lambda p: method.loss(p, frozen, batch, jax.random.PRNGKey(0)), has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss, aux

  losses, p, opt = [], params, tx.init(params)
  for _ in range(6):
    p, opt, loss, aux = step(p, opt)
    losses.append(float(loss))
  return losses, aux, p


@pytest.fixture(scope="module")
def predictions(both):
  """Every prediction the mode and K-shot tests compare, from ONE compiled program:
  `predict_modes` on 12 one-shot rows (the batch, the batch with other texts, with other
  supports, and the three one-shot batches of a 3-shot batch) and `predict` ('both', the
  vote) on the 3-shot batch."""
  method, params, frozen, batch = both
  other_text = dict(batch)
  other_text["text@dsv"] = batch["text@dsv"][::-1]
  other_support = dict(batch)
  for key in ("support_images@sam", "support_masks", "support_images"):
    other_support[key] = batch[key][::-1]
  k3 = make_batch(method, k=3, seed=2)
  rows = _rows(batch, other_text, other_support, *[_shot(k3, j) for j in range(3)])
  # prompt_dropout: keys whose draw is 'both', 'semantic', 'visual' (the loss's own rule).
  drop = get_method(tiny_config(prompt_dropout=0.5))
  draws = {}
  for i in range(64):
    u = float(jax.random.uniform(jax.random.split(jax.random.PRNGKey(i))[0]))
    draws.setdefault(dsv_lfs.PROMPT_MODES[2 if u < 0.25 else 1 if u < 0.5 else 0], i)
  keys = jnp.stack([jax.random.PRNGKey(draws[m]) for m in dsv_lfs.PROMPT_MODES])

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(params, rows, k3):
    return dict(modes=method.predict_modes(params, frozen, rows),
                vote=method.predict(params, frozen, k3),
                dropout=jax.vmap(lambda key: drop.loss(params, frozen, batch, key))(keys))

  out = jax.tree.map(np.asarray, run(params, rows, k3))
  split = {m: np.split(v, 6) for m, v in out["modes"].items()}  # 6 groups of 2 rows
  return out, split


# ----------------------------------------------------------------------------------------
# Dense matching.


def test_block_correlation_hand_checked_value():
  q = np.zeros((1, 1, 2, 2), np.float32)
  q[0, 0, 0] = (3.0, 4.0)   # |q| = 5
  q[0, 0, 1] = (-1.0, 0.0)
  s = np.zeros((1, 1, 1, 2), np.float32)
  s[0, 0, 0] = (4.0, 3.0)   # |s| = 5: cos = 24 / 25
  corr = dm.block_correlation([jnp.asarray(q), jnp.asarray(q)], [jnp.asarray(s)] * 2)
  assert corr.shape == (1, 1, 2, 1, 1, 2)
  # (3*4 + 4*3) / ((5 + 1e-5)^2) and the negative cosine clamped at 0
  np.testing.assert_allclose(np.asarray(corr[0, 0, 0, 0, 0]), [24 / (5 + 1e-5) ** 2] * 2,
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(corr[0, 0, 1, 0, 0]), [0.0, 0.0])


def test_dense_matching_shapes_and_published_names():
  mod = dm.DenseMatching(channels=(4, 8, 12))
  q = [jnp.ones((2, 5, 5, 5))] * 3
  s = [jnp.ones((2, 4, 4, 5))] * 3
  shapes = jax.eval_shape(mod.init, jax.random.PRNGKey(0), q, s)  # no threefry compile
  flat = base.leaf_paths(shapes)
  v = base.merge(dict(zip(flat, dsv_lfs.host_init_values(
      list(flat), [x.shape for x in flat.values()], np.uint32([0, 1])))), {})
  paths = base.leaf_paths(v["params"])
  assert "encoder_layerFewshot/layers_0/conv1/kernel" in paths
  assert paths["encoder_layerFewshot/layers_0/conv1/kernel"].shape == (3, 3, 3, 4)  # 3 blocks in
  assert paths["encoder_layerFewshot/layers_6/conv2/kernel"].shape == (3, 3, 8, 12)
  assert paths["decoderFewshot/layers_2/kernel"].shape == (3, 3, 12, 12)
  out = jax.jit(mod.apply)(v, q, s)
  assert out.shape == (2, 5, 5, 12) and out.dtype == jnp.float32
  assert float(jnp.min(out)) >= 0.0  # ends with a ReLU, as published


def test_support_mask_geometry():
  rng = np.random.default_rng(0)
  m = (rng.random((2, 16, 16)) > 0.5).astype(np.float32)
  sq = dm.support_mask_at(jnp.asarray(m), jnp.full((2, 2), 16), 16, (5, 5))
  ref = resize_bilinear(jnp.asarray(m)[..., None], (5, 5), align_corners=True)[..., 0]
  np.testing.assert_allclose(np.asarray(sq), np.asarray(ref), atol=1e-6)
  # Longest side: a 16 x 8 image in a 16 x 16 view: columns 8.. are padding (0); the image
  # part is the mask nearest-resized to 16 x 8.
  hw = jnp.asarray([[16, 8], [16, 8]])
  full = dm.support_mask_at(jnp.asarray(m), hw, 16, (16, 16))
  assert float(jnp.abs(full[:, :, 8:]).max()) == 0.0
  np.testing.assert_allclose(np.asarray(full[:, :, :8]), m[:, :, ::2], atol=1e-6)


def test_masks_to_scored_view_is_sam_postprocess():
  rng = np.random.default_rng(1)
  low = rng.normal(size=(1, 8, 8)).astype(np.float32)
  h, w = 24, 12  # image inside a 32 x 32 view
  up = interpolation_matrix(8, 32, False)
  big = up @ low[0] @ up.T  # to the 32 x 32 view
  crop = big[:h, :w]
  ref = interpolation_matrix(h, 10, False) @ crop @ interpolation_matrix(w, 10, False).T
  out = dm.masks_to_scored_view(jnp.asarray(low), jnp.asarray([[h, w]]), 32, (10, 10))
  np.testing.assert_allclose(np.asarray(out[0]), ref, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Text.


def test_conversation_ends_with_the_sem_answer(both):
  method = both[0]
  tok = method.text
  ids = tok.encode("striped star")
  assert ids[-tok.answer_length:] == tok.answer_ids
  assert tok.answer_ids[tok.sem_offset] == tok.sem_id == 49152  # added after SmolLM2's vocab
  assert ids.count(dsv_lfs.IMAGE_TOKEN_INDEX) == 4
  assert method.llm_config.vocab_size == 49153
  assert "striped" in tok.tok.decode([i for i in ids if i >= 0])


def test_description_noise_is_deterministic_and_partial():
  d = {"a": "One. Two. Three. Four.", "b": "Five. Six. Seven. Eight."}
  n1 = dsv_lfs.noisy_descriptions(d, 0.5, seed=3)
  assert n1 == dsv_lfs.noisy_descriptions(d, 0.5, seed=3)
  assert dsv_lfs.noisy_descriptions(d, 0.0) == d
  for name, text in n1.items():
    kept = [s for s in dsv_lfs.split_attributes(text) if s in d[name]]
    assert len(kept) == 2  # half of the 4 attributes dropped or swapped
  with pytest.raises(ValueError, match="fraction"):
    dsv_lfs.noisy_descriptions(d, 1.5)


# ----------------------------------------------------------------------------------------
# Parameters, loss, modes.


def test_trainable_set(both):
  _, params, frozen, _ = both
  p, f = base.leaf_paths(params), base.leaf_paths(frozen)
  assert any("q_proj/lora_A" in k for k in p) and any("v_proj/lora_B" in k for k in p)
  assert "language_model/model/embed_tokens/embedding" in p
  assert any(k.startswith("text_hidden_fcs/") for k in p)
  assert any(k.startswith("sam/mask_decoder/") for k in p)
  assert any(k.startswith("dense_matching/encoder_layerFewshot") for k in p)
  assert any(k.startswith("multi_modal_projector/") for k in p)  # 'sam' tower: trained
  assert "language_model/model/layers_0/self_attn/q_proj/kernel" in f
  assert not any(k.startswith(("sam/vision_encoder", "sam/prompt_encoder")) for k in p)
  assert not any("k_proj" in k or "mlp" in k for k in p if k.startswith("language_model"))


def test_train_step_lowers_loss_and_keeps_the_frozen_base(both, trained):
  _, _, frozen, _ = both
  before = jax.tree.map(np.asarray, frozen)
  losses, aux, p = trained
  assert losses[-1] < 0.9 * losses[0] and losses == sorted(losses, reverse=True), losses
  assert float(aux["ce_loss"]) > 0
  new = base.leaf_paths(p)
  lora_b = [k for k in new if "lora_B" in k]
  assert lora_b and all(float(jnp.abs(new[k]).max()) > 0 for k in lora_b)  # moved from zero
  for k, v in base.leaf_paths(frozen).items():  # the frozen base never changes
    np.testing.assert_array_equal(np.asarray(v), base.leaf_paths(before)[k])


def test_prompt_modes_use_what_they_should(both, predictions):
  out, split = predictions
  b0, bt, bs = split["both"][:3]
  assert not np.allclose(b0, bt) and not np.allclose(b0, bs)
  s0, st, ss = split["semantic"][:3]
  np.testing.assert_array_equal(s0, ss)  # no support used
  assert not np.allclose(s0, st)
  v0, vt, vs = split["visual"][:3]
  np.testing.assert_array_equal(v0, vt)  # no text used
  assert not np.allclose(v0, vs)
  assert not np.allclose(b0, v0) and not np.allclose(b0, s0)
  # `predict` of a model built for one mode traces exactly that mode of predict_modes.
  method, params, frozen, batch = both
  for mode in ("semantic", "visual"):
    variant = get_method(tiny_config(eval_prompt_mode=mode))
    mine = jax.make_jaxpr(variant.predict)(params, frozen, batch)
    shared = jax.make_jaxpr(lambda p, f, b, m=mode: method.predict_modes(p, f, b, (m,))[m])(
        params, frozen, batch)
    assert str(mine) == str(shared), mode


def test_kshot_vote(predictions):
  out, split = predictions
  one = [split["both"][3 + j] > 0 for j in range(3)]  # the three one-shot passes
  votes = np.sum(one, axis=0)
  expect = 2 * votes >= np.maximum(votes.max(axis=(1, 2), keepdims=True), 1)
  assert 0 < expect.sum() < expect.size and not np.array_equal(one[0], one[1])
  np.testing.assert_array_equal(out["vote"] > 0, expect)


def test_scan_layers_gives_the_same_semantic_prompt(both):
  """`model.scan_layers` (the demo): the LLM's layers under nn.scan, parameters stacked by
  `stack_layers` (as `load_pretrained` stacks a checkpoint), the same [SEM] prompt and CE."""
  from fssjax.nn import llama as nl  # pylint: disable=import-outside-toplevel
  method, params, frozen, batch = both
  scan = get_method(tiny_config(scan_layers=True))
  p = base.merge(params, frozen)
  ps = dict(p, language_model=nl.stack_layers(p["language_model"]))
  shapes = jax.eval_shape(scan.init, jax.random.PRNGKey(0), batch)["language_model"]
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(
      lambda x: x.shape, ps["language_model"])
  q_emb = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 32)), jnp.float32)
  key = jax.random.PRNGKey(0)
  (a, ce_a), (b, ce_b) = jax.jit(lambda p, ps: (
      method._semantic(p, batch, q_emb, key, False),  # pylint: disable=protected-access
      scan._semantic(ps, batch, q_emb, key, False)),  # pylint: disable=protected-access
      compiler_options=FAST_COMPILE)(p, ps)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(ce_b), float(ce_a), rtol=1e-5)


def test_prompt_dropout_step_is_the_drawn_modes_step(both, trained, predictions):
  """A prompt-dropout step (one pass, the drawn mode's logits and CE kept) has the loss of
  that single mode: 'both' the plain model's loss (the train fixture's first loss), and
  'semantic' / 'visual' the CE (the same LLM pass; 0 without the LLM) plus BCE and Dice of
  that mode's prediction."""
  batch = both[3]
  out, split = predictions
  total, aux = out["dropout"]  # rows: PROMPT_MODES ('both', 'semantic', 'visual')
  np.testing.assert_allclose(total[0], trained[0][0], rtol=1e-5)
  ce = aux["ce_loss"]
  assert ce[0] > 0 and ce[1] == ce[0] and ce[2] == 0
  target = (batch["query_mask"] == 1).astype(jnp.float32)
  valid = jnp.ones_like(target)
  for i, mode in enumerate(dsv_lfs.PROMPT_MODES):
    logits = jnp.asarray(split[mode][0])  # predict_modes on the same batch
    bce = float(jnp.mean(dsv_lfs.sigmoid_bce(logits, target, valid)))
    dice = float(jnp.mean(dsv_lfs.dice_loss(logits, target, valid)))
    np.testing.assert_allclose(aux["mask_bce_loss"][i], bce, rtol=1e-4, err_msg=mode)
    np.testing.assert_allclose(total[i], ce[i] + 2.0 * bce + 0.5 * dice, rtol=1e-4,
                               err_msg=mode)


def test_configs_and_missing_inputs():
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import dsv_lfs_coco, dsv_lfs_pascal  # pylint: disable=import-outside-toplevel
  c = dsv_lfs_coco.get_config("fold=1")
  assert c.data.test_episodes == 2000 and c.data.image_size == 400
  assert c.model.sam_resize == "longest_side" and c.optimizer.lr == 3e-4
  lines = dsv_lfs.DSVLFS.missing_inputs(c)
  assert any("model.llava" in x for x in lines) and any("model.sam" in x for x in lines)
  c = dsv_lfs_coco.get_config("sam=/nonexistent/sam")
  assert any("/nonexistent/sam" in x for x in dsv_lfs.DSVLFS.missing_inputs(c))
  assert dsv_lfs.DSVLFS.missing_inputs(dsv_lfs_coco.get_config("demo")) == []
  p = dsv_lfs_pascal.get_config("fold=2,prompt=visual,cross=coco20i,cross_root=/c")
  assert p.data.dataset == "pascal5i" and p.model.prompt_mode == "visual"
  # Cross-domain (RePRI's protocol): all COCO classes (fold -1) minus the 15 PASCAL fold 2
  # trained on.
  assert p.evals.cross.data.dataset == "coco20i" and p.evals.cross.data.fold == -1
  assert p.evals.cross.data.cross_domain_from == "pascal5i:2" and p.data.cross_domain_from == ""
  from fssjax import evaluators  # pylint: disable=import-outside-toplevel
  from fssjax.data import sources  # pylint: disable=import-outside-toplevel
  cross = evaluators._config_with_data(p, p.evals.cross.data)  # pylint: disable=protected-access
  assert len(sources.fold_classes_for(cross.data, "test")) == 65
  c = dsv_lfs_coco.get_config("fold=3,cross=pascal5i,cross_fold=1")
  cross = evaluators._config_with_data(c, c.evals.cross.data)  # pylint: disable=protected-access
  # PASCAL fold 1 tests bus, car, cat, chair, cow; COCO fold 3 trained on bus, car, chair.
  assert sources.fold_classes_for(cross.data, "test") == [7, 9]
  d = dsv_lfs_coco.get_config("demo")
  assert {k: dict(v.get("model", {})) for k, v in d.evals.items()} == {
      "both": {}, "visual": {"eval_prompt_mode": "visual"},
      "semantic": {"eval_prompt_mode": "semantic"}}


# ----------------------------------------------------------------------------------------
# Scale-out: 8 simulated devices.


_EIGHT = textwrap.dedent("""
    import sys, jax, numpy as np
    sys.path.insert(0, "tests")
    from test_dsv_lfs import tiny_config, FAST_COMPILE
    from fssjax import sharding as shd, train
    from fssjax.methods import get_method, base
    assert jax.device_count() == 8
    saved = dict(np.load(sys.argv[1]))
    tree = lambda prefix: base.merge({k[len(prefix):]: v for k, v in saved.items()
                                      if k.startswith(prefix)}, {})
    params, frozen, batch = tree("params/"), tree("frozen/"), tree("batch/")
    batch = {k: np.concatenate([v] * 4) for k, v in batch.items()}  # 8 rows, same loss
    c = tiny_config(remat=True)
    c.train.batch_size = 8
    c.train.fsdp = 8
    method = get_method(c)
    mesh = shd.make_mesh(fsdp=8, devices=8)
    setup = train.build_setup(c, method, mesh, batch)  # the trainer's shardings
    params = jax.device_put(params, setup.state_shardings["params"])
    frozen = jax.device_put(frozen, setup.frozen_shardings)
    emb = params["language_model"]["model"]["embed_tokens"]["embedding"]
    lin = frozen["sam"]["vision_encoder"]["layers_0"]["mlp"]["lin1"]["kernel"]
    for name, x in (("embed", emb), ("sam lin1", lin)):
      assert not x.sharding.is_fully_replicated, name
      assert x.addressable_shards[0].data.size * 8 == x.size, (name, x.sharding)
    gb = shd.global_batch(batch, mesh)
    with jax.set_mesh(mesh):
      loss, _ = jax.jit(method.loss, compiler_options=FAST_COMPILE)(
          params, frozen, gb, jax.random.PRNGKey(0))
    print("LOSS8", repr(float(loss)))
""")


def test_sharded_over_eight_devices_same_loss(both, trained, tmp_path):
  """The trainer's shardings on 8 simulated devices split the LLM embedding and a SAM
  encoder kernel 8 ways, and the sharded loss (remat on) equals the 1-device loss at the
  same parameters (the first loss of the train-step fixture)."""
  _, params, frozen, batch = both
  path = str(tmp_path / "tree.npz")
  flat = {f"params/{k}": np.asarray(v) for k, v in base.leaf_paths(params).items()}
  flat.update({f"frozen/{k}": np.asarray(v) for k, v in base.leaf_paths(frozen).items()})
  flat.update({f"batch/{k}": np.asarray(v) for k, v in batch.items()})
  np.savez(path, **flat)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _EIGHT, path], env=env, capture_output=True,
                       text=True, cwd=root, timeout=600)
  assert out.returncode == 0 and "LOSS8" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
  loss8 = float(out.stdout.split("LOSS8")[1].split()[0])
  loss1 = trained[0][0]
  assert abs(loss1 - loss8) < 1e-4 * abs(loss1), (loss1, loss8)
