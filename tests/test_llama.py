"""LLaMA decoder and loaders against transformers' LlamaForCausalLM (fixtures made by
scripts/make_llama_fixtures.py; no torch here)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fssjax.nn import llama as nl
from fssjax.weights import llama as wl
from parity import assert_close

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "llama")
REF = np.load(os.path.join(FIXTURES, "reference.npz"))


def _ref(name):
  return {k.split("/", 1)[1]: REF[k] for k in REF.files if k.startswith(name + "/")}


def _forward(config, params, r, **kw):
  model = nl.LlamaForCausalLM(config, **kw)
  fwd = jax.jit(lambda p, ids, mask, pos: model.apply(
      {"params": p}, ids, attention_mask=mask, positions=pos)["logits"])
  return fwd(params, r["input_ids"], r["attention_mask"], r["position_ids"])


def _assert_logits(actual, r, what):
  keep = r["attention_mask"].astype(bool)  # padded queries attend to nothing: undefined
  assert_close(np.asarray(actual)[keep], r["logits"][keep], 1e-4, what)


@pytest.fixture(scope="module")
def loaded():
  return {name: wl.load(os.path.join(FIXTURES, name))
          for name in ("tied", "llama3", "linear")}


@pytest.mark.parametrize("name", ["tied", "llama3", "linear"])
def test_hf_parity(loaded, name):
  config, params = loaded[name]
  assert config.tie_word_embeddings == (name == "tied")
  assert ("lm_head" in params) == (name != "tied")
  if name == "llama3":  # sharded index + rope scaling + biases
    assert config.rope_scaling.rope_type == "llama3" and config.attention_bias
  _assert_logits(_forward(config, params, _ref(name)), _ref(name), name)


@pytest.mark.parametrize("name", ["tied", "llama3"])
def test_gguf_parity(loaded, name):
  config, params = wl.load(os.path.join(FIXTURES, f"{name}.gguf"))
  hf_config, hf_params = loaded[name]
  assert config.num_key_value_heads == 2
  assert config.tie_word_embeddings == hf_config.tie_word_embeddings
  assert config.rope_theta == pytest.approx(hf_config.rope_theta)
  if name == "llama3":  # rope scaling arrives as llama.cpp's rope_freqs factors
    np.testing.assert_allclose(nl.rope_inv_freq(config), nl.rope_inv_freq(hf_config), rtol=1e-6)
  # The permutation is undone: q/k weights equal the transformers ones.
  q = params["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(q, hf_params["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"])
  _assert_logits(_forward(config, params, _ref(name)), _ref(name), name + ".gguf")


def test_permutation_roundtrip_and_not_identity():
  w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)
  p = wl.permute_qk(w, 4)
  assert not np.array_equal(p, w)
  np.testing.assert_array_equal(wl.unpermute_qk(p, 4), w)
  # llama.cpp pairs (x_i, x_{i + d/2}) of each head: row 1 of head 0 is transformers' row 8.
  np.testing.assert_array_equal(p[1], w[8])


def test_generation_with_cache_matches_transformers_and_full_decoding(loaded):
  config, params = loaded["llama3"]
  r = _ref("llama3")
  model = nl.LlamaForCausalLM(config)
  ids, mask = jnp.asarray(r["input_ids"]), jnp.asarray(r["attention_mask"])
  gen = jax.jit(lambda p, i, m: nl.generate(model, p, i, m, max_new_tokens=6))
  tokens, lengths = gen(params, ids, mask)
  np.testing.assert_array_equal(np.asarray(tokens), r["greedy"])
  np.testing.assert_array_equal(np.asarray(lengths), [6, 6])
  # Without a cache: the whole sequence again for every new token, argmax of the last logits
  # (one fixed length; the not-yet-generated tail cannot affect earlier positions).
  t = ids.shape[1]
  seq = np.concatenate([np.asarray(ids), np.zeros((2, 6), np.int32)], 1)
  m = np.concatenate([np.asarray(mask), np.ones((2, 6), np.int32)], 1)
  pos = jnp.asarray(np.clip(np.cumsum(m, -1) - 1, 0, None))
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, attention_mask=jnp.asarray(m),
                                         positions=pos)["logits"])
  for j in range(6):
    seq[:, t + j] = np.asarray(jnp.argmax(fwd(params, jnp.asarray(seq))[:, t + j - 1], -1))
  np.testing.assert_array_equal(seq[:, t:], r["greedy"])


def test_stop_tokens_and_sampling(loaded):
  config, params = loaded["tied"]
  r = _ref("tied")
  model = nl.LlamaForCausalLM(config)
  ids, mask = jnp.asarray(r["input_ids"]), jnp.asarray(r["attention_mask"])

  # One compilation: the stop id is traced (-5 never occurs: no stopping).
  run = jax.jit(lambda stops, t, rng: _generate_with_stops(model, params, ids, mask, stops, t,
                                                           rng))
  key = jax.random.PRNGKey(1)
  greedy, _ = run(jnp.int32(-5), 0.0, key)
  stop = int(greedy[0, 2])
  tokens, lengths = run(jnp.int32(stop), 0.0, key)
  first_stop = int(np.argmax(np.asarray(greedy[0]) == stop))
  assert int(lengths[0]) == first_stop + 1
  assert (np.asarray(tokens[0, first_stop + 1:]) == -1).all()
  a, _ = run(jnp.int32(-5), 1.0, key)
  b, _ = run(jnp.int32(-5), 1.0, key)
  c, _ = run(jnp.int32(-5), 5.0, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(np.asarray(c), np.asarray(greedy))


def _generate_with_stops(model, params, ids, mask, stop, temperature, rng):
  """nl.generate with a traced stop id (stop_ids only needs to be a sequence of ints/arrays)."""
  return nl.generate(model, params, ids, mask, max_new_tokens=6, stop_ids=[stop],
                     temperature=temperature, rng=rng, pad_id=-1)


def test_inputs_embeds_equals_ids(loaded):
  config, params = loaded["tied"]
  r = _ref("tied")
  model = nl.LlamaForCausalLM(config)
  ids = jnp.asarray(r["input_ids"])

  @jax.jit
  def run(p):
    emb = model.apply({"params": p}, ids, method=model.embed)
    return (model.apply({"params": p}, ids)["logits"],
            model.apply({"params": p}, inputs_embeds=emb)["logits"],
            model.apply({"params": p}, inputs_embeds=emb.at[:, 10].add(1.0))["logits"], emb)

  a, b, c, emb = run(params)
  np.testing.assert_allclose(a, b, atol=1e-6)
  # Changing one embedding changes the logits from that position on only (causal).
  np.testing.assert_allclose(a[:, :10], c[:, :10], atol=1e-6)
  assert np.abs(np.asarray(a[:, 10:] - c[:, 10:])).max() > 1e-3
  with pytest.raises(ValueError, match="exactly one"):
    model.apply({"params": params}, ids, inputs_embeds=emb)


def test_bf16_and_remat(loaded):
  config, params = loaded["llama3"]
  r = _ref("llama3")
  logits = _forward(config, params, r, dtype=jnp.bfloat16)
  assert logits.dtype == jnp.float32
  keep = r["attention_mask"].astype(bool)
  err = np.abs(np.asarray(logits)[keep] - r["logits"][keep]).max()
  assert err < 0.05 * np.abs(r["logits"]).max(), err
  ids = jnp.asarray(r["input_ids"])

  def loss(p, remat):
    out = nl.LlamaForCausalLM(config, remat=remat).apply({"params": p}, ids)["logits"]
    return jax.nn.logsumexp(out, -1).mean()

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g1, g2 = grad(params, False), grad(params, True)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_scan_layers_equals_unrolled(loaded):
  config, params = loaded["llama3"]
  r = _ref("llama3")
  stacked = nl.stack_layers(params)
  assert stacked["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 96)
  jax.tree.map(np.testing.assert_array_equal, nl.unstack_layers(stacked), params)
  _assert_logits(_forward(config, stacked, r, scan_layers=True), r, "scan_layers")
  model = nl.LlamaForCausalLM(config, scan_layers=True)
  tokens, _ = jax.jit(lambda p: nl.generate(model, p, jnp.asarray(r["input_ids"]),
                                            jnp.asarray(r["attention_mask"]),
                                            max_new_tokens=6))(stacked)
  np.testing.assert_array_equal(np.asarray(tokens), r["greedy"])


@pytest.mark.parametrize("name", ["tied", "llama3"])
def test_expected_shapes_match_the_module(loaded, name):
  config = loaded[name][0]
  shapes = jax.eval_shape(lambda: nl.LlamaForCausalLM(config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
  flat = {tuple(getattr(k, "key", k) for k in path): tuple(x.shape)
          for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  assert flat == wl.expected_shapes(config)


def test_config_inferred_from_shapes(tmp_path, loaded):
  d = tmp_path / "m"
  shutil.copytree(os.path.join(FIXTURES, "tied"), d)
  raw = json.loads((d / "config.json").read_text())
  for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_key_value_heads", "tie_word_embeddings", "head_dim"):
    raw.pop(k)
  (d / "config.json").write_text(json.dumps(raw))
  config, _ = wl.load(str(d))
  assert config == loaded["tied"][0]


def test_bad_checkpoints_name_file_and_key(tmp_path):
  from safetensors.numpy import load_file, save_file
  d = tmp_path / "m"
  shutil.copytree(os.path.join(FIXTURES, "tied"), d)
  st = d / "model.safetensors"
  state = load_file(str(st))
  bad = dict(state)
  bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"][:, :5]
  save_file(bad, str(st))
  with pytest.raises(ValueError, match=r"model\.safetensors.*up_proj.*shape \(96, 5\).*\(96, 64\)"):
    wl.load(str(d))
  bad = dict(state)
  del bad["model.layers.0.self_attn.v_proj.weight"]
  save_file(bad, str(st))
  with pytest.raises(ValueError, match=r"missing tensors.*layers_0/self_attn/v_proj/kernel"):
    wl.load(str(d))
  save_file(dict(state, **{"model.layers.0.extra.weight": state["model.norm.weight"]}), str(st))
  with pytest.raises(ValueError,
                     match=r"model\.safetensors.*unexpected tensor 'model\.layers\.0\.extra"):
    wl.load(str(d))
  st.write_bytes(b"\x10\x00")
  with pytest.raises(ValueError, match="not a readable safetensors"):
    wl.load(str(d))
  st.unlink()
  (d / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*not read"):
    wl.load(str(d))
  s = tmp_path / "sharded"
  shutil.copytree(os.path.join(FIXTURES, "llama3"), s)
  os.remove(s / "model-00002-of-00002.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    wl.load(str(s))
  g = tmp_path / "bad.gguf"
  g.write_bytes(open(os.path.join(FIXTURES, "tied.gguf"), "rb").read()[:100])
  with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF"):
    wl.load(str(g))
  import gguf
  w = gguf.GGUFWriter(str(g), "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="bad.gguf: general.architecture = 'gpt2'"):
    wl.load(str(g))
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps(dict(cfg, rope_parameters={"rope_type": "yarn",
                                                                       "factor": 2.0})))
  with pytest.raises(ValueError, match="config.json.*'yarn' is not supported"):
    nl.LlamaConfig.from_hf(json.loads((d / "config.json").read_text()),
                           str(d / "config.json"))


def test_partition_specs():
  config = nl.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
  shapes = jax.eval_shape(lambda: nl.LlamaForCausalLM(config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
  specs = nl.partition_specs(shapes, 8)
  P = jax.sharding.PartitionSpec
  layer = specs["model"]["layers_0"]
  assert specs["model"]["embed_tokens"]["embedding"] == P(None, "fsdp")
  assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", None)
  assert layer["mlp"]["down_proj"]["kernel"] == P("fsdp", None)
  assert layer["input_layernorm"]["weight"] == P()
  assert nl.partition_specs(shapes, 1)["lm_head"]["kernel"] == P()
  assert nl.param_spec(("x", "kernel"), (6, 10), 4) == P()  # nothing divisible


_SHARDED = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {tests!r})
    from fssjax import sharding as shd
    from fssjax.nn import llama as nl
    from fssjax.weights import llama as wl
    assert jax.device_count() == 8
    config, params = wl.load(os.path.join({fixtures!r}, "llama3"))
    ref = np.load(os.path.join({fixtures!r}, "reference.npz"))
    ids = jnp.asarray(ref["llama3/input_ids"])
    model = nl.LlamaForCausalLM(config)
    fwd = lambda p, x: model.apply({{"params": p}}, x)["logits"]
    single = np.asarray(jax.jit(fwd)(params, ids))
    mesh = shd.make_mesh(fsdp=8)
    sh = nl.param_shardings(params, mesh)
    sharded = jax.device_put(params, sh)
    q = sharded["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (8, 64), q.addressable_shards[0].data.shape
    with jax.set_mesh(mesh):
      out = np.asarray(jax.jit(fwd)(sharded, ids))
    err = np.abs(out - single).max()
    assert err < 1e-5, err
    print("OK", err)
""")


def test_sharded_forward_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  code = _SHARDED.format(tests=os.path.dirname(__file__), fixtures=FIXTURES)
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_local_lm_on_a_transformers_directory(tmp_path):
  """LocalLM.load(dir) (weights + tokenizer.json): bucketed, left-padded batched generation
  and scoring reproduce transformers' greedy continuation and logits."""
  import tokenizers
  from fssjax.priors.local_lm import LocalLM
  d = tmp_path / "linear"
  shutil.copytree(os.path.join(FIXTURES, "linear"), d)
  vocab = {f"t{i}": i for i in range(128)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece()  # joins with spaces
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({
      "eos_token": "t0", "pad_token": "t0",
      "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}))
  lm = LocalLM.load(str(d), min_prompt_bucket=16, min_new_bucket=8)
  assert lm.model_id == "linear" and lm.tokenizer.stop_ids == (0,)
  r = _ref("linear")
  prompts = [r["input_ids"][0].tolist(), r["input_ids"][1, 5:].tolist()]  # row 1 unpadded
  np.testing.assert_array_equal(lm.generate(prompts, max_new_tokens=6), r["greedy"])
  text = " ".join(f"t{i}" for i in prompts[0])
  assert lm.tokenizer.encode(text) == prompts[0]
  logp = jax.nn.log_softmax(r["logits"][0, :-1])
  expected = -np.asarray(logp)[np.arange(23), prompts[0][1:]]
  np.testing.assert_allclose(lm.token_nll(prompts[0]), expected, atol=1e-4)
  assert lm.score(text) == pytest.approx(expected.mean(), abs=1e-4)
  answer = lm.chat([{"role": "user", "content": text}], max_new_tokens=6)
  assert answer == " ".join(f"t{i}" for i in r["greedy"][0])
