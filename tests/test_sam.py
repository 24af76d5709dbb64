"""SAM modules and loader against transformers' SamModel (fixtures made by
scripts/make_sam_fixtures.py: a tiny random model, outputs computed in float64; no torch
here)."""

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fssjax.nn import sam as ns
from fssjax.weights import sam as ws
from fssjax.weights import tensors
from parity import assert_close

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "sam")
REF = {k: v for k, v in np.load(os.path.join(FIXTURES, "reference.npz")).items()}
HEADS = {"vision_config": {"num_attention_heads": 2},
         "mask_decoder_config": {"num_attention_heads": 2}}
P = jax.sharding.PartitionSpec
# Compiling is most of these tests' time; less LLVM optimisation halves it (same numerics).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _f32(name):
  return jnp.asarray(REF[name], jnp.float32)


@pytest.fixture(scope="module")
def loaded():
  return ws.load_sam(os.path.join(FIXTURES, "hf"))


@pytest.fixture(scope="module")
def outputs(loaded):
  """Everything the parity tests compare, from one compiled function (compiling is most of
  the cost at these sizes): the whole SamModel for prompt a, and the modules called one by
  one -- as a method uses them -- for the rest."""
  config, params = loaded

  @functools.partial(jax.jit, compiler_options=FAST)
  def run(params, pixels, a_masks):
    out = {}
    model = ns.SamModel(config)
    multi = model.apply({"params": params}, pixels, REF["a_points"], REF["a_labels"],
                        REF["a_boxes"], a_masks, output_hidden_states=True)
    out["hidden_states"] = multi["vision_hidden_states"]
    out["image_embeddings"] = emb = multi["image_embeddings"]
    out["a_masks_multi"], out["a_iou_multi"] = multi["pred_masks"], multi["iou_scores"]
    pe = ns.SamPromptEncoder(config.prompt_encoder_config)
    pv = {"params": params["prompt_encoder"]}
    out["image_pe"] = image_pe = pe.apply(pv, method="image_pe")
    out["a_sparse"], out["a_dense"] = a = pe.apply(pv, REF["a_points"], REF["a_labels"],
                                                   REF["a_boxes"], a_masks)
    out["b_sparse"], out["b_dense"] = b = pe.apply(pv, REF["b_points"], REF["b_labels"])
    dec = ns.SamMaskDecoder(config.mask_decoder_config)
    dv = {"params": params["mask_decoder"]}
    out["a_masks_single"], out["a_iou_single"] = dec.apply(dv, emb, image_pe, *a, False)
    out["b_masks_multi"], out["b_iou_multi"] = dec.apply(dv, emb, image_pe, *b, True)
    return out

  return run(params, _f32("pixel_values"), _f32("a_masks"))


def test_config_and_vision_encoder_match_transformers(loaded, outputs):
  config, params = loaded
  v = config.vision_config
  assert (v.hidden_size, v.num_hidden_layers, v.window_size, v.global_attn_indexes,
          v.image_size, v.patch_size) == (16, 3, 3, (1,), 32, 4)
  hidden = outputs["hidden_states"]
  assert len(hidden) == 3  # every block's output (window 3 pads the 8 x 8 grid to 9 x 9)
  for i, h in enumerate(hidden):
    assert_close(h, REF["hidden_states"][i], 1e-4, f"block {i}")
  assert_close(outputs["image_embeddings"], REF["image_embeddings"], 1e-4, "image embeddings")
  shapes = jax.eval_shape(lambda p, x: ns.SamVisionEncoder(v).apply({"params": p}, x),
                          params["vision_encoder"], _f32("pixel_values"))
  assert shapes[1] == () and shapes[0].shape == (2, 8, 8, 16)  # no hidden states unasked


def test_prompt_encoder_matches_transformers(outputs):
  assert_close(outputs["image_pe"], REF["image_pe"], 1e-4, "image_pe")
  assert outputs["a_sparse"].shape == (2, 4, 16)  # 2 points + 2 box corners (no padding)
  assert_close(outputs["a_sparse"], REF["a_sparse"], 1e-4, "sparse a")
  assert_close(outputs["a_dense"], REF["a_dense"], 1e-4, "dense a (mask)")
  assert outputs["b_sparse"].shape == (2, 3, 16)  # a not-a-point is appended without a box
  assert_close(outputs["b_sparse"], REF["b_sparse"], 1e-4, "sparse b (labels 1, 0, -1, -10)")
  assert_close(outputs["b_dense"], REF["b_dense"], 1e-4, "dense b (no_mask_embed)")


@pytest.mark.parametrize("name", ["a_masks_multi", "a_iou_multi", "a_masks_single",
                                  "a_iou_single", "b_masks_multi", "b_iou_multi"])
def test_masks_and_iou_match_transformers(outputs, name):
  """a: SamModel (points + box + mask); b: the modules one by one (points only)."""
  assert_close(outputs[name], REF[name], 1e-4, name)


def test_decoder_checks_its_inputs(loaded, outputs):
  config, params = loaded
  dec = ns.SamMaskDecoder(config.mask_decoder_config)
  with pytest.raises(ValueError, match=r"sparse prompt embeddings \(2, 3, 8\)"):
    dec.apply({"params": params["mask_decoder"]}, outputs["image_embeddings"],
              outputs["image_pe"], outputs["b_sparse"][..., :8], outputs["b_dense"], True)


def test_get_rel_pos_interpolates_like_pytorch():
  @functools.partial(jax.jit, compiler_options=FAST)
  def run(table, x):
    windows, padded = ns.window_partition(x, 3)
    return (ns.get_rel_pos(5, 5, table), ns.get_rel_pos(3, 6, table), windows,
            ns.window_unpartition(windows, 3, padded, (8, 7)))

  x = jnp.arange(2 * 8 * 7 * 3, dtype=jnp.float32).reshape(2, 8, 7, 3)
  rel55, rel36, windows, back = run(_f32("rel_table"), x)
  # A 7-row table; a 5 x 5 grid needs 9 rows: linear interpolation.
  assert_close(rel55, REF["rel_5_5"], 1e-5, "5 x 5")
  assert_close(rel36, REF["rel_3_6"], 1e-5, "3 x 6 (scaled coords)")
  assert windows.shape == (2 * 3 * 3, 3, 3, 3)  # padded to 9 x 9
  np.testing.assert_array_equal(back, x)


def _copy_hf(tmp_path):
  d = tmp_path / "sam"
  shutil.copytree(os.path.join(FIXTURES, "hf"), d)
  return d


def test_config_inferred_from_shapes(tmp_path, loaded):
  d = _copy_hf(tmp_path)
  raw = json.loads((d / "config.json").read_text())
  for k in ("global_attn_indexes", "window_size", "image_size", "mlp_dim", "num_hidden_layers",
            "output_channels", "hidden_size"):
    raw["vision_config"].pop(k)
  raw.pop("mask_decoder_config")
  raw["mask_decoder_config"] = {"num_attention_heads": 2}
  (d / "config.json").write_text(json.dumps(raw))
  assert ws.load_sam(str(d))[0] == loaded[0]
  (d / "config.json").unlink()
  with pytest.raises(ValueError, match=r"head count.*width 16 matches no published SAM"):
    ws.load_sam(str(d))
  assert ws.load_sam(str(d), config=HEADS)[0] == loaded[0]


@pytest.mark.parametrize("name", ["vit_b", "vit_h"])
def test_published_configs_inferred_from_shapes(name):
  """Global blocks and window from the relative tables, heads from the preset's width."""
  config = ns.sam_config(name)
  shapes = {}
  for path, shape in ws.expected_shapes(config).items():
    key = ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1])  # layers_7 -> layers.7
    leaf = "weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1]
    if path[-1] == "kernel":
      shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    shapes[f"{key}.{leaf}"] = shape
  assert "vision_encoder.layers.7.attn.rel_pos_h" in shapes
  assert ws.infer_config(shapes, {}) == config
  assert sum(np.prod(s) for s in shapes.values()) == pytest.approx(
      {"vit_b": 93.7e6, "vit_h": 641.1e6}[name], rel=1e-3)


def test_official_segment_anything_names(loaded):
  """The official names (written by the fixture script from transformers' through the
  inverse of convert_sam_to_hf.py) give exactly the transformers parameters."""
  config, params = ws.load_sam(os.path.join(FIXTURES, "official.safetensors"), config=HEADS)
  hf_config, hf_params = loaded
  assert config.vision_config == hf_config.vision_config
  assert config.prompt_encoder_config == hf_config.prompt_encoder_config
  assert config.mask_decoder_config.layer_norm_eps == 1e-5  # PyTorch's default, as official
  flat, hf_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(hf_params)
  assert flat.keys() == hf_flat.keys()
  for k in flat:
    np.testing.assert_array_equal(flat[k], hf_flat[k], err_msg=str(k))


def test_official_checkpoint_matches_the_official_code(outputs):
  """The decoder of an official checkpoint (LayerNorm eps 1e-5, as segment-anything's
  TwoWayTransformer) against the official modules' masks; with transformers' eps 1e-6 the
  result differs by more than the tolerance."""
  config, params = ws.load_sam(os.path.join(FIXTURES, "official.safetensors"), config=HEADS)
  args = (outputs["image_embeddings"], outputs["image_pe"], outputs["a_sparse"],
          outputs["a_dense"])

  @functools.partial(jax.jit, compiler_options=FAST)
  def run(p, *args):
    return ns.SamMaskDecoder(config.mask_decoder_config).apply({"params": p}, *args, True)

  masks, iou = run(params["mask_decoder"], *args)
  assert_close(masks, REF["official_a_masks_multi"], 1e-4, "official masks")
  assert_close(iou, REF["official_a_iou_multi"], 1e-4, "official iou")
  assert np.abs(REF["official_a_masks_multi"] - REF["a_masks_multi"]).max() > 5e-4


def test_sam_inside_a_larger_checkpoint(tmp_path, loaded):
  """LISA-style checkpoints keep SAM (official names) under model.visual_model."""
  from safetensors.numpy import load_file, save_file
  official = load_file(os.path.join(FIXTURES, "official.safetensors"))
  st = str(tmp_path / "lisa.safetensors")
  save_file({**{f"model.visual_model.{k}": v for k, v in official.items()},
             "model.layers.0.self_attn.q_proj.weight": np.zeros((4, 4), np.float16)}, st)
  with pytest.raises(ValueError, match=r"pass prefix='model\.visual_model\.'"):
    ws.load_sam(st, config=HEADS)
  _, params = ws.load_sam(st, config=HEADS, prefix="model.visual_model.")
  np.testing.assert_array_equal(params["vision_encoder"]["layers_1"]["attn"]["rel_pos_h"],
                                loaded[1]["vision_encoder"]["layers_1"]["attn"]["rel_pos_h"])


def test_pickles_only_on_request(tmp_path, monkeypatch):
  pth = tmp_path / "sam_vit_b_01ec64.pth"
  pth.write_bytes(b"PK\x03\x04 a torch zip pickle")
  with pytest.raises(ValueError, match=r"sam_vit_b_01ec64\.pth is a PyTorch pickle.*"
                                       r"allow_pickle=True"):
    ws.load_sam(str(pth))
  from safetensors.numpy import load_file
  official = load_file(os.path.join(FIXTURES, "official.safetensors"))
  calls = []

  def fake_read(path, allow_pickle):
    calls.append((path, allow_pickle))
    return {k: v.astype(np.float32) for k, v in official.items()}

  monkeypatch.setattr(tensors, "read_torch_pickle", fake_read)
  config, params = ws.load_sam(str(pth), allow_pickle=True, config=HEADS)
  assert calls == [(str(pth), True)]
  assert "pixel_mean" not in str(traverse_util.flatten_dict(params).keys())
  assert config.vision_config.global_attn_indexes == (1,)


def test_bad_checkpoints_name_the_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file
  d = _copy_hf(tmp_path)
  st = d / "model.safetensors"
  state = load_file(str(st))
  key = "vision_encoder.layers.2.mlp.lin2.weight"
  save_file(dict(state, **{key: state[key][:, :5]}), str(st))
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'vision_encoder\.layers\.2"
                                       r"\.mlp\.lin2\.weight' has shape \(16, 5\).*\(16, 32\)"):
    ws.load_sam(str(d))
  save_file({k: v for k, v in state.items() if k != key}, str(st))
  with pytest.raises(ValueError, match=r"missing tensors \['vision_encoder\.layers\.2\.mlp\."
                                       r"lin2\.weight'\]"):
    ws.load_sam(str(d))
  extra = "vision_encoder.layers.3.mlp.lin2.weight"
  save_file(dict(state, **{extra: state[key]}), str(st))
  with pytest.raises(ValueError, match=r"unexpected tensor 'vision_encoder\.layers\.3\.mlp"):
    ws.load_sam(str(d), config={"vision_config": {"num_hidden_layers": 3}})
  save_file({"encoder.weight": state[key]}, str(st))
  with pytest.raises(ValueError, match="no SAM tensors"):
    ws.load_sam(str(d))
  st.write_bytes(b"\x10\x00")
  with pytest.raises(ValueError, match="not a readable safetensors"):
    ws.load_sam(str(st))
  st.unlink()
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    ws.load_sam(str(d))
  with pytest.raises(FileNotFoundError, match="not found"):
    ws.load_sam(str(tmp_path / "absent"))


def test_input_errors(loaded):
  config, params = loaded
  enc = ns.SamVisionEncoder(config.vision_config)
  with pytest.raises(ValueError, match=r"pixel_values have shape \(1, 30, 32, 3\).*32, 32, 3"):
    enc.apply({"params": params["vision_encoder"]}, jnp.zeros((1, 30, 32, 3)))
  pe = ns.SamPromptEncoder(config.prompt_encoder_config)
  with pytest.raises(ValueError, match=r"boxes have shape \(2, 1, 4\)"):
    pe.apply({"params": params["prompt_encoder"]}, boxes=jnp.zeros((2, 1, 4)))
  with pytest.raises(ValueError, match="without labels"):
    pe.apply({"params": params["prompt_encoder"]}, jnp.zeros((2, 1, 2)))
  with pytest.raises(ValueError, match="num_pos_feats = 4 must be half"):
    ns.SamConfig(ns.SamVisionConfig(output_channels=256, num_pos_feats=4)).validate()
  with pytest.raises(ValueError, match="unknown SAM preset"):
    ns.sam_config("vit_g")


def test_bf16_and_remat(loaded):
  """On a one-block encoder (the fixture's first block, patch and neck): bf16 compute stays
  close to float32, and rematerialised blocks give the same gradients."""
  config, params = loaded
  v = dataclasses.replace(config.vision_config, num_hidden_layers=1, global_attn_indexes=())
  p = {k: w for k, w in params["vision_encoder"].items() if k not in ("layers_1", "layers_2")}
  x = _f32("pixel_values")

  def embed(p, dtype=None, remat=False):
    return ns.SamVisionEncoder(v, dtype=dtype, remat=remat).apply({"params": p}, x)[0]

  loss = lambda p, remat: (embed(p, remat=remat) ** 2).mean()  # noqa: E731
  remat = lambda r: re.findall(r"\b(?:remat\w*|checkpoint)\b",  # noqa: E731  (the primitive)
                               str(jax.make_jaxpr(jax.grad(lambda p: loss(p, r)))(p)))
  assert remat(True) and not remat(False)

  @functools.partial(jax.jit, compiler_options=FAST)
  def run(p):
    return (embed(p), embed(p, jnp.bfloat16), jax.grad(loss)(p, False),
            jax.grad(loss)(p, True))

  ref, bf16, g1, g2 = run(p)
  assert bf16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(bf16, np.float32) - np.asarray(ref)).max()
  assert 0 < err < 0.05 * np.abs(np.asarray(ref)).max(), err
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_partition_specs_shard_the_encoder():
  shapes = traverse_util.unflatten_dict({
      k: jax.ShapeDtypeStruct(v, jnp.float32)
      for k, v in ws.expected_shapes(ns.sam_config("vit_h")).items()})
  specs = ns.partition_specs(shapes, 8)
  layer = specs["vision_encoder"]["layers_7"]
  assert layer["attn"]["qkv"]["kernel"] == P(None, "fsdp")  # [1280, 3840]
  assert layer["mlp"]["lin2"]["kernel"] == P("fsdp", None)  # [5120, 1280]
  assert specs["vision_encoder"]["pos_embed"] == P(None, None, None, "fsdp")
  assert layer["layer_norm1"]["scale"] == P() and layer["attn"]["rel_pos_h"] == P()
  assert specs["mask_decoder"]["iou_token"]["embedding"] == P()
  assert ns.partition_specs(shapes, 1)["vision_encoder"]["pos_embed"] == P()


_SHARDED = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    from fssjax import sharding as shd
    from fssjax.nn import sam as ns
    from fssjax.weights import sam as ws
    assert jax.device_count() == 8
    config, params = ws.load_sam(os.path.join({fixtures!r}, "hf"))
    x = jnp.asarray(np.load(os.path.join({fixtures!r}, "reference.npz"))["pixel_values"],
                    jnp.float32)
    x = jnp.concatenate([x] * 4)  # batch 8: one image per device
    ref = np.load(os.path.join({fixtures!r}, "reference.npz"))["image_embeddings"]
    enc = ns.SamVisionEncoder(config.vision_config)
    fwd = lambda p, x: enc.apply({{"params": p}}, x)[0]
    fast = {{"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}}
    mesh = shd.make_mesh(fsdp=4)
    sharded = jax.device_put(params["vision_encoder"], ns.param_shardings(
        params["vision_encoder"], mesh, min_size=0))
    qkv = sharded["layers_0"]["attn"]["qkv"]["kernel"]
    assert qkv.addressable_shards[0].data.shape == (16, 12), qkv.addressable_shards[0].data.shape
    with jax.set_mesh(mesh):
      out = jax.jit(fwd, compiler_options=fast)(sharded, jax.device_put(x, shd.data_sharding(mesh)))
    assert out.sharding.spec[0] == ("data", "fsdp"), out.sharding
    err = np.abs(np.asarray(out) - np.concatenate([ref] * 4)).max()
    assert err < 1e-4 * np.abs(ref).max(), err
    print("OK", err)
""")


def test_sharded_encoder_matches_transformers():
  """8 simulated devices, parameters split 4 ways (fsdp) and the batch 8 ways."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  code = _SHARDED.format(fixtures=FIXTURES)
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_pre_and_postprocessing():
  @functools.partial(jax.jit, compiler_options=FAST)
  def run(img, masks):
    return (ns.preprocess(img, 32),
            ns.postprocess_masks(masks, (20, 32), (10, 16), image_size=32))

  x, out = run(jnp.full((1, 20, 32, 3), 255.0), jnp.zeros((1, 3, 8, 8)).at[:, :, :6].set(1.0))
  assert x.shape == (1, 32, 32, 3)
  np.testing.assert_allclose(x[0, 0, 0], (255.0 - np.array(ns.PIXEL_MEAN)) / ns.PIXEL_STD,
                             rtol=1e-6)
  assert float(jnp.abs(x[0, 20:]).max()) == 0.0  # padded below
  assert out.shape == (1, 3, 10, 16)
  np.testing.assert_allclose(out, 1.0, atol=1e-6)  # the 20 valid rows are the 1s
