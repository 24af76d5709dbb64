"""Loading torchvision-layout state dicts (safetensors) into the Flax ResNet / VGG16 backbones.

The state dicts are written here with numpy (no torch): exact torchvision key names and shapes,
generated programmatically from the architectures.
"""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from fssjax.configlib import base_config
from fssjax.methods import get_method
from fssjax.methods.base import initialize
from fssjax.nn.resnet import ResNet, resnet50
from fssjax.nn.vgg import VGG16_CFG, vgg16
from fssjax.weights import torchvision as tvw


def torchvision_resnet_shapes(stage_sizes, widths=(64, 128, 256, 512), stem=64,
                              num_classes=1000):
  """{key: shape} of torchvision's ResNet (Bottleneck, expansion 4) state dict, in order."""
  sd = {}

  def bn(name, c):
    for k in ("weight", "bias", "running_mean", "running_var"):
      sd[f"{name}.{k}"] = (c,)
    sd[f"{name}.num_batches_tracked"] = ()

  sd["conv1.weight"] = (stem, 3, 7, 7)
  bn("bn1", stem)
  inp = stem
  for li, (n, w) in enumerate(zip(stage_sizes, widths), start=1):
    for j in range(n):
      pre = f"layer{li}.{j}"
      sd[f"{pre}.conv1.weight"] = (w, inp, 1, 1)
      bn(f"{pre}.bn1", w)
      sd[f"{pre}.conv2.weight"] = (w, w, 3, 3)
      bn(f"{pre}.bn2", w)
      sd[f"{pre}.conv3.weight"] = (4 * w, w, 1, 1)
      bn(f"{pre}.bn3", 4 * w)
      if j == 0:
        sd[f"{pre}.downsample.0.weight"] = (4 * w, inp, 1, 1)
        bn(f"{pre}.downsample.1", 4 * w)
      inp = 4 * w
  sd["fc.weight"] = (num_classes, inp)
  sd["fc.bias"] = (num_classes,)
  return sd


def torchvision_vgg16_shapes():
  """{key: shape} of torchvision's vgg16 state dict (features.* exact; see classifier note)."""
  sd = {}
  idx, inp = 0, 3
  for v in VGG16_CFG:
    if v == "M":
      idx += 1
      continue
    sd[f"features.{idx}.weight"] = (v, inp, 3, 3)
    sd[f"features.{idx}.bias"] = (v,)
    inp, idx = v, idx + 2
  # The classifier's real shapes are (4096, 25088), (4096, 4096), (1000, 4096) (~470 MB in
  # float32); the loader drops classifier.* by name, so stand-in shapes keep the test small.
  for i, (o, n) in zip((0, 3, 6), ((8, 6), (8, 8), (5, 8))):
    sd[f"classifier.{i}.weight"] = (o, n)
    sd[f"classifier.{i}.bias"] = (o,)
  return sd


def random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for k, shape in shapes.items():
    if k.endswith("num_batches_tracked"):
      out[k] = np.array(7, np.int64)
    elif k.endswith("running_var"):
      out[k] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    elif k.endswith("weight") and len(shape) == 4:  # He-scaled conv weights
      fan_in = shape[1] * shape[2] * shape[3]
      out[k] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    else:
      out[k] = (rng.standard_normal(shape) * 0.1 + (
          1.0 if k.endswith(".weight") and len(shape) == 1 else 0.0)).astype(np.float32)
  return out


def flax_path(key):
  """Independent (test-side) map: torchvision key -> (collection, flax path, transform)."""
  parts = key.split(".")
  leaf = parts[-1]
  mods = []
  i = 0
  while i < len(parts) - 1:
    p = parts[i]
    if p in ("features",) or p.startswith("layer"):
      mods.append(f"{p}_{parts[i + 1]}")
      i += 2
    elif p == "downsample":
      mods.append({"0": "downsample_conv", "1": "downsample_bn"}[parts[i + 1]])
      i += 2
    else:
      mods.append(p)
      i += 1
  if leaf == "running_mean":
    return "batch_stats", mods + ["mean"]
  if leaf == "running_var":
    return "batch_stats", mods + ["var"]
  is_conv = mods[-1].startswith(("conv", "features", "downsample_conv"))
  if leaf == "weight":
    return "params", mods + (["kernel"] if is_conv else ["scale"])
  return "params", mods + ["bias"]


def get(tree, path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
  shapes = torchvision_resnet_shapes((3, 4, 6, 3))
  assert len(shapes) == 320  # len(torchvision.models.resnet50().state_dict())
  sd = random_state_dict(shapes)
  path = str(tmp_path_factory.mktemp("w") / "resnet50.safetensors")
  save_file(sd, path)
  return path, sd


def _template(module, size=32):
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def test_resnet50_every_tensor_lands_in_place(resnet50_file):
  path, sd = resnet50_file
  variables = tvw.load_backbone_variables(path, _template(resnet50()))
  n_leaves = sum(1 for _ in jax.tree.leaves(variables))
  assert n_leaves == 320 - 53 - 2  # minus num_batches_tracked and fc
  for key, value in sd.items():
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
      continue
    collection, p = flax_path(key)
    got = get(variables[collection], p)
    want = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    np.testing.assert_array_equal(got, want, err_msg=key)
  # Spot checks of the layout.
  np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"][6, 5, 2, 63],
                                sd["conv1.weight"][63, 2, 6, 5])
  np.testing.assert_array_equal(variables["batch_stats"]["layer3_5"]["bn3"]["var"],
                                sd["layer3.5.bn3.running_var"])
  assert variables["params"]["layer4_0"]["downsample_conv"]["kernel"].shape == (1, 1, 1024, 2048)
  assert variables["params"]["layer2_3"]["conv2"]["kernel"].shape == (3, 3, 128, 128)


def test_method_init_loads_frozen_backbone(resnet50_file):
  path, sd = resnet50_file
  c = base_config()
  c.method = "hsnet"
  c.model = ml_collections.ConfigDict(dict(backbone="resnet50", backbone_weights=path))
  method = get_method(c)
  batch = {"query_image": jnp.zeros((2, 32, 32, 3)), "support_images": jnp.zeros((2, 1, 32, 32, 3)),
           "support_masks": jnp.zeros((2, 1, 32, 32), jnp.uint8)}
  params, frozen = initialize(method, jax.random.key(0), batch)
  assert set(params) == {"params"} and set(params["params"]) == {"learner"}
  np.testing.assert_array_equal(frozen["params"]["backbone"]["layer1_0"]["conv2"]["kernel"],
                                sd["layer1.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(frozen["batch_stats"]["backbone"]["bn1"]["mean"],
                                sd["bn1.running_mean"])


# ------------------------------------------------------------------------------------------------
# numpy reference forward passes with the loaded weights.


def np_conv(x, w_oihw, stride=1, pad=0, bias=None):
  w = w_oihw.transpose(2, 3, 1, 0)
  kh, kw = w.shape[:2]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh = (x.shape[1] + 2 * pad - kh) // stride + 1
  ow = (x.shape[2] + 2 * pad - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
  for i, j in itertools.product(range(kh), range(kw)):
    out += xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride] @ w[i, j]
  return out if bias is None else out + bias


def np_bn(x, sd, name):
  return ((x - sd[f"{name}.running_mean"]) / np.sqrt(sd[f"{name}.running_var"] + 1e-5)
          * sd[f"{name}.weight"] + sd[f"{name}.bias"])


def np_maxpool(x, k, stride, pad):
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
  oh = (x.shape[1] + 2 * pad - k) // stride + 1
  ow = (x.shape[2] + 2 * pad - k) // stride + 1
  out = np.full((x.shape[0], oh, ow, x.shape[3]), -np.inf)
  for i, j in itertools.product(range(k), repeat=2):
    out = np.maximum(out, xp[:, i:i + stride * (oh - 1) + 1:stride,
                             j:j + stride * (ow - 1) + 1:stride])
  return out


def np_resnet_taps(x, sd, stage_sizes):
  relu = lambda a: np.maximum(a, 0)
  x = relu(np_bn(np_conv(x, sd["conv1.weight"], 2, 3), sd, "bn1"))
  x = np_maxpool(x, 3, 2, 1)
  taps = []
  for li, n in enumerate(stage_sizes, start=1):
    for j in range(n):
      pre = f"layer{li}.{j}"
      stride = 2 if (li > 1 and j == 0) else 1
      y = relu(np_bn(np_conv(x, sd[f"{pre}.conv1.weight"]), sd, f"{pre}.bn1"))
      y = relu(np_bn(np_conv(y, sd[f"{pre}.conv2.weight"], stride, 1), sd, f"{pre}.bn2"))
      y = np_bn(np_conv(y, sd[f"{pre}.conv3.weight"]), sd, f"{pre}.bn3")
      res = x
      if f"{pre}.downsample.0.weight" in sd:
        res = np_bn(np_conv(x, sd[f"{pre}.downsample.0.weight"], stride), sd, f"{pre}.downsample.1")
      x = y + res
      if li > 1:
        taps.append(x)  # after the residual add, before the ReLU
      x = relu(x)
  return taps


def test_resnet_forward_matches_numpy_reference(tmp_path):
  """A reduced-depth / narrow torchvision-layout ResNet, same loader path, vs numpy."""
  stage_sizes, widths, stem = (1, 2, 1, 1), (4, 8, 8, 16), 8
  sd = random_state_dict(torchvision_resnet_shapes(stage_sizes, widths, stem, num_classes=3), 1)
  path = str(tmp_path / "small_resnet.safetensors")
  save_file(sd, path)
  module = ResNet(stage_sizes=stage_sizes, widths=widths, stem_width=stem)
  variables = tvw.load_backbone_variables(path, _template(module, 36))
  x = np.random.default_rng(2).standard_normal((2, 36, 36, 3)).astype(np.float32)
  got = jax.jit(module.apply)(variables, jnp.asarray(x))
  want = np_resnet_taps(x.astype(np.float64), sd, stage_sizes)
  assert len(got) == len(want) == 4
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
  assert min(float(np.min(w)) for w in want) < 0  # pre-ReLU taps do hold negatives


def test_vgg16_loads_and_matches_numpy_reference(tmp_path):
  shapes = torchvision_vgg16_shapes()
  assert len(shapes) == 32  # len(torchvision.models.vgg16().state_dict())
  sd = random_state_dict(shapes, 3)
  path = str(tmp_path / "vgg16.safetensors")
  save_file(sd, path)
  module = vgg16()
  variables = tvw.load_backbone_variables(path, _template(module))
  assert set(variables) == {"params"}
  np.testing.assert_array_equal(variables["params"]["features_28"]["kernel"][0, 2, 7, 9],
                                sd["features.28.weight"][9, 7, 0, 2])
  np.testing.assert_array_equal(variables["params"]["features_0"]["bias"], sd["features.0.bias"])

  x = np.random.default_rng(4).standard_normal((1, 32, 32, 3))
  got = jax.jit(module.apply)(variables, jnp.asarray(x, jnp.float32))
  taps, idx, h = [], 0, x
  for v in VGG16_CFG:
    if v == "M":
      h = np_maxpool(h, 2, 2, 0)
      if idx == 30:
        taps.append(h)
      idx += 1
    else:
      h = np_conv(h, sd[f"features.{idx}.weight"], 1, 1, sd[f"features.{idx}.bias"])
      if idx in (17, 19, 21, 24, 26, 28):
        taps.append(h)  # pre-ReLU
      h = np.maximum(h, 0)
      idx += 2
  assert [t.shape[1] for t in got] == [4, 4, 4, 2, 2, 2, 1]
  for g, w in zip(got, taps):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


# ------------------------------------------------------------------------------------------------
# Errors.


def _small_resnet():
  stage_sizes, widths, stem = (1, 1, 1, 1), (2, 2, 2, 2), 4
  sd = random_state_dict(torchvision_resnet_shapes(stage_sizes, widths, stem, num_classes=2))
  return ResNet(stage_sizes=stage_sizes, widths=widths, stem_width=stem), sd


def test_shape_mismatch_names_key_and_shapes():
  module, sd = _small_resnet()
  sd["layer2.0.conv2.weight"] = np.zeros((2, 2, 5, 5), np.float32)
  with pytest.raises(ValueError, match=r"layer2\.0\.conv2\.weight.*\(2, 2, 5, 5\).*\(2, 2, 3, 3\)"):
    tvw.convert_state_dict(sd, _template(module))


def test_missing_and_unexpected_keys_are_named():
  module, sd = _small_resnet()
  del sd["layer3.0.bn2.running_var"]
  with pytest.raises(ValueError, match=r"missing: layer3\.0\.bn2\.running_var"):
    tvw.convert_state_dict(sd, _template(module))
  module, sd = _small_resnet()
  sd["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError, match=r"unexpected key\(s\).*layer5\.0\.conv1\.weight"):
    tvw.convert_state_dict(sd, _template(module))


def test_pickle_needs_opt_in(tmp_path):
  path = tmp_path / "resnet50.pth"
  path.write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(ValueError, match="allow_pickle"):
    tvw.read_state_dict(str(path))
  with pytest.raises(FileNotFoundError):
    tvw.read_state_dict(str(tmp_path / "absent.safetensors"))
