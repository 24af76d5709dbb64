"""The evaluator suite: config parsing, the dense evaluator against hand-computed confusion
matrices, and the episodic headline over the classes that could be evaluated.

`LayoutMethod.predict_dense` reads a code from each (uniform) image and returns a fixed 2x2
class layout as one-hot logits; upsampled with half-pixel bilinear weights to an even label
size, every label pixel takes the class of its quadrant, so the confusion matrices below are
counted by hand. `ColourOracle.predict` marks the query pixels of the support object's colour:
a perfect predictor on images whose classes have distinct colours.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from fssjax import configlib
from fssjax import evaluate
from fssjax import evaluators
from fssjax import monitoring
from fssjax import results as results_lib
from fssjax.data.memory import InMemorySource
from fssjax.methods.base import Method

I = 255
NAMES = ("a", "b", "c", "d")
# Layouts (class of each quadrant) chosen by the image's code (its red value).
LAYOUTS = {10: [[0, 1], [2, 3]], 20: [[1, 1], [0, 0]]}


class LayoutMethod(Method):
  evaluators = ("episodic", "dense")
  normalization = "minus_one_one"

  def __init__(self):
    super().__init__(ml_collections.ConfigDict())

  def init(self, rng, batch):
    return {"scale": jnp.ones(())}, {}

  def loss(self, params, frozen, batch, rng):
    raise NotImplementedError

  def predict(self, params, frozen, batch):
    return batch["query_image"][..., 0]

  def predict_dense(self, params, frozen, batch, class_names):
    code = jnp.round((batch["image"][:, 0, 0, 0] + 1.0) * 127.5).astype(jnp.int32)  # [B]
    layout = jnp.where((code == 10)[:, None, None], jnp.asarray(LAYOUTS[10]),
                       jnp.asarray(LAYOUTS[20]))
    return jax.nn.one_hot(layout, len(class_names)) * params["scale"]  # [B, 2, 2, C]


def uniform(h, w, code):
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0] = code
  return image


def dense_source():
  # Image 0 (4x4, layout [[0,1],[2,3]]): quadrants TL truth 0, TR truth 1, BL truth 2, BR:
  # row 2 ignored, row 3 truth 2 -> predicted 3 (a class absent from every truth).
  truth0 = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, I, I], [2, 2, 2, 2]], np.uint8)
  # Image 1 (2x6, layout [[1,1],[0,0]]): row 0 predicted 1, row 1 predicted 0.
  truth1 = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]], np.uint8)
  return evaluators.InMemoryDenseSource([uniform(4, 4, 10), uniform(2, 6, 20)],
                                        [truth0, truth1], NAMES, name="tiny")


# Rows truth, columns prediction, counted by hand from the comments above.
WANT = np.array([[4 + 3, 3, 0, 0],
                 [3, 4 + 3, 0, 0],
                 [0, 0, 4, 2],
                 [0, 0, 0, 0]])


def dense_config(batch_size=2, every=0):
  config = configlib.base_config()
  config.evals = ml_collections.ConfigDict(dict(
      ade=dict(type="dense", every=every, prefix="dense", batch_size=batch_size,
               data=dict(dataset="tiny", image_size=8, resize="square"))))
  return config


def run_dense(batch_size, mesh=None):
  method = LayoutMethod()
  suite = evaluators.from_config(dense_config(batch_size), method, mesh,
                                 data={"ade": dense_source()})
  params, frozen = method.init(None, None)
  return suite, suite.run(params, frozen, step=7)["ade"]


def test_dense_evaluator_confusion_matrix_by_hand():
  for batch_size in (2, 3):  # 3: one padding row that must count nothing
    suite, res = run_dense(batch_size)
    np.testing.assert_array_equal(res["confusion_matrix"], WANT)
  # IoU: a 7/13, b 7/13, c 4/6; d was predicted but is absent from the truth: left out of
  # the mean (detectron2's rule since 2022), not averaged in as 0.
  iou = [7 / 13, 7 / 13, 4 / 6]
  assert res["miou"] == pytest.approx(np.mean(iou) * 100)
  assert res["miou"] != pytest.approx(np.sum(iou) / 4 * 100)
  assert res["per_class_iou"][2] == pytest.approx(400 / 6)
  assert np.isnan(res["per_class_iou"][3]) and res["predicted_not_present"] == [3]
  assert res["pixel_acc"] == pytest.approx(18 / 26 * 100)
  assert res["macc"] == pytest.approx(np.mean([7 / 10, 7 / 10, 4 / 6]) * 100)
  assert res["n_images"] == 2 and res["n_classes_present"] == 3 and res["ignore_label"] == 255
  assert suite.headline({"ade": res}) == res["miou"]
  line = suite.summary_line({"ade": res})
  assert f"mIoU {res['miou']:.2f}" in line and "3 of 4 classes in the truth" in line
  table = evaluate.format_results(res)
  assert "Dense evaluation: 2 images" in table and f"{res['pixel_acc']:10.2f}" in table
  assert "     2  c" in table and "     3  d" not in table  # d: absent from the truth
  assert suite.example_batch()["image"].shape == (1, 8, 8, 3)


def test_dense_16_bit_labels_ignore_65535():
  src = dense_source()
  labels = [np.where(l == I, 65535, l).astype(np.uint16) for l in src._labels]
  src16 = evaluators.InMemoryDenseSource(src._images, labels, NAMES, ignore_label=65535)
  method = LayoutMethod()
  suite = evaluators.from_config(dense_config(), method, data={"ade": src16})
  res = suite.run({"scale": jnp.ones(())}, {}, step=1)["ade"]
  np.testing.assert_array_equal(res["confusion_matrix"], WANT)
  assert res["ignore_label"] == 65535
  assert evaluators.DENSE_IGNORE_LABELS["ade20k_847"] == 65535
  assert evaluators.DENSE_IGNORE_LABELS["pascal_context_459"] == 65535


def test_config_errors_and_cadence():
  method = LayoutMethod()

  class EpisodicOnly(LayoutMethod):
    evaluators = ("episodic",)

  with pytest.raises(ValueError, match=r"evals.ade: EpisodicOnly supports the evaluators "
                                       r"\['episodic'\], not 'dense'"):
    evaluators.from_config(dense_config(), EpisodicOnly(), data={"ade": dense_source()})
  bad = dense_config()
  bad.evals.ade.colour = "red"
  with pytest.raises(ValueError, match=r"evals.ade: unknown keys \['colour'\]"):
    evaluators.from_config(bad, method, data={"ade": dense_source()})
  bad = dense_config()
  bad.evals.ade.type = "panoptic"
  with pytest.raises(ValueError, match=r"evals.ade.type='panoptic'"):
    evaluators.from_config(bad, method)
  # Cadence: every=-1 follows train.eval_every; 0 only at the end; < -1 never.
  config = dense_config(every=-1)
  config.train.eval_every = 5
  suite = evaluators.from_config(config, method, data={"ade": dense_source()})
  assert [s for s in range(1, 13) if suite.due(s, s == 12)] == [5, 10, 12]
  suite = evaluators.from_config(dense_config(every=0), method, data={"ade": dense_source()})
  assert [s for s in range(1, 13) if suite.due(s, s == 12)] == [12]
  suite = evaluators.from_config(dense_config(every=-2), method)  # disabled: builds nothing
  assert not suite.enabled and not suite.due(12, True)
  # Without config.evals: one episodic evaluator 'fewshot' with the 'eval' prefix.
  assert evaluators.specs(configlib.base_config()) == {
      "fewshot": dict(type="episodic", every=-1, prefix="eval")}


# ----------------------------------------------------------------------------------------
# Episodic: headline over the evaluated classes.

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


class ColourOracle(Method):
  """Foreground = query pixels of the support object's colour (a perfect predictor here)."""

  normalization = "minus_one_one"
  kshot = "joint"

  def __init__(self):
    super().__init__(ml_collections.ConfigDict())

  def init(self, rng, batch):
    return {}, {}

  def loss(self, params, frozen, batch, rng):
    raise NotImplementedError

  def predict(self, params, frozen, batch):
    sup = batch["support_images"][:, 0]
    m = (batch["support_masks"][:, 0] == 1)[..., None]
    colour = jnp.sum(sup * m, axis=(1, 2)) / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1)
    dist = jnp.sum(jnp.abs(batch["query_image"] - colour[:, None, None]), axis=-1)
    return 0.5 - dist


def colour_source(images_per_class):
  images, labels = [], []
  for c, n in enumerate(images_per_class):
    for i in range(n):
      image = np.zeros((16, 16, 3), np.uint8)
      label = np.zeros((16, 16), np.uint8)
      y, x = 2 + i, 3 + 2 * i
      image[y:y + 7, x:x + 6] = COLOURS[c]
      label[y:y + 7, x:x + 6] = c + 1
      images.append(image)
      labels.append(label)
  return InMemorySource(images, labels, [f"class{c}" for c in range(len(images_per_class))],
                        name="colours")


def episodic_suite(images_per_class, num_episodes=24):
  config = configlib.base_config()
  config.data.image_size = 16
  config.data.shot = 1
  config.eval.batch_size = 4
  config.eval.num_summary_images = 2
  source = colour_source(images_per_class)
  data = evaluators.EpisodicData.from_source(
      "synthetic", source, range(len(images_per_class)), shot=1, num_episodes=num_episodes,
      test_seed=0)
  suite = evaluators.from_config(config, ColourOracle(), data={"fewshot": data})
  suite.config = config
  return suite, data


def test_perfect_predictor_headline_over_evaluated_classes():
  # Class 4 has one image: no 1-shot episode (a query plus a distinct support) is possible.
  suite, data = episodic_suite([3, 3, 3, 3, 1])
  assert data.left_out == (4,)
  res = suite.run({}, {}, step=3)["fewshot"]
  assert res["miou"] == pytest.approx(100.0)  # the headline: the 4 evaluated classes
  assert res["miou_all_classes"] == pytest.approx(80.0)  # published logger: class 4 as 0
  assert res["left_out_classes"] == [4]
  assert res["per_class_episodes"][4] == 0 and res["n_episodes"] == 24
  assert suite.headline({"fewshot": res}) == pytest.approx(100.0)
  example = suite.example_batch()
  assert example["query_image"].shape == (1, 16, 16, 3) and "valid" not in example
  assert example["support_masks"].shape == (1, 1, 16, 16)
  line = suite.summary_line({"fewshot": res})
  assert "mIoU 100.00 over 4 of 5 classes" in line and "published logger: 80.00" in line
  assert "[4]" in line
  table = evaluate.format_results(res)
  assert "80.00" in table and "left out" in table and "class4" in table
  p = res["protocol"]
  assert p["episodes"] == 24 and p["resolution"] == "16x16" and p["kshot"] == 1
  assert len(p["manifest_sha256"]) == 64 and p["left_out_classes"] == [4]
  # Summaries carry each episode's IoU (100 for a perfect prediction).
  assert [s["iou"] for s in res["summaries"]] == [100.0, 100.0]


def test_headline_equals_all_classes_when_every_class_is_evaluated():
  suite, data = episodic_suite([3, 3, 3, 3, 2])
  assert data.left_out == ()
  res = suite.run({}, {}, step=3)["fewshot"]
  assert res["miou"] == res["miou_all_classes"] == pytest.approx(100.0)
  assert res["left_out_classes"] == []
  assert "over" not in suite.summary_line({"fewshot": res})


def test_episodic_evaluator_is_evaluate_unchanged():
  # The suite's numbers are those of fssjax.evaluate.evaluate on the same batches.
  suite, data = episodic_suite([3, 3, 3, 3, 2], num_episodes=10)

  class Noisy(ColourOracle):

    def predict(self, params, frozen, batch):
      return super().predict(params, frozen, batch) + 0.3 * jnp.sin(
          batch["query_image"][..., 1] * 7.0)

  method = Noisy()
  suite.method = method
  got = suite.run({}, {}, step=1)["fewshot"]
  want = evaluate.evaluate(method, {}, {}, suite["fewshot"].loader(method), data.class_ids,
                           progress=False)
  for key in ("miou", "fbiou", "per_class_iou", "baseline_miou", "baseline_fbiou",
              "n_episodes"):
    assert got[key] == want[key], key
  assert 0 < got["miou"] < 100


def test_suite_writes_tensorboard_and_results_files(tmp_path):
  suite, data = episodic_suite([3, 3, 3, 3, 1])
  writer = monitoring.create_writer(str(tmp_path / "tb"))
  assert suite.due(4, is_last=True)
  res = suite.run({}, {}, step=4, writer=writer)
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  acc.Reload()
  tags = set(acc.Tags()["tensors"])
  assert {"eval/miou", "eval/miou_all_classes", "eval/fbiou", "eval/episodes",
          "eval/per_class_iou/000_class0"} <= tags
  assert "eval/per_class_iou/004_class4" not in tags  # left out
  (event,) = acc.Tensors("eval/miou_all_classes")
  assert float(tensor_util.make_ndarray(event.tensor_proto)) == pytest.approx(80.0)
  (path,) = suite.write_results(str(tmp_path), "train", 4, res, suite.config)
  assert os.path.basename(path) == "train_fold0_shot1_step4.json"
  doc = results_lib.read(path)
  assert doc["miou"] == pytest.approx(100.0) and doc["miou_all_classes"] == pytest.approx(80.0)
  assert doc["left_out_classes"] == [4] and doc["num_episodes"] == 24
  assert doc["protocol"]["manifest_sha256"] == data.manifest_sha256
  assert doc["protocol"]["episodes"] == 24 and doc["protocol"]["resolution"] == "16x16"


class ColourDense(LayoutMethod):
  """Dense oracle for `colour_source` images: background where black, else the class whose
  colour is nearest."""

  def predict_dense(self, params, frozen, batch, class_names):
    pixels = (batch["image"] + 1.0) * 127.5  # [B, H, W, 3] in 0..255
    colours = jnp.asarray([(0, 0, 0)] + COLOURS[:len(class_names) - 1], jnp.float32)
    dist = jnp.sum(jnp.abs(pixels[..., None, :] - colours), axis=-1)  # [B, H, W, C]
    return -dist


def test_dense_view_of_a_few_shot_source():
  source = colour_source([2, 3])
  dense = evaluators.SemanticFromFewShot(source)
  assert dense.class_names == ("background", "class0", "class1") and len(dense) == 5
  image, label = dense.load(2)  # the first image of class 1
  assert set(np.unique(label).tolist()) == {0, 2} and np.sum(label == 2) == 7 * 6
  config = dense_config()
  config.evals.ade.data.image_size = 16
  suite = evaluators.from_config(config, ColourDense(), data={"ade": dense})
  res = suite.run({"scale": jnp.ones(())}, {}, step=1)["ade"]
  want = np.diag([5 * 256 - 5 * 42, 2 * 42, 3 * 42])
  np.testing.assert_array_equal(res["confusion_matrix"], want)
  assert res["miou"] == pytest.approx(100.0) and res["pixel_acc"] == pytest.approx(100.0)


_SUBPROCESS = r"""
import json, os, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
import jax
import test_evaluators as t
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
out = {}
for b in (8, 3):
  _, res = t.run_dense(b, mesh)
  out[b] = res["confusion_matrix"].tolist()
# The padded shorter-side protocol with per-image priors, sharded over 8 devices.
out["priors"] = t.priors_miou(mesh)
print("RESULT" + json.dumps(out))
"""


def test_dense_on_eight_devices_counts_each_pixel_once():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TESTS_DIR=os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])
  assert out.pop("priors") == pytest.approx(100.0)
  for matrix in out.values():
    np.testing.assert_array_equal(np.asarray(matrix), WANT)


def test_model_override_builds_a_variant_for_one_evaluator():
  """evals.<name>.model: that evaluator runs a method of the same class whose config.model
  carries the override; the others run the suite's method; unknown keys are refused."""
  import ml_collections
  from fssjax import evaluators as ev
  from fssjax.methods.base import Method

  class Toy(Method):
    MODEL_DEFAULTS = {"mode": "both"}

    def init(self, rng, batch):  # pragma: no cover - not called
      raise NotImplementedError

    def loss(self, params, frozen, batch, rng):  # pragma: no cover
      raise NotImplementedError

    def predict(self, params, frozen, batch):  # pragma: no cover
      raise NotImplementedError

  config = ml_collections.ConfigDict(dict(method="toy", model=dict(mode="both")))
  base = Toy(config)
  variant = ev._method_variant(config, base, "visual", {"mode": "visual"})
  assert type(variant) is Toy and variant is not base
  assert variant.opts["mode"] == "visual" and base.opts["mode"] == "both"
  assert config.model.mode == "both"  # the run's config is not touched
  assert ev._method_variant(config, base, "fewshot", None) is base
  with pytest.raises(ValueError, match=r"evals\.visual\.model: unknown model keys \['mdoe'\]"):
    ev._method_variant(config, base, "visual", {"mdoe": "visual"})


def test_model_override_that_changes_parameters_is_refused():
  """An override that would change the trained parameters' shapes is a ConfigError at build
  time (naming the parameter), one that changes only inference is accepted."""
  import ml_collections
  from fssjax import evaluators as ev
  from fssjax.methods.base import ConfigError, Method

  class Toy(Method):
    MODEL_DEFAULTS = {"width": 4, "mode": "both"}

    def init(self, rng, batch):
      return {"params": {"dense": {"kernel": jax.random.normal(
          rng, (batch["x"].shape[-1], self.opts["width"]))}}}

    def loss(self, params, frozen, batch, rng):  # pragma: no cover
      raise NotImplementedError

    def predict(self, params, frozen, batch):  # pragma: no cover
      raise NotImplementedError

  config = ml_collections.ConfigDict(dict(method="toy", model=dict(width=4, mode="both")))
  base = Toy(config)
  batch = {"x": np.zeros((1, 3), np.float32)}
  ev._check_variant_params("visual", base,
                           ev._method_variant(config, base, "visual", {"mode": "visual"}), batch)
  wider = ev._method_variant(config, base, "wide", {"width": 8})
  with pytest.raises(ConfigError, match=r"evals\.wide\.model changes the model's parameters "
                                        r"\(1 differ: \['params'\]\['dense'\]\['kernel'\]: "
                                        r"trained \(\(3, 4\), 'float32'\), override "
                                        r"\(\(3, 8\), 'float32'\)\)"):
    ev._check_variant_params("wide", base, wider, batch)


# ----------------------------------------------------------------------------------------
# The open-vocabulary protocol: shorter side, padding, crop, resize back, per-image inputs.

RED = {0: 100.0, 1: 200.0, 2: 0.0}  # class -> red value; 2 = the padding's colour (black)


class ColourStride(Method):
  """predict_dense: one-hot-like scores of the nearest red value (class 2 = black, which is
  what zero padding looks like with normalization 'none') at stride `stride` (top-left
  pixel of each cell); with a per-image 'prior_hint' [C] added everywhere when asked."""

  evaluators = ("dense",)
  normalization = "none"

  def __init__(self, stride=1, use_hint=False, candidates=None, name_emb=None):
    super().__init__(ml_collections.ConfigDict())
    self.stride, self.use_hint = stride, use_hint
    self._candidates, self._name_emb = candidates, name_emb

  def init(self, rng, batch):
    return {}

  # The dense evaluator calls predict_dense only; the episodic interface is not used.
  def loss(self, params, frozen, batch, rng):
    raise NotImplementedError

  def predict(self, params, frozen, batch):
    raise NotImplementedError

  def dense_inputs(self, source, split):
    from fssjax.methods.base import DenseInputs
    hint = np.zeros((len(source), 3), np.float32)
    for i in range(len(source)):
      hint[i, int(np.bincount(source.load(i)[1].reshape(-1) % 255).argmax())] = 100.0
    return DenseInputs(per_image={"prior_hint": hint} if self.use_hint else {},
                       candidates=self._candidates)

  def class_embeddings(self, names):
    return np.stack([self._name_emb[n] for n in names])

  def predict_dense(self, params, frozen, batch, class_names):
    red = batch["image"][:, ::self.stride, ::self.stride, 0]
    centres = jnp.asarray([RED[0], RED[1], RED[2]])
    logits = -jnp.abs(red[..., None] - centres) / 10.0
    if self.use_hint:
      logits = logits * 0.0 + batch["prior_hint"][:, None, None, :]
    if "class_embeddings" in batch:  # candidate-free mode: the hint's name among candidates
      target = batch["prior_hint"] / 100.0 @ jnp.stack([jnp.asarray(self._name_emb[n])
                                                        for n in ("a", "b", "c")])
      score = jnp.einsum("bkd,bd->bk", batch["class_embeddings"], target)
      logits = jnp.broadcast_to(score[:, None, None, :], red.shape + score.shape[-1:])
    return logits


def _split_image(h, w, vertical, boundary):
  """Image and label: class 0 before `boundary` (columns if vertical, else rows), 1 after."""
  label = np.zeros((h, w), np.int32)
  if vertical:
    label[:, boundary:] = 1
  else:
    label[boundary:] = 1
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0] = np.where(label == 0, RED[0], RED[1])
  return image, label


def _protocol_eval(method, source, image_size, batch_size=2, candidates="dataset", mesh=None,
                   **data):
  ev = evaluators.DenseEvaluator("p", ml_collections.ConfigDict(dict(image_size=image_size,
                                                                     **data)),
                                 every=0, prefix="p", batch_size=batch_size, source=source,
                                 candidates=candidates, num_summary=len(source), mesh=mesh)
  return ev, ev.run(method, {}, {})


def test_dense_protocol_non_square_images_map_back_pixel_exactly():
  # Image 0: 40 x 60 -> shorter side 20: 20 x 30 (exact halving, split at an even column).
  # Image 1: 30 x 20 -> 30 x 20 (already 20), split at row 12. Batch input: 32 x 32 after
  # padding (to /32); the padding is black = class 2 for the method. Scores at stride 1 are
  # cropped to each image and resized back: every label pixel gets its own class, and no
  # pixel is predicted as the padding's class 2.
  a, la = _split_image(40, 60, True, 30)
  b, lb = _split_image(30, 20, False, 12)
  src = evaluators.InMemoryDenseSource([a, b], [la, lb], ["a", "b", "c"])
  ev, res = _protocol_eval(ColourStride(stride=1), src, image_size=20)
  assert ev.resized_shape(40, 60) == (20, 30) and ev.resized_shape(30, 20) == (30, 20)
  for (_, truth, pred), label in zip(ev.last_examples, [la, lb]):
    assert pred.shape == label.shape
    np.testing.assert_array_equal(pred, label)
  np.testing.assert_array_equal(res["confusion_matrix"],
                                np.diag([(la == 0).sum() + (lb == 0).sum(),
                                         (la == 1).sum() + (lb == 1).sum(), 0]))
  assert res["miou"] == pytest.approx(100.0) and res["protocol"]["resize"] == "shortest_edge"
  # Without the crop (scores of the padded input resized straight to the label) the padding
  # would leak in: image 0 is 20 of 32 rows of the input.
  wrong = evaluate._interp(32, 40, False)  # pylint: disable=protected-access
  assert np.abs(wrong - evaluators.protocol_matrix(32, 32, 20, 40)).max() > 0.1


def _torch_bilinear(x, out):
  """PyTorch F.interpolate(mode='bilinear', align_corners=False) along axis 0, by formula."""
  n = x.shape[0]
  y = np.zeros((out,) + x.shape[1:])
  for i in range(out):
    src = max((i + 0.5) * n / out - 0.5, 0.0)
    i0 = min(int(np.floor(src)), n - 1)
    i1 = min(i0 + 1, n - 1)
    t = src - i0
    y[i] = (1 - t) * x[i0] + t * x[i1]
  return y


def test_dense_protocol_equals_detectron2_postprocess_at_stride_4():
  # Scores at a quarter of the padded input: detectron2 upsamples them to the padded input,
  # crops the image, resizes to the label (sem_seg_postprocess); computed here by formula.
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (27, 41, 3), np.uint8),
            rng.integers(0, 256, (50, 22, 3), np.uint8)]
  labels = [rng.integers(0, 3, im.shape[:2]).astype(np.int32) for im in images]
  src = evaluators.InMemoryDenseSource(images, labels, ["a", "b", "c"])
  method = ColourStride(stride=4)
  ev, _ = _protocol_eval(method, src, image_size=18)
  # Rebuild the batch input the evaluator gave the method.
  from fssjax.data import dense
  small = [dense.resize_for_eval(im, 18) for im in images]
  hp = evaluate.round_up(max(s.shape[0] for s in small), 32)
  wp = evaluate.round_up(max(s.shape[1] for s in small), 32)
  x = np.zeros((2, hp, wp, 3), np.float32)
  for i, s in enumerate(small):
    x[i, :s.shape[0], :s.shape[1]] = s
  logits = np.asarray(method.predict_dense({}, {}, {"image": jnp.asarray(x)}, ("a", "b", "c")))
  for i, (s, label) in enumerate(zip(small, labels)):
    up = _torch_bilinear(_torch_bilinear(logits[i], hp).swapaxes(0, 1), wp).swapaxes(0, 1)
    crop = up[:s.shape[0], :s.shape[1]]
    back = _torch_bilinear(_torch_bilinear(crop, label.shape[0]).swapaxes(0, 1),
                           label.shape[1]).swapaxes(0, 1)
    np.testing.assert_array_equal(ev.last_examples[i][2], back.argmax(-1))


def _hint_source():
  # Uniform images whose colours say nothing; each image's per-image hint names its class.
  sizes = [(9, 13), (12, 7), (8, 8), (15, 10), (7, 11)]
  classes = [0, 2, 1, 1, 0]
  images = [np.full(s + (3,), 100, np.uint8) for s in sizes]
  labels = [np.full(s, c, np.int32) for s, c in zip(sizes, classes)]
  return evaluators.InMemoryDenseSource(images, labels, ["a", "b", "c"])


def priors_miou(mesh=None):
  return _protocol_eval(ColourStride(use_hint=True), _hint_source(), image_size=8,
                        mesh=mesh)[1]["miou"]


def test_dense_protocol_passes_each_images_priors():
  # With batch 2 over 5 images (a padded last batch) every image must get its own hint.
  src = _hint_source()
  _, res = _protocol_eval(ColourStride(use_hint=True), src, image_size=8)
  assert res["miou"] == pytest.approx(100.0) and res["n_images"] == 5
  _, res = _protocol_eval(ColourStride(use_hint=False), src, image_size=8)
  assert res["miou"] < 100.0


def test_dense_candidate_free_mode_scores_description_names():
  # Each image's candidates are names from its description (none of them a data set name);
  # the method picks a candidate per image, and its pixels are scored as the data set class
  # with the nearest name embedding.
  emb = {"a": np.array([1.0, 0, 0]), "b": np.array([0, 1.0, 0]), "c": np.array([0, 0, 1.0]),
         "red a": np.array([0.9, 0.1, 0]), "blue b": np.array([0.1, 0.9, 0.1]),
         "big c": np.array([0, 0.2, 0.9]), "thing": np.array([0.5, 0.5, 0.5])}
  sizes, classes = [(9, 13), (12, 7), (8, 8)], [0, 2, 1]
  cands = [("thing", "red a"), ("big c", "thing", "blue b"), ("blue b",)]
  images = [np.full(s + (3,), 100, np.uint8) for s in sizes]
  labels = [np.full(s, c, np.int32) for s, c in zip(sizes, classes)]
  src = evaluators.InMemoryDenseSource(images, labels, ["a", "b", "c"])
  method = ColourStride(use_hint=True, candidates=cands, name_emb=emb)
  _, res = _protocol_eval(method, src, image_size=8, candidates="description")
  assert res["miou"] == pytest.approx(100.0), res["confusion_matrix"]
  assert res["protocol"]["candidates"] == "description"
  with pytest.raises(ValueError, match="gives no per-image candidate names"):
    _protocol_eval(ColourStride(use_hint=True, name_emb=emb), src, image_size=8,
                   candidates="description")
