"""The UNet's transformer: diffusers' `Transformer2DModel` and `BasicTransformerBlock`, with
the DiffewS K/V bank on every self-attention (attn1).

`Transformer2D` runs GroupNorm, proj_in, `num_layers` `BasicTransformerBlock`s (LayerNorm and
self-attention, LayerNorm and cross-attention, LayerNorm and GEGLU feed-forward, each residual)
and proj_out, plus the residual. The attention itself is fssjax.nn.attention's
`MultiHeadAttention` (`jax.nn.dot_product_attention`); with `collect_kv` each block returns its
attn1's own (k, v), and `kv_bank` appends a bank to attn1's keys and values (see
fssjax.nn.unet for the bank's layout).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fssjax.nn.attention import KV, MultiHeadAttention
from fssjax.nn.unet_blocks import FeedForward, conv, group_norm, layer_norm

Array = jax.Array
Dtype = Any


class BasicTransformerBlock(nn.Module):
  """LN-self-attn, LN-cross-attn, LN-GEGLU, each residual. x [B, N, D], context [B, T, Dc].

  With `only_cross_attention`, attn1 attends to the context too (no self-attention, no bank).
  Returns (x, own (k, v) of attn1 or None).
  """

  dim: int
  num_heads: int
  head_dim: int
  only_cross_attention: bool = False
  upcast: bool = False
  norm_eps: float = 1e-5
  collect_kv: bool = False
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, kv_bank: Optional[KV] = None):
    dt, pdt = self.dtype, self.param_dtype
    attn = lambda name: MultiHeadAttention(  # noqa: E731
        self.num_heads, self.head_dim, self.dim, qkv_bias=False, out_bias=True,
        upcast=self.upcast, implementation=self.implementation, dtype=dt, param_dtype=pdt,
        name=name)
    h = layer_norm(self.norm_eps, dt, pdt, "norm1")(x)
    kv = None
    if self.only_cross_attention:
      if kv_bank is not None:
        raise ValueError("a K/V bank was given to a block with only_cross_attention")
      h = attn("attn1")(h, context)
    elif self.collect_kv:
      h, kv = attn("attn1")(h, kv_bank=kv_bank, return_kv=True)
    else:
      h = attn("attn1")(h, kv_bank=kv_bank)
    x = x + h
    h = layer_norm(self.norm_eps, dt, pdt, "norm2")(x)
    x = x + attn("attn2")(h, context)
    h = layer_norm(self.norm_eps, dt, pdt, "norm3")(x)
    x = x + FeedForward(self.dim, dtype=dt, param_dtype=pdt, name="ff")(h)
    return x, kv


class Transformer2D(nn.Module):
  """diffusers' Transformer2DModel (continuous input): GN, proj_in, blocks, proj_out, residual.

  x [B, H, W, C], context [B, T, Dc]; kv_bank: tuple of per-block (k, v) or None.
  Returns (x, tuple of per-block (k, v) or None).
  """

  num_heads: int
  head_dim: int
  num_layers: int = 1
  norm_groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast: bool = False
  collect_kv: bool = False
  remat: bool = False
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, kv_bank: Optional[Tuple[KV, ...]] = None):
    dt, pdt = self.dtype, self.param_dtype
    b, hh, ww, c = x.shape
    inner = self.num_heads * self.head_dim
    residual = x
    h = group_norm(self.norm_groups, 1e-6, dt, pdt, "norm")(x)
    if self.use_linear_projection:
      h = nn.Dense(inner, dtype=dt, param_dtype=pdt, name="proj_in")(h.reshape(b, hh * ww, c))
    else:
      h = conv(inner, 1, dt, pdt, "proj_in")(h).reshape(b, hh * ww, inner)
    block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    kvs = []
    for i in range(self.num_layers):
      h, kv = block_cls(inner, self.num_heads, self.head_dim,
                        only_cross_attention=self.only_cross_attention, upcast=self.upcast,
                        collect_kv=self.collect_kv, implementation=self.implementation,
                        dtype=dt, param_dtype=pdt, name=f"transformer_blocks_{i}")(
                            h, context, None if kv_bank is None else kv_bank[i])
      kvs.append(kv)
    if self.use_linear_projection:
      h = nn.Dense(c, dtype=dt, param_dtype=pdt, name="proj_out")(h).reshape(b, hh, ww, c)
    else:
      h = conv(c, 1, dt, pdt, "proj_out")(h.reshape(b, hh, ww, inner))
    return h + residual, (tuple(kvs) if self.collect_kv else None)
