"""LLaVA-1.5 (CLIP tower, projector, LLaMA with spliced image features) and its loaders
against transformers' LlavaForConditionalGeneration (fixtures made by
scripts/make_llava_fixtures.py; no torch here)."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fssjax.nn import llama as nl
from fssjax.nn import llava as nv
from fssjax.weights import llava as wv
from parity import assert_close

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "llava")
REF = np.load(os.path.join(FIXTURES, "reference.npz"))
IDS, PIXELS = REF["input_ids"], REF["pixel_values"]


@pytest.fixture(scope="module")
def hf():
  return wv.load_llava(os.path.join(FIXTURES, "hf"))


_JITTED = {}


def _forward(config, params, ids=IDS, pixels=PIXELS, **kw):
  """A jitted forward, compiled once per (config, options)."""
  key = (config, tuple(sorted(kw.items())))
  if key not in _JITTED:
    model = nv.LlavaForConditionalGeneration(config, **kw)
    _JITTED[key] = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x))
  return _JITTED[key](params, ids, pixels)


def test_hf_parity_and_image_features(hf):
  config, params = hf
  assert config.image_token_index == 60 and config.image_seq_length == 16
  out = _forward(config, params)
  assert_close(out["image_features"], REF["image_features"], 1e-4, "image features")
  assert_close(out["logits"], REF["logits"], 1e-4, "logits")
  # hidden are the final-norm states: the head of them is the logits.
  model = nv.LlavaForConditionalGeneration(config)
  head = model.apply({"params": params}, out["hidden"],
                     method=lambda m, h: m.language_model.head(h))
  np.testing.assert_allclose(head, out["logits"], atol=1e-5)


@pytest.mark.parametrize("name", ["hub_old", "v452"])
def test_other_hf_namings_load_the_same(hf, name):
  """Old hub names (sharded, sparse config inferred from shapes) and transformers 4.52 names."""
  config, params = wv.load_llava(os.path.join(FIXTURES, name))
  if name == "hub_old":  # its sparse config.json has no pad_token_id
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, pad_token_id=0))
  assert config == hf[0]
  jax.tree.map(np.testing.assert_array_equal, params, hf[1])


def test_original_layout_with_separate_tower(hf):
  config, params = wv.load_llava(os.path.join(FIXTURES, "original"),
                                 vision_tower=os.path.join(FIXTURES, "clip"))
  assert config.image_token_index == wv.ORIGINAL_IMAGE_TOKEN_INDEX == -200
  assert config.vision == hf[0].vision and config.text == hf[0].text
  jax.tree.map(np.testing.assert_array_equal, params, hf[1])
  ids = np.where(IDS == 60, -200, IDS)  # the original code's IMAGE_TOKEN_INDEX
  assert_close(_forward(config, params, ids)["logits"], REF["logits"], 1e-4, "original")
  with pytest.raises(ValueError, match=r"keeps the CLIP tower apart.*vision_tower="):
    wv.load_llava(os.path.join(FIXTURES, "original"))
  # Only some parts (the LLM skipped): the same config, those subtrees only.
  for name, kw in (("hf", {}), ("original", {"vision_tower": os.path.join(FIXTURES, "clip")})):
    cfg, part = wv.load_llava(os.path.join(FIXTURES, name), parts=("vision_tower",
                                                                   "multi_modal_projector"), **kw)
    assert set(part) == {"vision_tower", "multi_modal_projector"} and cfg.text == hf[0].text
    jax.tree.map(np.testing.assert_array_equal, part["multi_modal_projector"],
                 hf[1]["multi_modal_projector"])
  with pytest.raises(ValueError, match=r"parts = \('llm',\); expected a non-empty subset"):
    wv.load_llava(os.path.join(FIXTURES, "hf"), parts=("llm",))


def test_original_layout_with_embedded_tower(tmp_path, hf):
  d = tmp_path / "orig"
  shutil.copytree(os.path.join(FIXTURES, "original"), d)
  state = load_file(str(d / "model.safetensors"))
  tower = load_file(os.path.join(FIXTURES, "clip", "model.safetensors"))
  state.update({"model.vision_tower.vision_tower.vision_model." + k: v for k, v in tower.items()})
  save_file(state, str(d / "model.safetensors"))
  config, params = wv.load_llava(str(d))
  # Without a tower config, the heads follow openai CLIP's width / 64 (at least 1).
  assert config.vision.num_attention_heads == 1 and config.vision.hidden_size == 16
  jax.tree.map(np.testing.assert_array_equal, params["vision_tower"], hf[1]["vision_tower"])
  config, params = wv.load_llava(str(d), vision_tower=hf[0].vision)
  assert config.vision == hf[0].vision
  ids = np.where(IDS == 60, -200, IDS)
  assert_close(_forward(config, params, ids)["logits"], REF["logits"], 1e-4, "embedded tower")


def test_precomputed_features_and_scan_layers(hf):
  config, params = hf
  model = nv.LlavaForConditionalGeneration(config)
  feats = jax.jit(lambda p: model.apply({"params": p}, PIXELS, method=model.image_features))(
      params)
  assert feats.shape == (2, 16, 24)
  out = jax.jit(lambda p, f: model.apply({"params": p}, IDS, image_features=f))(params, feats)
  assert_close(out["logits"], REF["logits"], 1e-4, "precomputed features")
  stacked = {**params, "language_model": nl.stack_layers(params["language_model"])}
  assert_close(_forward(config, stacked, scan_layers=True)["logits"], REF["logits"], 1e-4,
               "scan_layers")


def test_splicing_order_and_counts(hf):
  """Image features fill the image-token positions row-major, one patch per position; a
  count mismatch is a clear error; text positions keep their embeddings."""
  config, params = hf
  model = nv.LlavaForConditionalGeneration(config)
  feats = jnp.arange(2 * 16 * 24, dtype=jnp.float32).reshape(2, 16, 24)
  emb = params["language_model"]["model"]["embed_tokens"]["embedding"][np.where(IDS == 60, 0,
                                                                                  IDS)]
  spliced = jax.jit(nv.splice_image_features)(emb, IDS == 60, feats.reshape(-1, 24))
  np.testing.assert_array_equal(spliced[0, 3:19], feats[0])
  np.testing.assert_array_equal(spliced[1, 8:24], feats[1])
  np.testing.assert_array_equal(spliced[0, :3], emb[0, :3])
  np.testing.assert_array_equal(spliced[1, 24:], emb[1, 24:])
  # Swapping the two images changes each row's logits (the features reach their own row).
  fwd = jax.jit(lambda p, f: model.apply({"params": p}, IDS, image_features=f)["logits"])
  a, b = fwd(params, feats), fwd(params, feats[::-1])
  assert np.abs(np.asarray(a[:, 10]) - np.asarray(b[:, 10])).max() > 1e-3
  np.testing.assert_array_equal(a[0, :3], b[0, :3])  # before the image: unchanged
  with pytest.raises(ValueError, match=r"input_ids hold 16 image tokens \(id 60\) but the "
                                       r"images give 32 features.*expand_image_tokens"):
    model.apply({"params": params}, IDS[:1], PIXELS)
  with pytest.raises(ValueError, match=r"hold 32 image tokens.*give 0 features"):
    model.apply({"params": params}, IDS)
  with pytest.raises(ValueError, match="not both"):
    model.apply({"params": params}, IDS, PIXELS, image_features=feats)
  assert nv.expand_image_tokens([5, 60, 7], 60, 3) == [5, 60, 60, 60, 7]
  assert nv.count_image_tokens(IDS, 60) == 32


def test_resize_token_embeddings_for_sem_token(hf):
  config, params = hf
  new_config, new = nv.resize_token_embeddings(config, params, 65)
  assert new_config.text.vocab_size == 65 and config.text.vocab_size == 64
  lm, old_lm = new["language_model"], params["language_model"]
  emb = lm["model"]["embed_tokens"]["embedding"]
  assert emb.shape == (65, 24) and lm["lm_head"]["kernel"].shape == (24, 65)
  np.testing.assert_array_equal(emb[:64], old_lm["model"]["embed_tokens"]["embedding"])
  np.testing.assert_allclose(emb[64], old_lm["model"]["embed_tokens"]["embedding"].mean(0),
                             atol=1e-6)
  out = _forward(new_config, new)
  assert out["logits"].shape == (2, 30, 65)
  assert_close(out["logits"][..., :64], REF["logits"], 1e-4, "old vocabulary unchanged")
  # A [SEM] token in the text changes the hidden state at its position.
  ids = IDS.copy()
  ids[0, -1] = 64
  h = _forward(new_config, new, ids)["hidden"]
  assert np.abs(np.asarray(h[0, -1] - out["hidden"][0, -1])).max() > 1e-3
  _, normal = nl.resize_token_embeddings(config.text, params["language_model"], 66,
                                         init="normal", rng=jax.random.PRNGKey(0))
  assert abs(float(np.std(normal["model"]["embed_tokens"]["embedding"][64:])) - 0.02) < 0.015
  with pytest.raises(ValueError, match="needs rng"):
    nl.resize_token_embeddings(config.text, params["language_model"], 66, init="normal")
  # Tied embeddings (SmolLM2): only the table grows, no lm_head appears.
  tied = {"model": {"embed_tokens": {"embedding": np.arange(8, dtype=np.float32).reshape(4, 2)}}}
  cfg, out = nl.resize_token_embeddings(
      dataclasses.replace(config.text, tie_word_embeddings=True, vocab_size=4), tied, 5)
  assert "lm_head" not in out and cfg.vocab_size == 5
  np.testing.assert_array_equal(out["model"]["embed_tokens"]["embedding"][4], [3.0, 4.0])


def test_partition_specs_shard_tower_and_llm(hf):
  """fssjax.nn.llama.partition_specs applies to the whole LLaVA tree (fsdp over 8)."""
  specs = nl.partition_specs(hf[1], 8)
  P = jax.sharding.PartitionSpec
  lm, tower = specs["language_model"]["model"], specs["vision_tower"]
  assert lm["layers_0"]["self_attn"]["q_proj"]["kernel"] == P("fsdp", None)
  assert tower["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"] == P("fsdp", None)
  assert specs["multi_modal_projector"]["linear_1"]["kernel"] == P("fsdp", None)
  assert tower["embeddings"]["class_embedding"] == P()


def test_config_and_checkpoint_errors(tmp_path):
  d = tmp_path / "m"
  shutil.copytree(os.path.join(FIXTURES, "hf"), d)
  st = d / "model.safetensors"
  state = load_file(str(st))
  bad = dict(state)
  bad["multi_modal_projector.linear_1.weight"] = bad["multi_modal_projector.linear_1.weight"][:, :4]
  save_file(bad, str(st))
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'multi_modal_projector\."
                                       r"linear_1\.weight' has shape \(24, 4\); expected "
                                       r"\(24, 16\)"):
    wv.load_llava(str(d))
  save_file(dict(state, **{"image_newline": state["multi_modal_projector.linear_1.bias"]}), str(st))
  with pytest.raises(ValueError, match=r"unexpected tensor 'image_newline'; a llava-hf"):
    wv.load_llava(str(d))
  bad = dict(state)
  del bad["language_model.model.layers.1.mlp.up_proj.weight"]
  save_file(bad, str(st))
  with pytest.raises(ValueError, match=r"missing tensors.*layers_1/mlp/up_proj/kernel"):
    wv.load_llava(str(d))
  save_file(state, str(st))
  raw = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps(dict(raw, vision_feature_select_strategy="cls")))
  with pytest.raises(ValueError, match=r"config\.json: vision_feature_select_strategy = 'cls'"):
    wv.load_llava(str(d))
  (d / "config.json").write_text(json.dumps(dict(raw, model_type="blip")))
  with pytest.raises(ValueError, match=r"model_type = 'blip' and no mm_\* fields"):
    wv.load_llava(str(d))
  o = tmp_path / "o"
  shutil.copytree(os.path.join(FIXTURES, "original"), o)
  raw = json.loads((o / "config.json").read_text())
  (o / "config.json").write_text(json.dumps(dict(raw, mm_projector_type="linear")))
  with pytest.raises(ValueError, match=r"mm_projector_type = 'linear'; LLaVA-1\.5"):
    wv.load_llava(str(o), vision_tower=os.path.join(FIXTURES, "clip"))
  (o / "config.json").write_text(json.dumps(raw))
  (o / "model.safetensors").rename(o / "pytorch_model.bin")
  with pytest.raises(ValueError, match="PyTorch pickle.*allow_pickle"):
    wv.load_llava(str(o), vision_tower=os.path.join(FIXTURES, "clip"))
