"""LLaFS's refinement network: image + rasterised coarse (polygon) mask -> refined mask logits.

LLaFS (Zhu et al., CVPR 2024) rasterises the LLM's 16-point polygons into a coarse mask and
passes it, with the image, through a light network trained with binary cross-entropy and Dice
losses. The paper does not give the architecture; the choice here is a small two-level U-Net
(NHWC, GroupNorm, ReLU) whose output is a RESIDUAL on the coarse mask:

  x = concat(image, coarse, coarse_prior)                 [B, H, W, C + 2]
  e1 = block(x, w)          (two 3x3 conv + GN + ReLU)    [B, H, W, w]
  e2 = block(conv3x3 stride 2 (e1), 2w)                   [B, H/2, W/2, 2w]
  b  = block(conv3x3 stride 2 (e2), 4w)  (dilation 2 in the second conv: wider context)
  d2 = block(concat(up(b), e2), 2w);  d1 = block(concat(up(d2), e1), w)
  logits = conv1x1(d1) + prior_scale * (2 * coarse - 1)   [B, H, W]

`up` is bilinear resizing (`jax.image.resize`) to the skip's size, so any H, W works. The head
is initialised to zero and `prior_scale` (a learned scalar) to 3.0: before training the
refined mask IS the coarse mask (sigmoid(+-3) = 0.95 / 0.05), and training learns corrections.
`coarse_prior` is the coarse mask blurred by a 5 x 5 box filter (a soft distance to its edge,
which tells the network where corrections are likely).

  net = RefineNet(width=32)
  params = init_params(net, seed=0, image_shape=(1, H, W, C))   # numpy init, no XLA compile
  logits = net.apply({'params': p}, image [B, H, W, C] f32 (normalised), coarse [B, H, W] {0,1})
  loss, parts = refine_loss(logits, target [B, H, W] {0, 1, 255 ignore})
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
Dtype = Any
IGNORE = 255


class _Block(nn.Module):
  features: int
  dilation: int = 1
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i, d in enumerate((1, self.dilation)):
      x = nn.Conv(self.features, (3, 3), padding=d, kernel_dilation=d, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"conv{i + 1}")(x)
      x = nn.GroupNorm(num_groups=min(8, self.features), dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"norm{i + 1}")(x)
      x = jax.nn.relu(x)
    return x


def _up(x: Array, like: Array) -> Array:
  b, h, w, _ = like.shape
  return jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), "bilinear")


class RefineNet(nn.Module):
  """Light residual U-Net refining a coarse mask (see the module docstring).

  Attributes:
    width: channels w of the first level (2w, 4w below).
    prior_init: initial `prior_scale` (logit magnitude of the coarse mask).
    dtype, param_dtype: computation and parameter dtypes.
  """

  width: int = 32
  prior_init: float = 3.0
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: Array, coarse: Array) -> Array:
    """Refined mask logits.

    Args:
      image: [B, H, W, C] float (normalised as the rest of the model sees it).
      coarse: [B, H, W] coarse mask, {0, 1} (float or int; soft values in [0, 1] allowed).

    Returns:
      [B, H, W] float32 logits.

    Raises:
      ValueError: image not 4-D or coarse not [B, H, W] of the image's size.
    """
    if image.ndim != 4:
      raise ValueError(f"image has shape {tuple(image.shape)}; expected [B, H, W, C]")
    if tuple(coarse.shape) != tuple(image.shape[:3]):
      raise ValueError(f"coarse mask has shape {tuple(coarse.shape)}; expected [B, H, W] = "
                       f"{tuple(image.shape[:3])}")
    w, dt, pdt = self.width, self.dtype, self.param_dtype
    c = coarse.astype(jnp.float32)[..., None]
    prior = nn.avg_pool(c, (5, 5), strides=(1, 1), padding="SAME", count_include_pad=False)
    x = jnp.concatenate([image.astype(jnp.float32), c, prior], axis=-1)
    if dt is not None:
      x = x.astype(dt)
    conv = lambda f, name, stride=1: nn.Conv(  # noqa: E731
        f, (3, 3), strides=stride, padding=1, dtype=dt, param_dtype=pdt, name=name)
    e1 = _Block(w, dtype=dt, param_dtype=pdt, name="enc1")(x)
    e2 = _Block(2 * w, dtype=dt, param_dtype=pdt, name="enc2")(conv(2 * w, "down1", 2)(e1))
    b = _Block(4 * w, dilation=2, dtype=dt, param_dtype=pdt, name="bottom")(
        conv(4 * w, "down2", 2)(e2))
    d2 = _Block(2 * w, dtype=dt, param_dtype=pdt, name="dec2")(
        jnp.concatenate([_up(b, e2), e2], axis=-1))
    d1 = _Block(w, dtype=dt, param_dtype=pdt, name="dec1")(
        jnp.concatenate([_up(d2, e1), e1], axis=-1))
    head = nn.Conv(1, (1, 1), kernel_init=nn.initializers.zeros, dtype=dt, param_dtype=pdt,
                   name="head")(d1)
    scale = self.param("prior_scale", nn.initializers.constant(self.prior_init), (), pdt)
    return (head[..., 0].astype(jnp.float32)
            + scale.astype(jnp.float32) * (2.0 * c[..., 0] - 1.0))


def init_params(module: RefineNet, seed: int, image_shape: Tuple[int, int, int, int]) -> dict:
  """Initial params of `module` generated with numpy (no XLA compilation: jitted Flax
  initialisers take seconds to compile per network on a loaded CPU).

  Rules: conv kernels and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's nn.Conv2d
  default), fan_in = kh * kw * in; GroupNorm scale 1, bias 0; `head` zeros (the refined mask
  starts as the coarse one); `prior_scale` = module.prior_init.

  Args:
    module: the RefineNet.
    seed: integer seed of `np.random.default_rng`.
    image_shape: [B, H, W, C] of the image input (only C matters for shapes).

  Returns:
    params (float32 numpy arrays in the structure `module.init` gives).
  """
  b, h, w, c = image_shape
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, h, w, c)),
                          jnp.zeros((1, h, w)))["params"]
  gen = np.random.default_rng(seed)

  def walk(tree: Mapping, path: tuple) -> dict:
    out = {}
    kernel = tree.get("kernel")
    for name in sorted(tree):
      leaf = tree[name]
      if isinstance(leaf, Mapping):
        out[name] = walk(leaf, path + (name,))
        continue
      shape = tuple(leaf.shape)
      if name == "prior_scale":
        value = np.full(shape, module.prior_init)
      elif path and path[-1] == "head":
        value = np.zeros(shape)
      elif kernel is not None and name in ("kernel", "bias"):
        bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))
        value = gen.uniform(-bound, bound, shape)
      elif name == "scale":
        value = np.ones(shape)
      elif name == "bias":
        value = np.zeros(shape)
      else:
        raise ValueError(f"init_params: no rule for {'/'.join(path + (name,))}")
      out[name] = value.astype(np.float32)
    return out

  return walk(shapes, ())


def refine_loss(logits: Array, target: Array, *, bce_weight: float = 1.0,
                dice_weight: float = 1.0, eps: float = 1.0) -> Tuple[Array, dict]:
  """Binary cross-entropy + soft Dice (LLaFS's refinement loss), ignoring 255 pixels.

  BCE: mean over valid pixels of the batch. Dice: 1 - (2 sum(p t) + eps) / (sum p + sum t +
  eps) per image over its valid pixels (p = sigmoid(logits)), averaged over the batch; eps = 1
  (a smoothing count: an image with no foreground and a confident background prediction
  scores ~0).

  Args:
    logits: [B, H, W] float.
    target: [B, H, W] {0, 1}, 255 = ignore.

  Returns:
    (bce_weight * bce + dice_weight * dice, {'bce': bce, 'dice': dice}) float32 scalars.
  """
  logits = logits.astype(jnp.float32)
  valid = (target != IGNORE).astype(jnp.float32)
  t = jnp.where(target == 1, 1.0, 0.0)
  bce_map = optax.sigmoid_binary_cross_entropy(logits, t)
  bce = (bce_map * valid).sum() / jnp.maximum(valid.sum(), 1.0)
  p = jax.nn.sigmoid(logits) * valid
  axes = tuple(range(1, logits.ndim))
  inter = (p * t).sum(axes)
  dice = 1.0 - (2.0 * inter + eps) / (p.sum(axes) + (t * valid).sum(axes) + eps)
  dice = dice.mean()
  return bce_weight * bce + dice_weight * dice, {"bce": bce, "dice": dice}

