"""A new user's mistakes with this session's modules: each gets a clear error, not a wrong
result or an error from deep inside JAX / NumPy."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fssjax.data import dense
from fssjax.data.base import DataError
from fssjax.nn import deformable_attention as da
from fssjax.priors import polygons

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


# ------------------------------------------------------------------------------------------
# LLaVA: image_features of the wrong width / rank, float ids.


@pytest.fixture(scope="module")
def llava():
  from fssjax.nn import llava as nllava  # pylint: disable=import-outside-toplevel
  from fssjax.weights import llava as wllava  # pylint: disable=import-outside-toplevel
  cfg, params = wllava.load_llava(os.path.join(FIXTURES, "llava", "hf"))
  model = nllava.LlavaForConditionalGeneration(cfg)
  p = cfg.image_seq_length
  ids = jnp.asarray([[1] + [cfg.image_token_index] * p + [5]], jnp.int32)
  return cfg, model, {"params": params}, ids


def test_llava_unprojected_image_features_named(llava):
  cfg, model, variables, ids = llava
  p = cfg.image_seq_length
  # CLIP features before the projector (vision width) instead of the LLM's width.
  feats = jnp.zeros((1, p, cfg.vision.hidden_size))
  assert cfg.vision.hidden_size != cfg.text.hidden_size
  with pytest.raises(ValueError, match=rf"image_features has shape \(1, {p}, "
                     rf"{cfg.vision.hidden_size}\); expected \[N_img, P, {cfg.text.hidden_size}\]"):
    model.apply(variables, ids, image_features=feats)


def test_llava_2d_image_features_named(llava):
  cfg, model, variables, ids = llava
  with pytest.raises(ValueError, match="image_features has shape"):
    model.apply(variables, ids,
                image_features=jnp.zeros((cfg.image_seq_length, cfg.text.hidden_size)))


def test_llava_count_message_uses_the_features_own_length(llava):
  cfg, model, variables, ids = llava
  feats = jnp.zeros((1, cfg.image_seq_length - 1, cfg.text.hidden_size))
  with pytest.raises(ValueError, match=rf"1 images x {cfg.image_seq_length - 1}\)"):
    model.apply(variables, ids, image_features=feats)


def test_llava_float_ids(llava):
  cfg, model, variables, ids = llava
  with pytest.raises(ValueError, match="input_ids has dtype float32; expected integer"):
    model.apply(variables, ids.astype(jnp.float32),
                jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size, 3)))


# ------------------------------------------------------------------------------------------
# Dense sources.


def _ade(root, label_name="x.png", value=3, mode=None):
  top = os.path.join(root, "ADEChallengeData2016")
  os.makedirs(os.path.join(top, "images", "validation"))
  os.makedirs(os.path.join(top, "annotations_detectron2", "validation"))
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(
      os.path.join(top, "images", "validation", "x.jpg"))
  Image.fromarray(np.full((4, 5), value, np.uint8)).save(
      os.path.join(top, "annotations_detectron2", "validation", label_name))


def test_dense_unknown_benchmark_is_a_value_error(tmp_path):
  with pytest.raises(ValueError, match="Unknown dense benchmark 'ade150'; valid: .*ade20k_150"):
    dense.DetectronSemSegSource("ade150", str(tmp_path))


def test_dense_upper_case_label_extension_loads(tmp_path):
  _ade(str(tmp_path), "x.PNG")
  src = dense.DetectronSemSegSource("ade20k_150", str(tmp_path))
  _, label = src.load(0)
  assert label.shape == (4, 5) and int(label.max()) == 3
  assert src.label_path(0).endswith("x.PNG")


def test_dense_negative_label_values_rejected(tmp_path):
  top = os.path.join(str(tmp_path), "ADE20K_2021_17_01")
  os.makedirs(os.path.join(top, "images_detectron2", "validation"))
  os.makedirs(os.path.join(top, "annotations_detectron2", "validation"))
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(
      os.path.join(top, "images_detectron2", "validation", "y.jpg"))
  lab = np.zeros((4, 5), np.int32)
  lab[0, 0] = -1
  Image.fromarray(lab).save(os.path.join(top, "annotations_detectron2", "validation", "y.tif"))
  src = dense.DetectronSemSegSource("ade20k_847", str(tmp_path))
  with pytest.raises(DataError, match=r"y.tif: label values \[-1\] are neither classes"):
    src.load(0)


def test_synthetic_dense_negative_max_images_means_all(tmp_path):
  # `describe_images --max-images -3` crashed with "__len__() should return >= 0"; the help
  # says "> 0: the first images only", so <= 0 is every image (as the detectron2 sources do).
  import json  # pylint: disable=import-outside-toplevel
  from fssjax.data import synthetic  # pylint: disable=import-outside-toplevel
  from fssjax.data import synthetic_dense  # pylint: disable=import-outside-toplevel
  from fssjax.data import synthetic_truth  # pylint: disable=import-outside-toplevel
  root = str(tmp_path)
  os.makedirs(synthetic.image_dir(root, "val"))
  os.makedirs(synthetic_truth.label_dir(root, "val"))
  os.makedirs(os.path.dirname(synthetic_truth.scenes_file(root, "val")), exist_ok=True)
  with open(synthetic_truth.scenes_file(root, "val"), "w", encoding="utf-8") as f:
    f.write("[]")
  with open(synthetic.stamp_file(root), "w", encoding="utf-8") as f:
    json.dump({"val": 5}, f)
  assert len(synthetic_dense.SyntheticDenseSource(root, "val", max_images=-3)) == 5
  assert len(synthetic_dense.SyntheticDenseSource(root, "val", max_images=2)) == 2
  assert len(synthetic_dense.SyntheticDenseSource(root, "val", max_images=0)) == 5


# ------------------------------------------------------------------------------------------
# Polygons.


def test_polygons_to_mask_single_array_instead_of_list():
  sq = np.array([[0, 0], [7, 0], [7, 7], [0, 7]])
  assert polygons.polygons_to_mask([sq], 8, 8).sum() == 64
  with pytest.raises(ValueError, match=r"one array of shape \(4, 2\); expected a list"):
    polygons.polygons_to_mask(sq, 8, 8)
  with pytest.raises(ValueError, match=r"polygon 0 has shape \(6,\); expected \[N, 2\]"):
    polygons.polygons_to_mask([np.array([0, 0, 7, 0, 7, 7])], 8, 8)


def test_parse_polygons_bad_arguments():
  sq = "((0,0),(10,0),(10,10),(0,10))"
  with pytest.raises(ValueError, match="num_points=0"):
    polygons.parse_polygons(sq, 20, 20, 0)
  with pytest.raises(ValueError, match="height=0, width=0"):
    polygons.parse_polygons(sq, 0, 0, 4)
  # The answer text itself still never raises.
  assert polygons.parse_polygons(None, 20, 20).status == "failed"


# ------------------------------------------------------------------------------------------
# Multi-scale deformable attention.


@pytest.fixture(scope="module")
def msda():
  m = da.MSDeformAttn(embed_dim=16, num_heads=2, n_levels=2, n_points=2)
  shapes = ((4, 4), (2, 2))
  h = jnp.zeros((1, 20, 16))
  ref = jnp.zeros((1, 20, 2, 2))
  params = m.init(jax.random.key(0), h, h, ref, shapes)
  return m, params, shapes, h, ref


def test_msdeformattn_reference_points_levels(msda):
  m, params, shapes, h, _ = msda
  with pytest.raises(ValueError, match=r"reference_points has shape \(1, 20, 3, 2\); "
                     r"expected \[B=1, Q=20, L=2, 2\]"):
    m.apply(params, h, h, jnp.zeros((1, 20, 3, 2)), shapes)
  with pytest.raises(ValueError, match="reference_points has shape"):
    m.apply(params, h, h, jnp.zeros((1, 20, 2)), shapes)


def test_msdeformattn_widths_and_mask(msda):
  m, params, shapes, h, ref = msda
  with pytest.raises(ValueError, match=r"hidden_states has shape \(1, 20, 8\); expected "
                     r"\[B, Q, embed_dim=16\]"):
    m.apply(params, jnp.zeros((1, 20, 8)), h, ref, shapes)
  with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 21\); expected \[B, S\]"):
    m.apply(params, h, h, ref, shapes, attention_mask=jnp.zeros((1, 21), bool))
  out = m.apply(params, h, h, ref, shapes, attention_mask=jnp.zeros((1, 20), bool))
  assert out.shape == (1, 20, 16)


# ------------------------------------------------------------------------------------------
# Loaders given the wrong path.


def test_load_llava_given_a_file_or_missing_folder(tmp_path):
  from fssjax.weights import llava as wllava  # pylint: disable=import-outside-toplevel
  f = os.path.join(FIXTURES, "llava", "hf", "model.safetensors")
  with pytest.raises(FileNotFoundError, match="model.safetensors is a file; expected a model "
                     "directory holding config.json"):
    wllava.load_llava(f)
  with pytest.raises(FileNotFoundError, match="model directory .*nope does not exist"):
    wllava.load_llava(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="is a file; expected a model directory"):
    wllava.load_clip_vision(f)


# ------------------------------------------------------------------------------------------
# Retrieval evaluator settings are checked before training, as user errors.


def _retrieval_evaluator(**overrides):
  import importlib.util  # pylint: disable=import-outside-toplevel
  from fssjax.methods import retrieval  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(FIXTURES), "..", "configs", "retrieval_coco.py")
  spec = importlib.util.spec_from_file_location("retrieval_coco_newuser", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("demo")
  block = dict(config.evals.retrieval.to_dict())
  block.update(overrides)
  return retrieval.make_evaluator("retrieval", config, block, every=-1, prefix="eval",
                                  batch_size=4, num_summary=0)


def test_retrieval_settings_checked_at_construction():
  from fssjax.checks import user_errors  # pylint: disable=import-outside-toplevel
  assert _retrieval_evaluator().top_r == 3
  assert _retrieval_evaluator(top_r=None).top_r == 3
  # top_r=0 used to become 3 silently ('or 3'); a bad LLM backend or an openai block without
  # a model used to pass and fail only after training, when the table was first computed.
  for overrides, message in [
      (dict(top_r=0), r"evals.retrieval.top_r=0; expected .* >= 1"),
      (dict(llm=dict(backend="bogus")), r"evals.retrieval.llm: .*backend='bogus'"),
      (dict(llm=dict(backend="openai")), r"evals.retrieval.llm: openai backend: 'model' is "
       "empty"),
      (dict(rankers=("random", "foo")), r"rankers: unknown \['foo'\]"),
      (dict(similarity="nope"), r"similarity='nope'")]:
    with pytest.raises(user_errors(), match=message):
      _retrieval_evaluator(**overrides)
  # Rankers that need no LLM do not check the LLM block.
  assert _retrieval_evaluator(rankers=("random",), llm=dict(backend="bogus")).rankers == (
      "random",)


# ------------------------------------------------------------------------------------------
# Mask2Former transformer module inputs.


@pytest.fixture(scope="module")
def m2f():
  from fssjax.nn import mask2former as m2  # pylint: disable=import-outside-toplevel
  cfg = m2.Mask2FormerConfig(feature_size=16, mask_feature_size=16, hidden_dim=16,
                             encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=1,
                             num_attention_heads=2, dim_feedforward=32, num_queries=5)
  tm = m2.Mask2FormerTransformerModule(cfg, 16)
  ms = [jnp.zeros((1, 2, 2, 16)), jnp.zeros((1, 4, 4, 16)), jnp.zeros((1, 8, 8, 16))]
  mf = jnp.zeros((1, 16, 16, 16))
  return tm, tm.init(jax.random.key(0), ms, mf), ms, mf


@pytest.mark.parametrize("case, message", [
    ("two_levels", r"2 multi-scale feature maps; expected 3"),
    ("nchw", r"feature map 0 has shape \(1, 16, 2, 2\); expected \[B=1, h, w, 16\]"),
    ("mask_width", r"mask_features has shape \(1, 16, 16, 8\); expected \[B, H, W, "
     r"mask_feature_size=16\]"),
    ("queries", r"query_features has shape \(1, 7, 16\); expected .* = \(1, 5, 16\)"),
    ("bias", r"self_attn_bias has shape \(1, 2, 7, 7\)"),
])
def test_mask2former_transformer_module_input_errors(m2f, case, message):
  tm, params, ms, mf = m2f
  kw = {}
  if case == "two_levels":
    ms = ms[:2]
  elif case == "nchw":
    ms = [jnp.zeros((1, 16, 2, 2))] + ms[1:]
  elif case == "mask_width":
    mf = jnp.zeros((1, 16, 16, 8))
  elif case == "queries":
    kw["query_features"] = jnp.zeros((1, 7, 16))
  else:
    kw["self_attn_bias"] = jnp.zeros((1, 2, 7, 7))
  with pytest.raises(ValueError, match=message):
    tm.apply(params, ms, mf, **kw)


def test_mask2former_valid_hooks_still_accepted(m2f):
  tm, params, ms, mf = m2f
  out = tm.apply(params, ms, mf, query_features=jnp.ones((1, 5, 16)),
                 self_attn_bias=jnp.zeros((1, 1, 5, 5)))
  assert isinstance(out, dict)


def test_position_word_of_an_empty_mask():
  from fssjax.data import captions  # pylint: disable=import-outside-toplevel
  m = np.zeros((9, 9), bool)
  m[0, 0] = True
  assert captions.position_word(m) == captions.POSITIONS[0][0]
  with pytest.raises(ValueError, match="the 9 x 9 mask is empty"):
    captions.position_word(np.zeros((9, 9), bool))
  with pytest.raises(ValueError, match=r"mask has shape \(9, 9, 1\); expected \[H, W\]"):
    captions.position_word(np.zeros((9, 9, 1), bool))


def test_truncated_safetensors_names_the_file_and_sizes(tmp_path):
  """A safetensors file cut short is refused when opened, naming the file and both sizes."""
  import os
  import shutil
  from fssjax.weights import tensors
  src = os.path.join(os.path.dirname(__file__), "fixtures", "sam", "hf", "model.safetensors")
  path = tmp_path / "model.safetensors"
  shutil.copy(src, path)
  full = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(full - 1000)
  with pytest.raises(ValueError, match=rf"model.safetensors: truncated safetensors file: its "
                                       rf"header needs {full} bytes, the file has {full - 1000}"):
    tensors.TensorFile(str(path))
  assert tensors.TensorFile(src).keys()  # the intact file opens
