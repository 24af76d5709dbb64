"""HSNet: correlation and learner parity with numpy references, parameter count, the method."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fssjax.configlib import base_config
from fssjax.methods import get_method
from fssjax.methods.base import initialize
from fssjax.nn import correlation
from fssjax.nn.hsnet import HPNLearner, mask_features
from fssjax.nn.resnet import resnet50, resnet101
from fssjax.nn.vgg import vgg16

# ------------------------------------------------------------------------------------------------
# numpy references (PyTorch semantics, written independently of the modules).


def np_cosine_corr(q, s, eps=1e-5):
  """q [B,h,w,C], s [B,H,W,C] -> relu(cos) [B,h,w,H,W] (norm + eps, as published)."""
  qn = q / (np.linalg.norm(q, axis=-1, keepdims=True) + eps)
  sn = s / (np.linalg.norm(s, axis=-1, keepdims=True) + eps)
  out = np.zeros(q.shape[:3] + s.shape[1:3])
  for b, i, j, k, l in itertools.product(*(range(n) for n in out.shape)):
    out[b, i, j, k, l] = max(float(qn[b, i, j] @ sn[b, k, l]), 0.0)
  return out


def np_resize_ac(x, size, axes):
  """Bilinear resize with align_corners=True along two axes (PyTorch formula)."""
  for axis, n_out in zip(axes, size):
    n_in = x.shape[axis]
    xm = np.moveaxis(x, axis, 0)
    out = np.zeros((n_out,) + xm.shape[1:])
    for d in range(n_out):
      src = d * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
      lo = min(int(np.floor(src)), n_in - 1)
      hi = min(lo + 1, n_in - 1)
      f = src - lo
      out[d] = (1 - f) * xm[lo] + f * xm[hi]
    x = np.moveaxis(out, 0, axis)
  return x


def np_conv2d(x, w, b, pad=1):
  """x [N,H,W,C], w [kh,kw,C,O] (stride 1, zero padding)."""
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, ww = x.shape[1] + 2 * pad - k + 1, x.shape[2] + 2 * pad - k + 1
  out = np.zeros((x.shape[0], h, ww, w.shape[-1]))
  for i, j in itertools.product(range(k), repeat=2):
    out += xp[:, i:i + h, j:j + ww] @ w[i, j]
  return out + b


def np_conv4d_cross(x, p, stride):
  """Dense 4D conv (stride (1,1,s,s), padding k//2) with the center-pivot cross kernel."""
  k1, k2 = p["conv1"]["kernel"], p["conv2"]["kernel"]
  k = k1.shape[0]
  c = k // 2
  dense = np.zeros((k,) * 4 + k1.shape[2:])
  dense[:, :, c, c] += k1
  dense[c, c, :, :] += k2
  pad = k // 2
  b, h1, w1, h2, w2, _ = x.shape
  xp = np.pad(x, ((0, 0),) + ((pad, pad),) * 4 + ((0, 0),))
  o2, o3 = (h2 - 1) // stride + 1, (w2 - 1) // stride + 1
  out = np.zeros((b, h1, w1, o2, o3, dense.shape[-1]))
  for i, j, u, v in itertools.product(range(k), repeat=4):
    if not (u == c and v == c) and not (i == c and j == c):
      continue  # zero taps
    patch = xp[:, i:i + h1, j:j + w1, u:u + stride * (o2 - 1) + 1:stride,
               v:v + stride * (o3 - 1) + 1:stride]
    out += patch @ dense[i, j, u, v]
  return out + p["conv1"]["bias"] + p["conv2"]["bias"]


def np_group_norm(x, scale, bias, groups, eps=1e-5):
  """torch.nn.GroupNorm on channels-last x [B, ..., C]."""
  b, c = x.shape[0], x.shape[-1]
  xg = x.reshape(b, -1, groups, c // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = xg.var(axis=(1, 3), keepdims=True)
  y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
  return y * scale + bias


def np_block(x, p, strides, groups=4):
  for i, s in enumerate(strides):
    x = np_conv4d_cross(x, p[f"layers_{3 * i}"], s)
    gn = p[f"layers_{3 * i + 1}"]
    x = np.maximum(np_group_norm(x, gn["scale"], gn["bias"], groups), 0)
  return x


def np_learner(params, corrs):
  p = params
  c4, c3, c2 = corrs
  s4 = np_block(c4, p["encoder_layer4"], (2, 2, 2))
  s3 = np_block(c3, p["encoder_layer3"], (4, 2, 2))
  s2 = np_block(c2, p["encoder_layer2"], (4, 4, 2))
  m43 = np_block(np_resize_ac(s4, s3.shape[1:3], (1, 2)) + s3, p["encoder_layer4to3"], (1,) * 3)
  m = np_block(np_resize_ac(m43, s2.shape[1:3], (1, 2)) + s2, p["encoder_layer3to2"], (1,) * 3)
  y = m.mean(axis=(3, 4))
  conv = lambda y, name: np_conv2d(y, p[name]["kernel"], p[name]["bias"])
  y = np.maximum(conv(y, "decoder1_0"), 0)
  y = np.maximum(conv(y, "decoder1_2"), 0)
  y = np_resize_ac(y, (2 * y.shape[1], 2 * y.shape[2]), (1, 2))
  y = np.maximum(conv(y, "decoder2_0"), 0)
  return conv(y, "decoder2_2")


# ------------------------------------------------------------------------------------------------
# Correlation and masking.


def test_multilayer_correlation_matches_numpy():
  rng = np.random.default_rng(0)
  sizes = [(4, 4, 5), (4, 4, 5), (2, 2, 7), (2, 2, 7), (2, 2, 7), (1, 1, 3)]
  q = [rng.standard_normal((2, h, w, c)).astype(np.float32) for h, w, c in sizes]
  s = [rng.standard_normal((2, h, w, c)).astype(np.float32) for h, w, c in sizes]
  s[0][0, 1, 2] = 0.0  # a masked-out support vector: norm 0 -> correlation 0, no NaN
  levels = correlation.multilayer_correlation([jnp.asarray(a) for a in q],
                                              [jnp.asarray(a) for a in s], (2, 3, 1))
  assert [tuple(lv.shape) for lv in levels] == [(2, 1, 1, 1, 1, 1), (2, 2, 2, 2, 2, 3),
                                                (2, 4, 4, 4, 4, 2)]
  ref = [np_cosine_corr(a, b) for a, b in zip(q, s)]
  np.testing.assert_allclose(levels[2], np.stack(ref[0:2], -1), atol=1e-5)
  np.testing.assert_allclose(levels[1], np.stack(ref[2:5], -1), atol=1e-5)
  np.testing.assert_allclose(levels[0], np.stack(ref[5:6], -1), atol=1e-5)
  assert float(levels[2].min()) == 0.0 and np.isfinite(np.asarray(levels[2])).all()
  np.testing.assert_array_equal(levels[2][0, :, :, 1, 2, 0], 0.0)


def test_mask_features_uses_align_corners_bilinear():
  rng = np.random.default_rng(1)
  mask = (rng.random((2, 13, 11)) > 0.5).astype(np.float32)
  feats = [rng.standard_normal((2, 5, 4, 3)).astype(np.float32),
           rng.standard_normal((2, 2, 3, 3)).astype(np.float32)]
  out = mask_features([jnp.asarray(f) for f in feats], jnp.asarray(mask))
  for f, o in zip(feats, out):
    want = f * np_resize_ac(mask, f.shape[1:3], (1, 2))[..., None]
    np.testing.assert_allclose(o, want, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# HPN learner.


def test_learner_matches_numpy_reference():
  rng = np.random.default_rng(2)
  # Query sizes 2 / 4 / 8; support sizes such that the support dims meet at 1 x 1 after the
  # squeeze blocks (level 4: 2 -> 1, level 3: 4 -> 1, level 2: 8 -> 2 -> 1).
  corrs = [rng.random((1, 2, 2, 2, 2, 3)), rng.random((1, 4, 4, 4, 4, 2)),
           rng.random((1, 8, 8, 8, 8, 2))]
  corrs = [c.astype(np.float32) for c in corrs]
  learner = HPNLearner()
  shapes = jax.eval_shape(learner.init, jax.random.key(0), [jnp.asarray(c) for c in corrs])
  # Random parameters everywhere (GroupNorm scales around 1, all biases nonzero).
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (1.0 if path[-1].key == "scale" else 0.0)
      + rng.standard_normal(a.shape) * (0.5 if path[-1].key in ("scale", "bias")
                                        else 1.0 / np.sqrt(np.prod(a.shape[:-1]))),
      shapes["params"])
  got = jax.jit(learner.apply)({"params": jax.tree.map(jnp.float32, params)},
                               [jnp.asarray(c) for c in corrs])
  want = np_learner(params, [c.astype(np.float64) for c in corrs])
  assert got.shape == (1, 16, 16, 2) == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def _n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("level_channels,expected", [
    ((3, 6, 4), 2_573_794),  # ResNet-50: layer4 3, layer3 6, layer2 4 correlation maps
    ((3, 23, 4), 2_587_394),  # ResNet-101
    ((1, 3, 3), 2_570_018),  # VGG16: pool5, conv5_x, conv4_x
])
def test_learner_parameter_count(level_channels, expected):
  """Published HPNLearner count, derived by hand from model/learner.py:

  A CenterPivotConv4d(in, out, k) has two Conv2d(in, out, k x k, bias): 2 (in out k^2 + out);
  a GroupNorm(4, out) has 2 out. ResNet-50 (n4, n3, n2) = (3, 6, 4):
    encoder_layer4 (k 3,3,3):  896 + 32 + 18560 + 128 + 147712 + 256 = 167584
    encoder_layer3 (k 5,3,3): 4832 + 32 + 18560 + 128 + 147712 + 256 = 171520
    encoder_layer2 (k 5,5,3): 3232 + 32 + 51328 + 128 + 147712 + 256 = 202688
    encoder_layer4to3 / 3to2: 2 x 3 x (295168 + 256)                  = 1772544
    decoder: 147584 + 73792 + 36928 + 1154                             = 259458
    total                                                              = 2573794
  ResNet-101 changes the first conv4d of layer3: +2 * 17 * 16 * 25 = +13600;
  VGG16 changes the three first conv4ds: -576 - 2400 - 800 = -3776.
  """
  n4, n3, n2 = level_channels
  corrs = [jnp.zeros((1, 2, 2, 2, 2, n4)), jnp.zeros((1, 4, 4, 4, 4, n3)),
           jnp.zeros((1, 8, 8, 8, 8, n2))]
  shapes = jax.eval_shape(HPNLearner().init, jax.random.key(0), corrs)
  assert _n_params(shapes["params"]) == expected


def test_backbone_taps_at_400():
  """Tap counts, channels and sizes of the published backbones at 400 x 400."""
  x = jnp.zeros((1, 400, 400, 3))
  for module, n, chans, sizes in (
      (resnet50(), 13, [512] * 4 + [1024] * 6 + [2048] * 3, [50] * 4 + [25] * 6 + [13] * 3),
      (resnet101(), 30, [512] * 4 + [1024] * 23 + [2048] * 3, [50] * 4 + [25] * 23 + [13] * 3),
      (vgg16(), 7, [512] * 7, [50] * 3 + [25] * 3 + [12])):
    feats, variables = jax.eval_shape(lambda m=module: m.init_with_output(jax.random.key(0), x))
    assert len(feats) == n == sum(module.level_sizes)
    assert [f.shape[-1] for f in feats] == chans
    assert [f.shape[1] for f in feats] == sizes
    if module is not None and "batch_stats" in variables:
      assert "mean" in variables["batch_stats"]["layer2_0"]["bn1"]


# ------------------------------------------------------------------------------------------------
# The method.


def _config(**model):
  c = base_config()
  c.method = "hsnet"
  trainable = model.pop("backbone_trainable", True)
  c.model = ml_collections.ConfigDict({**dict(backbone="resnet_tiny"), **model})
  if trainable:
    c.model.trainable = ("params/learner/.*", "params/backbone/.*")
  return c


def _batch(rng, b=2, k=1, size=64):
  r = np.random.default_rng(rng)
  masks = np.zeros((b, k, size, size), np.uint8)
  qmask = np.zeros((b, size, size), np.uint8)
  for i in range(b):
    y0, x0 = r.integers(0, size // 2, 2)
    qmask[i, y0:y0 + size // 2, x0:x0 + size // 3] = 1
    for j in range(k):
      y1, x1 = r.integers(0, size // 2, 2)
      masks[i, j, y1:y1 + size // 3, x1:x1 + size // 2] = 1
  qmask[:, 0, :] = 255  # an ignored row
  return {
      "query_image": jnp.asarray(r.standard_normal((b, size, size, 3)), jnp.float32),
      "query_mask": jnp.asarray(qmask),
      "support_images": jnp.asarray(r.standard_normal((b, k, size, size, 3)), jnp.float32),
      "support_masks": jnp.asarray(masks),
      "class_id": jnp.zeros((b,), jnp.int32),
  }


def test_method_predict_shapes_and_vote():
  method = get_method(_config())
  assert (method.kshot, method.threshold, method.normalization, method.align_corners) == (
      "vote", 0.0, "imagenet", True)
  batch = _batch(0, b=2, k=3)
  params, frozen = initialize(method, jax.random.key(0), batch)
  assert set(params["params"]) == {"learner", "backbone"} and frozen == {}  # GroupNorm backbone
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))

  predict = jax.jit(method.predict)
  one_shot = []
  for j in range(3):  # 1-shot scores per support
    one = dict(batch, support_images=batch["support_images"][:, j:j + 1],
               support_masks=batch["support_masks"][:, j:j + 1])
    one_shot.append(np.asarray(predict(params, frozen, one)))
  assert one_shot[0].shape == (2, 64, 64) and one_shot[0].dtype == np.float32
  assert not np.allclose(one_shot[0], one_shot[1])  # the support matters

  # K-shot: the published vote over the K one-shot argmax maps.
  votes = sum((s > 0).astype(np.float64) for s in one_shot)
  max_vote = np.maximum(votes.reshape(2, -1).max(1), 1)[:, None, None]
  want_fg = votes / max_vote >= 0.5
  got = np.asarray(predict(params, frozen, batch))
  assert got.shape == (2, 64, 64)
  np.testing.assert_array_equal(got > method.threshold, want_fg)

  # bfloat16 compute (train.precision) with the same float32 parameters: close scores.
  config16 = _config()
  config16.train.precision = "bfloat16"
  one = dict(batch, support_images=batch["support_images"][:, :1],
             support_masks=batch["support_masks"][:, :1])
  scores16 = np.asarray(jax.jit(get_method(config16).predict)(params, frozen, one))
  assert scores16.dtype == np.float32
  scale = np.abs(one_shot[0]).max()
  assert np.abs(scores16 - one_shot[0]).max() < 0.05 * scale
  assert not np.array_equal(scores16, one_shot[0])  # really computed in bfloat16


def test_method_loss_and_overfit():
  """Loss = mean 2-class cross-entropy over non-255 pixels; a few Adam steps overfit a batch.

  The (random) backbone is frozen here, which also checks the params / frozen split (the
  trainable split is checked in test_method_predict_shapes_and_vote).
  """
  method = get_method(_config(learner_channels=(8, 16, 32), backbone_trainable=False))
  batch = _batch(3, b=2, k=1)
  params, frozen = initialize(method, jax.random.key(0), batch)
  assert set(params) == {"params"} and set(params["params"]) == {"learner"}
  assert set(frozen) == {"params"} and set(frozen["params"]) == {"backbone"}
  assert set(frozen["params"]) == {"backbone"}
  scores = np.asarray(jax.jit(method.predict)(params, frozen, batch), np.float64)
  opt = optax.adam(1e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    (loss, metrics), grads = jax.value_and_grad(method.loss, has_aux=True)(
        params, frozen, batch, jax.random.key(0))
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, metrics, grads

  losses = []
  for i in range(12):
    params, state, loss, metrics, grads = step(params, state)
    losses.append(float(loss))
    if i == 0:
      # Reference from the scores d = logit_fg - logit_bg: CE = softplus(-d) for fg, softplus(d)
      # for bg; pixels labelled 255 are ignored.
      target = np.asarray(batch["query_mask"])
      ce = np.where(target == 1, np.logaddexp(0, -scores), np.logaddexp(0, scores))
      np.testing.assert_allclose(losses[0], ce[target != 255].mean(), rtol=1e-4)
      assert set(metrics) == {"loss", "fg_iou", "pixel_acc"}
      assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert losses[-1] < 0.8 * losses[0], losses


def test_masked_support_features_have_finite_zero_gradients():
  """Masked-out support vectors are exactly zero: their correlation and gradients stay finite
  (a plain sqrt norm gives NaN there), and no gradient reaches the masked positions."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 2, 2, 3)), jnp.float32)
  f = jnp.asarray(rng.standard_normal((1, 3, 3, 3)), jnp.float32)
  mask = jnp.asarray(np.array([[[1, 1, 0], [1, 0, 0], [0, 0, 0]]], np.float32))

  def total(f):
    (masked,) = mask_features([f], mask)
    return correlation.cosine_correlation(q, masked).sum()

  g = np.asarray(jax.grad(total)(f))
  assert np.isfinite(g).all()
  np.testing.assert_array_equal(g[0][np.asarray(mask[0]) == 0], 0.0)
  assert np.abs(g[0][np.asarray(mask[0]) == 1]).max() > 0


def test_method_config_errors():
  with pytest.raises(ValueError, match=r"config.model.backbone_weight: unknown key.*"
                     r"did you mean model.backbone_weights"):
    get_method(_config(backbone_weight="x"))
  with pytest.raises(ValueError, match="loss_boundary"):
    get_method(_config(loss_boundary="drop"))
  with pytest.raises(ValueError, match="Unknown HSNet backbone"):
    get_method(_config(backbone="resnet18")).init(jax.random.key(0), _batch(0, b=1))


@pytest.mark.parametrize("name,arg", [
    ("hsnet_coco", "fold=2,shot=5,backbone=resnet101"),
    ("hsnet_coco", "demo"),
    ("hsnet_pascal", "fold=3,backbone=vgg16"),
    ("hsnet_fss", "shot=5"),
])
def test_configs_load_and_build_the_method(name, arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  assert c.method == "hsnet" and c.optimizer.name == "adam"
  assert c.optimizer.lr == (2e-3 if arg == "demo" else 1e-3)
  method = get_method(c)
  assert method.model.backbone_name == c.model.backbone
  if arg == "demo":
    assert c.data.dataset == "synthetic" and c.model.backbone == "resnet_tiny"
    assert "params/backbone/.*" in c.model.trainable and c.data.test_episodes == 300
  else:
    assert c.data.image_size == 400 and not c.data.augment and c.model.trainable is None
    assert method.trainable_patterns() == ["params/learner/.*"]
    assert c.model.loss_boundary == "background"
  with pytest.raises(ValueError, match="Unknown config argument"):
    module.get_config("folds=1")
