"""Parity of fssjax.nn.unet / fssjax.nn.attention with diffusers and the DiffewS K/V bank.

References are diffusers 0.42 outputs stored in tests/fixtures/diffusers (regenerate with
scripts/make_diffusers_fixtures.py). Everything runs in float32; outputs have magnitudes ~1-3,
and we require max |ours - reference| <= 1e-4 * max(1, max |reference|) (observed ~3e-6).
Each jitted UNet program is built once per fixture and shared between tests (compiles dominate
the run time on CPU).
"""

from __future__ import annotations

import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fssjax.nn.attention import MultiHeadAttention, SelfAttention
from fssjax.nn.unet import (BasicTransformerBlock, UNet2DConditionModel, UNetConfig,
                            kv_bank_keys, merge_support_bank)
from fssjax.weights.diffusers import load_unet
from parity import FIXTURES, assert_close  # tests/parity.py


@functools.lru_cache(maxsize=None)
def reference() -> dict:
  with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
    return {k: f[k] for k in f.files}


@functools.lru_cache(maxsize=None)
def unet(name: str):
  """(module, params, jitted apply) for a fixture UNet; the jitted function is shared."""
  module, params = load_unet(os.path.join(FIXTURES, name))

  @functools.partial(jax.jit, static_argnames=("return_kv",))
  def apply(params, sample, t, context, kv_bank=None, conv_in_override=None, return_kv=False):
    return module.apply({"params": params}, sample, t, context, kv_bank=kv_bank,
                        return_kv=return_kv, conv_in_override=conv_in_override)

  return module, params, apply


@pytest.mark.parametrize("name", ["sd15_tiny", "sd21_tiny", "unet_variants"])
def test_unet_matches_diffusers(name):
  ref = reference()
  _, params, apply = unet(name)
  out = apply(params, ref[f"{name}/sample"], ref[f"{name}/timesteps"], ref[f"{name}/context"])
  assert_close(out, ref[f"{name}/out"], what=name)


def _conv_nhwc_oihw(x, w, b):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "OIHW", "NHWC")) + b


def test_kv_bank_matches_diffews_reference():
  """Support pass (8-channel conv_in override, 2 shots) records attn1 K/V; query pass appends."""
  ref = reference()
  module, params, apply = unet("sd21_tiny")
  shots = 2
  feats = _conv_nhwc_oihw(ref["sd21_tiny/support"], ref["sd21_tiny/conv_in_ref_weight"],
                          ref["sd21_tiny/conv_in_ref_bias"])
  _, kv = apply(params, None, jnp.ones((4,), jnp.int32), ref["sd21_tiny/support_context"],
                conv_in_override=feats, return_kv=True)
  assert tuple(kv) == kv_bank_keys(module.config)
  first = str(ref["sd21_tiny/bank_first_key"])
  assert_close(kv[first][0], ref["sd21_tiny/bank_first_k"], what="support K")
  assert_close(kv[first][1], ref["sd21_tiny/bank_first_v"], what="support V")
  for key, (k, v) in kv.items():
    assert k.shape == v.shape and k.shape[0] == 4, (key, k.shape)

  bank = merge_support_bank(kv, shots)
  t1 = jnp.ones((2,), jnp.int32)
  with_bank = apply(params, ref["sd21_tiny/sample"], t1, ref["sd21_tiny/context"], kv_bank=bank)
  plain = apply(params, ref["sd21_tiny/sample"], t1, ref["sd21_tiny/context"])
  assert_close(with_bank, ref["sd21_tiny/bank_out"], what="query pass with bank")
  assert_close(plain, ref["sd21_tiny/plain_t1_out"], what="query pass without bank")
  # The bank really changes the prediction (by far more than the tolerance).
  assert np.abs(np.asarray(with_bank) - np.asarray(plain)).max() > 1e-2


def test_empty_kv_bank_is_exactly_the_plain_unet():
  ref = reference()
  module, params, apply = unet("sd15_tiny")
  sample, t, ctx = (ref["sd15_tiny/sample"], ref["sd15_tiny/timesteps"],
                    ref["sd15_tiny/context"])
  _, kv_shapes = jax.eval_shape(
      lambda p: module.apply({"params": p}, sample, t, ctx, return_kv=True), params)
  empty = {k: (jnp.zeros((2, 0, s[0].shape[-1])), jnp.zeros((2, 0, s[1].shape[-1])))
           for k, s in kv_shapes.items()}
  out_empty = apply(params, sample, t, ctx, kv_bank=empty)
  out_plain = apply(params, sample, t, ctx)
  np.testing.assert_array_equal(np.asarray(out_empty), np.asarray(out_plain))


def test_kv_bank_keys_skip_only_cross_attention_blocks():
  module, _, _ = unet("unet_variants")
  # down block 1 / up block 0 use only_cross_attention; the mid block is UNetMidBlock2D.
  expected = (
      "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
      "down_blocks.0.attentions.0.transformer_blocks.1.attn1",
      "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
      "up_blocks.1.attentions.0.transformer_blocks.1.attn1",
      "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
      "up_blocks.1.attentions.1.transformer_blocks.1.attn1",
  )
  assert kv_bank_keys(module.config) == expected


def test_kv_bank_with_wrong_keys_is_rejected():
  ref = reference()
  module, params, _ = unet("sd15_tiny")
  sample, ctx = ref["sd15_tiny/sample"], ref["sd15_tiny/context"]
  bank = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1":
          (jnp.zeros((2, 3, 16)), jnp.zeros((2, 3, 16)))}
  with pytest.raises(ValueError, match="missing"):
    jax.eval_shape(lambda p: module.apply({"params": p}, sample, 1, ctx, kv_bank=bank), params)
  with pytest.raises(ValueError, match="encoder_hidden_states"):
    jax.eval_shape(lambda p: module.apply({"params": p}, sample, 1, ctx[..., :8]), params)


def test_merge_support_bank_groups_the_shots_of_each_query():
  k = jnp.arange(4 * 3 * 2, dtype=jnp.float32).reshape(4, 3, 2)  # B=2 queries x K=2 shots
  merged = merge_support_bank({"a": (k, -k)}, 2)["a"]
  assert merged[0].shape == (2, 6, 2)
  np.testing.assert_array_equal(merged[0][1], np.concatenate([k[2], k[3]]))
  np.testing.assert_array_equal(merged[1][0], -np.concatenate([k[0], k[1]]))
  with pytest.raises(ValueError, match="num_shots"):
    merge_support_bank({"a": (k[:3], k[:3])}, 2)


def random_params(module, *args, seed=0):
  """Parameters of `module` drawn with numpy (cheaper than an eager `init` on CPU)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape).astype(np.float32)), shapes)


def _attention_reference(x, bank, p, heads):
  """numpy multi-head softmax attention over [own; bank] keys/values."""
  q = x @ p["to_q"]["kernel"]
  k = x @ p["to_k"]["kernel"]
  v = x @ p["to_v"]["kernel"]
  if bank is not None:
    k = np.concatenate([k, bank[0]], 1)
    v = np.concatenate([v, bank[1]], 1)
  b, t, c = q.shape
  hd = c // heads
  split = lambda a: a.reshape(b, -1, heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
  logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(hd)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  y = (w @ split(v)).transpose(0, 2, 1, 3).reshape(b, t, c)
  return y @ p["to_out"]["kernel"] + p["to_out"]["bias"]


def test_self_attention_kv_bank_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 12)).astype(np.float32)
  bank = (rng.standard_normal((2, 7, 12)).astype(np.float32),
          rng.standard_normal((2, 7, 12)).astype(np.float32))
  attn = SelfAttention(num_heads=3, head_dim=4, out_features=12)
  params = random_params(attn, x)
  p = jax.tree.map(np.asarray, params)
  y, (k, v) = attn.apply({"params": params}, x, kv_bank=bank, return_kv=True)
  np.testing.assert_allclose(y, _attention_reference(x, bank, p, 3), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(k, x @ p["to_k"]["kernel"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v, x @ p["to_v"]["kernel"], rtol=1e-5, atol=1e-5)
  y_plain = attn.apply({"params": params}, x)
  np.testing.assert_allclose(y_plain, _attention_reference(x, None, p, 3), rtol=1e-5, atol=1e-5)
  empty = (np.zeros((2, 0, 12), np.float32), np.zeros((2, 0, 12), np.float32))
  np.testing.assert_array_equal(attn.apply({"params": params}, x, kv_bank=empty), y_plain)
  with pytest.raises(ValueError, match="kv_bank key"):
    attn.apply({"params": params}, x, kv_bank=(bank[0][..., :4], bank[1]))
  # bf16 compute keeps float32 params and stays close to the float32 result.
  attn16 = SelfAttention(num_heads=3, head_dim=4, out_features=12, dtype=jnp.bfloat16)
  y16 = attn16.apply({"params": params}, x, kv_bank=bank)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y, atol=5e-2, rtol=5e-2)


def test_cross_attention_uses_context():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 4, 8)).astype(np.float32)
  ctx = rng.standard_normal((1, 3, 6)).astype(np.float32)
  attn = MultiHeadAttention(num_heads=2, head_dim=4, out_features=8)
  params = random_params(attn, x, ctx, seed=1)
  assert params["to_k"]["kernel"].shape == (6, 8)
  y = attn.apply({"params": params}, x, ctx)
  p = jax.tree.map(np.asarray, params)
  q = x @ p["to_q"]["kernel"]
  k = ctx @ p["to_k"]["kernel"]
  v = ctx @ p["to_v"]["kernel"]
  qs, ks, vs = (a.reshape(1, -1, 2, 4).transpose(0, 2, 1, 3) for a in (q, k, v))
  lg = qs @ ks.transpose(0, 1, 3, 2) / 2.0
  w = np.exp(lg - lg.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  expect = (w @ vs).transpose(0, 2, 1, 3).reshape(1, 4, 8) @ p["to_out"]["kernel"]
  np.testing.assert_allclose(y, expect + p["to_out"]["bias"], rtol=1e-5, atol=1e-5)


def test_remat_keeps_params_and_gradients():
  ref = reference()
  module, params, _ = unet("sd15_tiny")
  # The rematerialised UNet takes the loaded (non-remat) parameter tree as is.
  remat = UNet2DConditionModel(module.config, remat=True)
  out = jax.eval_shape(lambda p: remat.apply({"params": p}, ref["sd15_tiny/sample"], 1,
                                             ref["sd15_tiny/context"]), params)
  assert out.shape == (2, 16, 16, 4)
  # Gradients of one transformer block with and without rematerialisation.
  block = BasicTransformerBlock(8, 2, 4)
  block_remat = flax.linen.remat(BasicTransformerBlock)(8, 2, 4)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 6, 8)), jnp.float32)
  ctx = jnp.ones((1, 3, 5))
  p = random_params(block, x, ctx, seed=2)
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, x, ctx)[0] ** 2)  # noqa: E731
  g1, g2 = jax.jit(lambda p: (jax.grad(loss(block))(p), jax.grad(loss(block_remat))(p)))(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_bf16_unet_keeps_float32_params():
  ref = reference()
  module, params, _ = unet("sd15_tiny")
  bf16 = UNet2DConditionModel(module.config, dtype=jnp.bfloat16)
  out = jax.eval_shape(lambda p: bf16.apply({"params": p}, ref["sd15_tiny/sample"], 1,
                                            ref["sd15_tiny/context"]), params)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 16, 16, 4)
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


BASE = dict(block_out_channels=[16, 32], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=8,
            cross_attention_dim=32, attention_head_dim=2)


@pytest.mark.parametrize("field,value", [
    ("dual_cross_attention", True),
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("time_embedding_type", "fourier"),
    ("encoder_hid_dim", 64),
    ("dropout", 0.1),
    ("resnet_time_scale_shift", "spatial"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
    ("attention_head_dim", [2, 4, 8]),
    ("cross_attention_dim", [32, 64]),
    ("transformer_layers_per_block", [[1, 2], [1]]),
    ("act_fn", "tanh"),
    ("norm_num_groups", None),
    ("made_up_field", 1),
])
def test_unsupported_unet_config_fields_are_named(field, value):
  with pytest.raises(ValueError, match=field):
    UNetConfig.from_diffusers(dict(BASE, **{field: value}))


def test_unet_config_head_counts_and_ignored_fields():
  # diffusers' quirk: attention_head_dim is the number of heads (SD 2.1: [5, 10, 20, 20]).
  cfg = UNetConfig.from_diffusers(dict(BASE, attention_head_dim=[2, 4], _class_name="x"))
  assert cfg.num_heads == (2, 4)
  cfg = UNetConfig.from_diffusers(dict(BASE, num_attention_heads=[1, 2]))
  assert cfg.num_heads == (1, 2)
  with pytest.raises(ValueError, match="in_channels_ref"):
    UNetConfig.from_diffusers(dict(BASE, in_channels_ref=8))
  cfg = UNetConfig.from_diffusers(dict(BASE, in_channels_ref=8),
                                  ignore_fields=("in_channels_ref",))
  assert cfg.in_channels == 4
