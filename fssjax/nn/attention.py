"""Multi-head attention for the Stable-Diffusion UNet, the VAE and the CLIP text encoder.

One module, `MultiHeadAttention`, computes softmax attention with `jax.nn.dot_product_attention`
(XLA picks the kernel by default; `implementation='cudnn'` asks for the fused cuDNN kernel on
GPU, which needs bf16/fp16 inputs). Its projections are named like diffusers' `Attention`
(`to_q`, `to_k`, `to_v`, `to_out`) so checkpoint conversion is a renaming of paths.

DiffewS K/V bank. A self-attention can attend to extra keys and values taken from another pass
of the same network (the support pass):

  y, (k, v) = SelfAttention(...)(x, return_kv=True)            # support pass: record own K/V
  y = SelfAttention(...)(x_query, kv_bank=(k_extra, v_extra))   # query pass: append them

With `kv_bank=(k_extra, v_extra)` the keys are `concat([own_k, k_extra], axis=1)` and the
values likewise (own tokens first, as DiffewS does); queries stay the query's own. The K/V that
`return_kv` returns and that `kv_bank` takes are the outputs of the `to_k` / `to_v` projections
**before the head split**: arrays [B, S, heads * head_dim]. Several supports go into one bank by
concatenating their tokens: [B, K * S, heads * head_dim] (see `fssjax.nn.unet.merge_support_bank`).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
KV = Tuple[Array, Array]


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
                          is_causal: bool = False, upcast: bool = False,
                          implementation: Optional[str] = None) -> Array:
  """Softmax attention with scale 1/sqrt(head_dim).

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, N, H] keys.
    v: [B, S, N, H] values.
    mask: optional boolean mask broadcastable to [B, N, T, S]; True = attend.
    is_causal: causal masking (token t attends to tokens <= t).
    upcast: compute the attention in float32 whatever the input dtype (diffusers'
      `upcast_attention`); the output is cast back to `q.dtype`. Ignored with
      implementation='cudnn', which needs bf16/fp16 inputs and already accumulates the
      logits and the softmax in float32.
    implementation: None (XLA chooses), 'xla' or 'cudnn'.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  out_dtype = q.dtype
  if upcast and implementation != "cudnn":
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                     implementation=implementation)
  return out.astype(out_dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head attention with diffusers' projection names.

  Attributes:
    num_heads: number of heads N.
    head_dim: channels per head H; the inner width is N * H.
    out_features: output channels D of `to_out` (the query's channels in SD and CLIP).
    qkv_bias: bias in `to_q`, `to_k`, `to_v` (False in the SD UNet, True in the VAE and CLIP).
    out_bias: bias in `to_out`.
    upcast: compute the attention itself in float32 (diffusers' `upcast_attention`).
    implementation: `jax.nn.dot_product_attention` implementation (None = XLA chooses).
    dtype: computation dtype (for example jnp.bfloat16); params stay `param_dtype`.
    param_dtype: parameter dtype.
  """

  num_heads: int
  head_dim: int
  out_features: int
  qkv_bias: bool = False
  out_bias: bool = True
  upcast: bool = False
  implementation: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  def setup(self):
    inner = self.num_heads * self.head_dim
    dense = lambda feats, bias, name: nn.Dense(  # noqa: E731
        feats, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    self.to_q = dense(inner, self.qkv_bias, "to_q")
    self.to_k = dense(inner, self.qkv_bias, "to_k")
    self.to_v = dense(inner, self.qkv_bias, "to_v")
    self.to_out = dense(self.out_features, self.out_bias, "to_out")

  def project_kv(self, context: Array) -> KV:
    """Key and value projections of `context` [B, S, D] -> ([B, S, N*H], [B, S, N*H])."""
    return self.to_k(context), self.to_v(context)

  def __call__(self, x: Array, context: Optional[Array] = None, *,
               kv_bank: Optional[KV] = None, return_kv: bool = False,
               mask: Optional[Array] = None, is_causal: bool = False):
    """Attends from `x` to `context` (self-attention when `context` is None).

    Args:
      x: [B, T, D] queries' input.
      context: [B, S, Dc] keys'/values' input; None for self-attention.
      kv_bank: optional (k_extra, v_extra), each [B, S_extra, N*H], appended after the own
        keys/values along the token axis (the DiffewS support bank).
      return_kv: also return the own (k, v), each [B, S, N*H] (before the head split, and
        without the bank).
      mask: optional boolean mask broadcastable to [B, N, T, S_total]; True = attend.
      is_causal: causal self-attention (CLIP text encoder).

    Returns:
      y [B, T, out_features], or (y, (k, v)) when `return_kv`.
    """
    ctx = x if context is None else context
    q = self.to_q(x)
    k, v = self.project_kv(ctx)
    own_kv = (k, v)
    if kv_bank is not None:
      k_extra, v_extra = kv_bank
      for name, own, extra in (("key", k, k_extra), ("value", v, v_extra)):
        if extra.ndim != 3 or extra.shape[0] != own.shape[0] or extra.shape[2] != own.shape[2]:
          raise ValueError(
              f"kv_bank {name} has shape {tuple(extra.shape)}; expected [B={own.shape[0]}, "
              f"S_extra, {own.shape[2]}]")
      k = jnp.concatenate([k, k_extra.astype(k.dtype)], axis=1)
      v = jnp.concatenate([v, v_extra.astype(v.dtype)], axis=1)
    b, t, _ = q.shape
    s = k.shape[1]
    heads = lambda a, n: a.reshape(b, n, self.num_heads, self.head_dim)  # noqa: E731
    y = dot_product_attention(heads(q, t), heads(k, s), heads(v, s), mask=mask,
                              is_causal=is_causal, upcast=self.upcast,
                              implementation=self.implementation)
    y = self.to_out(y.reshape(b, t, self.num_heads * self.head_dim))
    if return_kv:
      return y, own_kv
    return y


class SelfAttention(MultiHeadAttention):
  """Self-attention with the DiffewS K/V bank.

  `SelfAttention(...)(x, kv_bank=None, return_kv=False)`.

  Same parameters and semantics as `MultiHeadAttention` with `context=None`.
  """

  def __call__(self, x: Array, kv_bank: Optional[KV] = None, return_kv: bool = False, *,
               mask: Optional[Array] = None, is_causal: bool = False):
    return super().__call__(x, None, kv_bank=kv_bank, return_kv=return_kv, mask=mask,
                            is_causal=is_causal)
