"""LoRA (Hu et al. 2021) in PEFT's layout: the layer, the LLaMA hooks, training only the
factors, merging, and PEFT adapters against peft's own forward (fixtures made by
scripts/make_llava_fixtures.py; no torch here)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

from fssjax.nn import llama as nl
from fssjax.nn import llava as nv
from fssjax.nn import lora
from fssjax.weights import llava as wv
from fssjax.weights import lora as wlo
from parity import assert_close

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "llava")
ADAPTER = os.path.join(FIXTURES, "adapter")
REF = np.load(os.path.join(FIXTURES, "reference.npz"))
IDS, PIXELS = REF["input_ids"], REF["pixel_values"]
TINY = nl.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def hf():
  return wv.load_llava(os.path.join(FIXTURES, "hf"))


def test_lora_dense_init_and_forward():
  layer = lora.LoRADense(6, rank=3, alpha=6.0, use_bias=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 40))
  p = layer.init(jax.random.PRNGKey(1), x)["params"]
  assert p["kernel"].shape == (40, 6) and p["bias"].shape == (6,)
  a, b = p["lora_A"]["kernel"], p["lora_B"]["kernel"]
  assert a.shape == (40, 3) and b.shape == (3, 6)
  assert (b == 0).all() and 0.1 < np.abs(a).max() <= 1 / np.sqrt(40)  # PEFT kaiming-uniform
  y0 = layer.apply({"params": p}, x)
  np.testing.assert_array_equal(y0, x @ p["kernel"] + p["bias"])  # fresh: exactly the base
  p["lora_B"]["kernel"] = jnp.ones((3, 6))
  y = layer.apply({"params": p}, x)
  np.testing.assert_allclose(y, x @ p["kernel"] + p["bias"] + 2.0 * (x @ a @ p["lora_B"]["kernel"]),
                             atol=1e-5)  # scale alpha / r = 2
  # rsLoRA scale alpha / sqrt(r).
  rs = lora.LoRADense(6, rank=3, alpha=6.0, use_rslora=True).apply({"params": p}, x)
  np.testing.assert_allclose(rs - y0, (y - y0) * np.sqrt(3.0), atol=1e-5)  # (6/sqrt 3) / 2
  # Dropout only with deterministic=False and a 'dropout' rng; it acts on the LoRA input only.
  dl = lora.LoRADense(6, rank=3, alpha=6.0, dropout=0.5, deterministic=False)
  np.testing.assert_array_equal(dl.apply({"params": p}, x), y)
  yd = dl.apply({"params": p}, x, rngs={"dropout": jax.random.PRNGKey(2)})
  assert np.abs(np.asarray(yd - y)).max() > 1e-3
  p0 = dict(p, lora_B={"kernel": jnp.zeros((3, 6))})
  np.testing.assert_array_equal(
      dl.apply({"params": p0}, x, rngs={"dropout": jax.random.PRNGKey(2)}), y0)


def test_rank_zero_is_the_plain_decoder_and_lora_adds_only_factors():
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 32
  plain = jax.jit(nl.LlamaForCausalLM(TINY).init)(jax.random.PRNGKey(0), ids)["params"]
  cfg = dataclasses.replace(TINY, lora_rank=4, lora_alpha=8.0,
                            lora_targets=("q_proj", "v_proj", "down_proj"))
  with_lora = jax.jit(nl.LlamaForCausalLM(cfg).init)(jax.random.PRNGKey(0), ids)["params"]
  factors, base = lora.split_lora(with_lora)
  jax.tree.map(np.testing.assert_array_equal, base, plain)  # the same base, bit for bit
  layer = factors["model"]["layers_1"]
  assert set(layer["self_attn"]) == {"q_proj", "v_proj"} and set(layer["mlp"]) == {"down_proj"}
  assert layer["self_attn"]["v_proj"]["lora_A"]["kernel"].shape == (16, 4)
  assert layer["self_attn"]["v_proj"]["lora_B"]["kernel"].shape == (4, 8)
  a = jax.jit(nl.LlamaForCausalLM(TINY).apply)({"params": plain}, ids)["logits"]
  b = jax.jit(nl.LlamaForCausalLM(cfg).apply)({"params": with_lora}, ids)["logits"]
  np.testing.assert_array_equal(a, b)  # B = 0 at init
  with pytest.raises(ValueError, match=r"lora_targets \['lm_head'\] are not dense layers"):
    dataclasses.replace(TINY, lora_rank=2, lora_targets=("q_proj", "lm_head")).validate()
  # add_lora_params on a loaded (plain) tree gives the same structure as the LoRA init.
  added = lora.add_lora_params(plain, jax.random.PRNGKey(3), rank=4,
                               targets=("q_proj", "v_proj", "down_proj"))
  assert jax.tree.structure(added) == jax.tree.structure(with_lora)
  stacked = lora.add_lora_params(nl.stack_layers(plain), jax.random.PRNGKey(3), rank=4,
                                 targets=("q_proj",))
  qa = stacked["model"]["layers"]["self_attn"]["q_proj"]["lora_A"]["kernel"]
  assert qa.shape == (2, 16, 4) and not np.array_equal(qa[0], qa[1])
  with pytest.raises(ValueError, match=r"no module named one of \('qproj',\)"):
    lora.add_lora_params(plain, jax.random.PRNGKey(3), rank=4, targets=("qproj",))
  specs = nl.partition_specs(with_lora, 8)
  P = jax.sharding.PartitionSpec
  assert specs["model"]["layers_0"]["self_attn"]["q_proj"]["lora_B"]["kernel"] == P()
  assert specs["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"] == P("fsdp", None)


def test_training_changes_only_the_factors(hf):
  """AdamW on the LoRA factors of LLaVA's LLM (dropout on): the loss falls, the factors move,
  and every frozen parameter (tower, projector, LLM base) is bit-identical afterwards."""
  config, params = hf
  cfg = dataclasses.replace(config, text=dataclasses.replace(
      config.text, lora_rank=4, lora_alpha=16.0, lora_dropout=0.05))
  params = {**params, "language_model": lora.add_lora_params(
      params["language_model"], jax.random.PRNGKey(0), rank=4, targets=("q_proj", "v_proj"))}
  model = nv.LlavaForConditionalGeneration(cfg, deterministic=False)
  mask = lora.lora_mask(params)
  assert sum(jax.tree.leaves(mask)) == 8  # 2 layers x (q, v) x (A, B)
  feats = jax.jit(lambda p: nv.LlavaForConditionalGeneration(cfg).apply(
      {"params": p}, PIXELS, method="image_features"))(params)
  targets = jnp.asarray(np.roll(IDS, -1, 1) % 60)

  def loss_fn(trainable, frozen, rng):
    p = lora.merge_trees(frozen, trainable)
    logits = model.apply({"params": p}, IDS, image_features=feats, rngs={"dropout": rng})["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  trainable, frozen = lora.split_lora(params)
  opt = optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.0)
  state = opt.init(trainable)

  @jax.jit
  def step(trainable, state, rng):
    loss, g = jax.value_and_grad(loss_fn)(trainable, frozen, rng)
    updates, state = opt.update(g, state, trainable)
    return optax.apply_updates(trainable, updates), state, loss

  losses = []
  t = trainable
  for i in range(4):
    t, state, loss = step(t, state, jax.random.PRNGKey(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  new = lora.merge_trees(frozen, t)
  _, new_frozen = lora.split_lora(new)
  jax.tree.map(np.testing.assert_array_equal, new_frozen, frozen)
  moved = jax.tree.map(lambda a, b: bool(np.abs(np.asarray(a) - np.asarray(b)).max() > 0), t,
                       trainable)
  assert all(jax.tree.leaves(moved))
  # The masked optimizer over the whole tree leaves the frozen leaves bit-identical too.
  mopt = optax.masked(optax.adamw(1e-2), mask)

  @jax.jit
  def masked_step(p):
    upd, _ = mopt.update(jax.tree.map(jnp.ones_like, p), mopt.init(p), p)
    return optax.apply_updates(p, jax.tree.map(lambda u, m: u if m else jnp.zeros_like(u),
                                               upd, mask))

  stepped = masked_step(params)
  jax.tree.map(np.testing.assert_array_equal, lora.split_lora(stepped)[1],
               lora.split_lora(params)[1])


def test_peft_adapter_parity_and_merge(hf):
  config, params = hf
  cfg, p = wlo.apply_peft_adapter(config, params, ADAPTER)
  assert (cfg.text.lora_rank, cfg.text.lora_alpha, cfg.text.lora_targets,
          cfg.text.lora_dropout) == (4, 16.0, ("q_proj", "v_proj"), 0.05)
  model = nv.LlavaForConditionalGeneration(cfg)
  out = jax.jit(lambda q: model.apply({"params": q}, IDS, PIXELS)["logits"])(p)
  assert_close(out, REF["lora_logits"], 1e-4, "adapter")
  assert np.abs(REF["lora_logits"] - REF["logits"]).max() > 0.1  # the adapter matters
  merged = wlo.merge_lora(p, cfg.text.lora_alpha)
  assert not jax.tree.leaves(lora.split_lora(merged)[0])
  plain = nv.LlavaForConditionalGeneration(config)
  out_m = jax.jit(lambda q: plain.apply({"params": q}, IDS, PIXELS)["logits"])(merged)
  np.testing.assert_allclose(out_m, out, atol=1e-5)
  # scan_layers trees get stacked factors.
  stacked = {**params, "language_model": nl.stack_layers(params["language_model"])}
  cfg_s, p_s = wlo.apply_peft_adapter(config, stacked, ADAPTER)
  assert p_s["language_model"]["model"]["layers"]["self_attn"]["v_proj"]["lora_B"][
      "kernel"].shape == (2, 4, 12)
  out_s = jax.jit(lambda q: nv.LlavaForConditionalGeneration(cfg_s, scan_layers=True).apply(
      {"params": q}, IDS, PIXELS)["logits"])(p_s)
  np.testing.assert_allclose(out_s, out, atol=1e-5)


def test_adapter_of_a_plain_llama_and_errors(tmp_path, hf):
  config, params = hf
  state = load_file(os.path.join(ADAPTER, "adapter_model.safetensors"))
  with open(os.path.join(ADAPTER, "adapter_config.json")) as f:
    raw = json.load(f)
  d = tmp_path / "a"
  d.mkdir()

  def write(st, **cfg):
    save_file(st, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(dict(raw, **cfg)))

  # A LlamaForCausalLM adapter (base_model.model.model.layers...) on the LLM alone.
  write({k.replace("model.language_model.", "model."): v for k, v in state.items()},
        target_modules=["q_proj", "v_proj"])
  text, lm = wlo.apply_peft_adapter(config.text, params["language_model"], str(d))
  _, p = wlo.apply_peft_adapter(config, params, ADAPTER)
  jax.tree.map(np.testing.assert_array_equal, lm, p["language_model"])
  settings, _ = wlo.load_peft_adapter(str(d))
  assert settings.targets == ("q_proj", "v_proj") and settings.r == 4
  with pytest.raises(ValueError, match=r"adapter has r = 4, lora_alpha = 16\.0.*model config "
                                       r"has lora_rank = 8"):
    wlo.load_peft_adapter(str(d), dataclasses.replace(config.text, lora_rank=8))
  with pytest.raises(ValueError, match="already hold LoRA factors"):
    wlo.apply_peft_adapter(text, lm, str(d))
  key = "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight"
  write(dict(state, **{key: np.zeros((4, 16), np.float32)}))
  with pytest.raises(ValueError, match=r"adapts the vision tower; fssjax loads LoRA factors of "
                                       r"the LLaMA decoder layers only"):
    wlo.load_peft_adapter(str(d))
  b_key = "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_B.weight"
  write({k: v for k, v in state.items() if k != b_key})
  with pytest.raises(ValueError, match=r"layers_1/self_attn/v_proj has lora_A but no lora_B"):
    wlo.load_peft_adapter(str(d))
  write(dict(state, **{b_key: np.zeros((12, 3), np.float32)}))
  with pytest.raises(ValueError, match=r"has shape \(12, 3\); with r = 4"):
    wlo.load_peft_adapter(str(d))
  write(state, use_dora=True)
  with pytest.raises(ValueError, match="use_dora = True is not supported"):
    wlo.load_peft_adapter(str(d))
  write({k: v for k, v in state.items() if "layers.1." not in k})
  with pytest.raises(ValueError, match=r"no factors for \['layers_1/self_attn/q_proj'"):
    wlo.apply_peft_adapter(config, params, str(d))
  os.remove(d / "adapter_model.safetensors")
  with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
    wlo.load_peft_adapter(str(d))
  with pytest.raises(ValueError, match=r"merge_lora: .*q_proj has \['lora_A'\]"):
    lora.merge_lora({"q_proj": {"kernel": np.zeros((2, 2)),
                                "lora_A": {"kernel": np.zeros((2, 1))}}}, 1.0)
