"""Dense cosine correlation between query and support feature maps (HSNet's hypercorrelation).

For every layer pair: channel L2-normalise each feature vector (norm + eps, eps = 1e-5 as
published), take all query x support dot products, clamp at 0. Correlations of the layers that
belong to one pyramid level (same backbone stage) are stacked as channels, giving one 4D tensor
per level in our channels-last layout `[B, Hq, Wq, Hs, Ws, n_layers]` (the published code uses
`[B, n, Hq, Wq, Hs, Ws]`; the channel order is the same: layer order within the stage).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

EPS = 1e-5


def l2_normalize(x: jnp.ndarray, eps: float = EPS) -> jnp.ndarray:
  """x / (||x||_2 + eps) over the last (channel) axis; the norm is computed in float32.

  Zero vectors (masked-out support positions) stay zero with a zero gradient, like PyTorch's
  `norm` backward (a plain `sqrt` would give NaN gradients there).
  """
  x32 = x.astype(jnp.float32)
  sq = jnp.sum(x32 * x32, axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return (x32 / (norm + eps)).astype(x.dtype)


def cosine_correlation(query_feat: jnp.ndarray, support_feat: jnp.ndarray,
                       eps: float = EPS) -> jnp.ndarray:
  """Clamped cosine similarity of every query position with every support position.

  Args:
    query_feat: [B, Hq, Wq, C].
    support_feat: [B, Hs, Ws, C].
    eps: added to the L2 norms.

  Returns:
    [B, Hq, Wq, Hs, Ws], max(cos, 0), in the features' dtype.
  """
  if query_feat.ndim != 4 or support_feat.ndim != 4:
    raise ValueError(f"cosine_correlation expects [B,H,W,C] maps, got {query_feat.shape} and "
                     f"{support_feat.shape}")
  if query_feat.shape[-1] != support_feat.shape[-1]:
    raise ValueError(f"channel mismatch: query {query_feat.shape}, support {support_feat.shape}")
  q = l2_normalize(query_feat, eps)
  s = l2_normalize(support_feat, eps)
  corr = jnp.einsum("bijc,bklc->bijkl", q, s)
  return jnp.maximum(corr, 0)


def multilayer_correlation(query_feats: Sequence[jnp.ndarray],
                           support_feats: Sequence[jnp.ndarray],
                           level_sizes: Sequence[int],
                           eps: float = EPS) -> list[jnp.ndarray]:
  """Per-layer correlations stacked into pyramid levels.

  Args:
    query_feats: list of [B, Hq_l, Wq_l, C_l], ordered from the shallowest to the deepest layer.
    support_feats: the matching (masked) support features [B, Hs_l, Ws_l, C_l].
    level_sizes: number of layers per level from the shallowest level, for example
      (4, 6, 3) for ResNet-50 (layer2, layer3, layer4); must sum to len(query_feats).
    eps: added to the L2 norms.

  Returns:
    One tensor per level, ordered from the DEEPEST level to the shallowest (published order
    [corr_l4, corr_l3, corr_l2]), each [B, Hq, Wq, Hs, Ws, n_level].
  """
  if len(query_feats) != len(support_feats):
    raise ValueError(f"{len(query_feats)} query features vs {len(support_feats)} support features")
  if sum(level_sizes) != len(query_feats):
    raise ValueError(f"level_sizes {tuple(level_sizes)} sum to {sum(level_sizes)}, but there are "
                     f"{len(query_feats)} feature maps")
  corrs = [cosine_correlation(q, s, eps) for q, s in zip(query_feats, support_feats)]
  levels = []
  start = 0
  for n in level_sizes:
    levels.append(jnp.stack(corrs[start:start + n], axis=-1))
    start += n
  return levels[::-1]
