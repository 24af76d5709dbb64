"""LoRA: low-rank adaptation of a frozen dense layer (Hu et al., "LoRA: Low-Rank Adaptation of
Large Language Models", 2021), with the parameter names and initialisation of Hugging Face
PEFT (`peft/tuners/lora/layer.py`, `LoraLayer.reset_lora_parameters` and `Linear.forward`).

  y = x @ kernel + bias + scale * (dropout(x) @ lora_A @ lora_B)
  scale = alpha / r            (alpha / sqrt(r) with `use_rslora`, Kalajdzievski 2023)

`kernel` [in, out] (and `bias` [out]) are the frozen pretrained weights, at the same paths as
an `nn.Dense` of the same name, so a checkpoint loads unchanged. `lora_A/kernel` [in, r] is
initialised like PEFT's `kaiming_uniform_(a=sqrt(5))`, i.e. uniform(-1/sqrt(in), 1/sqrt(in)),
and `lora_B/kernel` [r, out] with zeros, so a fresh adapter leaves the output unchanged
(PEFT stores them as torch `lora_A.weight` [r, in] and `lora_B.weight` [out, r]: transposes).
Dropout acts on the input of the LoRA branch only (PEFT's `lora_dropout`); it is active when
`deterministic=False` and the `apply` call gets `rngs={'dropout': key}`.

Training only the factors: select the leaves whose path contains `lora_A` or `lora_B`
(`lora_mask`, or the path pattern `lora_(A|B)`); the frozen kernel then receives no update.
`merge_lora` folds trained factors into the kernels (kernel + scale * A @ B) and drops them,
giving the parameters of the plain model (`lora_rank=0`).

Tree helpers work on any parameter tree (nested dicts), including `nn.scan`-stacked layers
whose kernels carry a leading [layers] axis ([L, in, out] -> A [L, in, r], B [L, r, out]).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

LORA_NAMES = ("lora_A", "lora_B")


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
  """alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT `LoraLayer.update_layer`)."""
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive; got r = {rank}")
  return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def kaiming_uniform_a(fan_in: int):
  """PEFT's lora_A init: torch `kaiming_uniform_(a=sqrt(5))` = uniform(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class LoRADense(nn.Module):
  """A dense layer [..., in] -> [..., out] with a frozen kernel and trainable LoRA factors.

  Attributes:
    features: output width.
    rank: r (> 0). alpha: LoRA alpha (scale alpha / r). dropout: rate on the LoRA input.
    use_rslora: scale alpha / sqrt(r) instead.
    use_bias: a frozen bias [out] (as the wrapped layer has).
    deterministic: no dropout (also when no 'dropout' rng is given).
    dtype / param_dtype / kernel_init / bias_init: as `nn.Dense` (the frozen kernel is created
      exactly as `nn.Dense` would, so the base parameters match a plain model's).
  Input any float dtype; output in `dtype` (or the promoted input dtype).
  """

  features: int
  rank: int
  alpha: float = 8.0
  dropout: float = 0.0
  use_rslora: bool = False
  use_bias: bool = True
  deterministic: bool = True
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    base = nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                    bias_init=self.bias_init, parent=None)
    # The frozen kernel/bias live directly in this module's scope (paths `<name>/kernel`).
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    params = {"kernel": kernel}
    if self.use_bias:
      params["bias"] = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    y = base.apply({"params": params}, x)
    h = x
    if self.dropout > 0 and not self.deterministic and self.has_rng("dropout"):
      h = nn.Dropout(self.dropout, deterministic=False)(h)
    h = nn.Dense(self.rank, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=kaiming_uniform_a(x.shape[-1]), name="lora_A")(h)
    h = nn.Dense(self.features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.initializers.zeros_init(), name="lora_B")(h)
    scale = lora_scale(self.alpha, self.rank, self.use_rslora)
    return y + (h * jnp.asarray(scale, h.dtype)).astype(y.dtype)


# ----------------------------------------------------------------------------------------------
# Tree helpers.


def _is_dict(x) -> bool:
  return isinstance(x, dict) or hasattr(x, "items") and not hasattr(x, "shape")


def is_lora_path(path: Sequence[Any]) -> bool:
  """True for a parameter path (keys or jax KeyEntries) inside a lora_A / lora_B factor."""
  keys = [getattr(k, "key", k) for k in path]
  return any(k in LORA_NAMES for k in keys)


def lora_mask(params) -> Any:
  """A bool pytree like `params`: True on LoRA factors (for `optax.masked` / partitioning)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_lora_path(p), params)


def split_lora(params) -> tuple[dict, dict]:
  """(lora-only tree, base tree without LoRA factors) of a nested-dict parameter tree."""
  lora, base = {}, {}
  for k, v in params.items():
    if k in LORA_NAMES:
      lora[k] = v
    elif _is_dict(v):
      sub_l, sub_b = split_lora(v)
      if sub_l:
        lora[k] = sub_l
      base[k] = sub_b
    else:
      base[k] = v
  return lora, base


def merge_trees(a: dict, b: dict) -> dict:
  """Recursive union of two nested dicts (b's leaves win on a clash)."""
  out = dict(a)
  for k, v in b.items():
    if k in out and _is_dict(out[k]) and _is_dict(v):
      out[k] = merge_trees(out[k], v)
    else:
      out[k] = v
  return out


def add_lora_params(params, rng: Array, *, rank: int, targets: Sequence[str],
                    dtype=np.float32) -> dict:
  """Adds fresh LoRA factors (A as PEFT's kaiming-uniform, B zeros) next to every `kernel`
  of a module named in `targets` (e.g. a loaded base model's q_proj / v_proj).

  Host-side: the draws come from a NumPy generator seeded by the bits of `rng` (a PRNG key),
  and the factors are NumPy arrays of `dtype`.

  Kernels [in, out] get A [in, r], B [r, out]; stacked kernels [L, in, out] (scan_layers) get
  [L, in, r] and [L, r, out], each layer's A drawn independently.
  Raises ValueError when no module of `targets` holds a kernel (a typo in the names) or when
  the tree already has LoRA factors there.
  """
  count = [0]
  bits = np.asarray(rng if np.asarray(rng).dtype == np.uint32 else jax.random.key_data(rng))
  gen = np.random.default_rng(bits.astype(np.uint32).ravel())  # host-side draws

  def walk(tree, name):
    out = {}
    for k, v in tree.items():
      out[k] = walk(v, k) if _is_dict(v) else v
    if name in targets and "kernel" in tree and not _is_dict(tree["kernel"]):
      if any(n in tree for n in LORA_NAMES):
        raise ValueError(f"module {name!r} already has LoRA factors; merge_lora or split_lora "
                         "them first")
      kernel = tree["kernel"]
      *lead, fan_in, fan_out = kernel.shape
      bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_a
      out["lora_A"] = {"kernel": gen.uniform(-bound, bound, (*lead, fan_in, rank)).astype(dtype)}
      out["lora_B"] = {"kernel": np.zeros((*lead, rank, fan_out), dtype)}
      count[0] += 1
    return out

  out = walk(params, None)
  if not count[0]:
    raise ValueError(f"add_lora_params: no module named one of {tuple(targets)} with a "
                     "'kernel' in the parameter tree; check the LoRA target names")
  return out


def merge_lora(params, alpha: float, *, use_rslora: bool = False) -> dict:
  """Folds every LoRA pair into its kernel: kernel + scale * A @ B, and removes the factors.

  The rank is read from each lora_A's shape; scale = alpha / r (alpha / sqrt(r) with
  rsLoRA). The result is the parameter tree of the model with `lora_rank=0` and gives the
  same outputs (up to float round-off) as the unmerged model with dropout off.
  Raises ValueError for a lora_A without its lora_B (or the reverse) or without a kernel.
  """
  def walk(tree, path):
    out = {}
    for k, v in tree.items():
      if k in LORA_NAMES:
        continue
      out[k] = walk(v, path + (k,)) if _is_dict(v) else v
    has = [n in tree for n in LORA_NAMES]
    if any(has):
      where = "/".join(path) or "<root>"
      if not all(has) or "kernel" not in tree:
        raise ValueError(f"merge_lora: {where} has {[n for n in LORA_NAMES if n in tree]} but "
                         "a LoRA layer needs lora_A, lora_B and the frozen kernel")
      a = jnp.asarray(tree["lora_A"]["kernel"], jnp.float32)
      b = jnp.asarray(tree["lora_B"]["kernel"], jnp.float32)
      scale = lora_scale(alpha, a.shape[-1], use_rslora)
      kernel = tree["kernel"]
      out["kernel"] = (jnp.asarray(kernel, jnp.float32) + scale * (a @ b)).astype(kernel.dtype)
    return out

  return walk(params, ())
