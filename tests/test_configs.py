"""DiffewS configs (published settings, demo), the missing-inputs preflight and its CLI message."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from fssjax import train
from fssjax.data import pipeline, transforms
from fssjax.methods import get_method

REPO = pathlib.Path(__file__).resolve().parents[1]


def _module(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name,dataset,fold_arg", [
    ("diffews_coco", "coco20i", "fold=3,shot=5,train_shot_max=5"),
    ("diffews_pascal", "pascal5i", "fold=2,shot=5,train_shot_max=5"),
])
def test_diffews_configs_carry_the_published_settings(name, dataset, fold_arg):
  c = _module(name).get_config(fold_arg)
  assert c.method == "diffews" and c.data.dataset == dataset
  assert (c.data.fold, c.data.shot, c.data.train_shot_max) == (int(fold_arg[5]), 5, 5)
  assert c.data.image_size == 512 and c.data.resize == "square" and not c.data.augment
  assert c.data.train_image_interpolation == "nearest"
  assert (c.optimizer.name, c.optimizer.lr, c.optimizer.schedule) == ("adamw", 1e-5, "linear")
  assert (c.optimizer.weight_decay, c.optimizer.grad_clip, c.optimizer.warmup_steps) == (
      0.01, 1.0, 0)
  assert c.train.batch_size == 32 and c.train.grad_accum == 4
  assert c.model.autoencoder == "kl" and c.model.sd_path
  assert (c.model.timestep, c.model.mask_threshold_kind, c.model.mask_threshold) == (
      1, "relative", 0.25)
  with pytest.raises(ValueError, match="Unknown config argument"):
    _module(name).get_config("folds=1")


def test_diffews_demo_config_builds_the_small_unet_with_the_stand_in():
  c = _module("diffews_coco").get_config("demo")
  assert c.data.dataset == "synthetic" and c.model.autoencoder == "space_to_depth"
  assert c.model.sd_path == "" and c.data.root == ""
  method = get_method(c)
  assert method.unet.config.block_out_channels == (32, 64, 128) or list(
      method.unet.config.block_out_channels) == [32, 64, 128]
  assert method.latent_channels == 48 and c.data.image_size % 4 == 0
  assert train.preflight(c) is None  # the synthetic data is generated, nothing is missing


def test_preflight_lists_every_missing_input_with_its_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = _module("diffews_coco").get_config("")
  with pytest.raises(train.MissingInputsError) as e:
    train.preflight(c)
  msg = str(e.value)
  assert "2 input(s)" in msg
  assert "data.root = 'datasets/COCO2014'" in msg and str(tmp_path / "datasets/COCO2014") in msg
  assert "model.sd_path = 'weights/stable-diffusion-2-1'" in msg
  assert str(tmp_path / "weights/stable-diffusion-2-1") in msg
  # Present data, weights folder lacking components: only the weights are reported.
  for sub in ("train2014", "val2014", "annotations"):
    (tmp_path / "datasets/COCO2014" / sub).mkdir(parents=True)
  for sub in ("train2014", "val2014"):
    (tmp_path / f"datasets/COCO2014/annotations/instances_{sub}.json").write_text("{}")
  (tmp_path / "weights/stable-diffusion-2-1/unet").mkdir(parents=True)
  with pytest.raises(train.MissingInputsError) as e:
    train.preflight(c)
  msg = str(e.value)
  assert "1 input(s)" in msg and "data.root" not in msg
  assert "['vae', 'text_encoder', 'tokenizer']" in msg


def test_preflight_names_missing_backbone_weights(tmp_path):
  c = _module("hsnet_coco").get_config(f"root={tmp_path},weights={tmp_path}/r50.safetensors")
  with pytest.raises(train.MissingInputsError, match="model.backbone_weights.*r50.safetensors"):
    train.preflight(c)


def test_cli_without_data_or_weights_says_what_is_missing_and_how_to_run_the_demo(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "fssjax.main", f"--config={REPO}/configs/diffews_coco.py:fold=1",
       f"--workdir={tmp_path}/run"], cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0
  err = proc.stderr
  assert "data.root = 'datasets/COCO2014'" in err and "model.sd_path" in err
  assert str(tmp_path / "weights/stable-diffusion-2-1") in err
  assert "configs/diffews_coco.py:demo --workdir" in err
  assert "Traceback" not in err


def test_nearest_interpolation_is_for_training_images_only():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
  near = transforms.resize_image(image, 16, 16, "nearest")
  # PIL's nearest samples pixel centres: source index floor((dst + 0.5) * in / out).
  rows = np.floor((np.arange(16) + 0.5) * 37 / 16).astype(int)
  cols = np.floor((np.arange(16) + 0.5) * 23 / 16).astype(int)
  np.testing.assert_array_equal(near, image[rows][:, cols])
  assert set(np.unique(near)) <= set(np.unique(image))
  assert not np.array_equal(near, transforms.resize_image(image, 16, 16))
  c = _module("diffews_coco").get_config("")
  assert pipeline.transform_spec(c, "minus_one_one", train=True).interpolation == "nearest"
  assert pipeline.transform_spec(c, "minus_one_one", train=False).interpolation == "bilinear"
  with pytest.raises(ValueError, match="interpolation='cubic'"):
    transforms.TransformSpec(image_size=8, interpolation="cubic")


def test_diffews_demo_recipe_trains_and_evaluates_end_to_end(tmp_path, monkeypatch):
  """The demo config, shrunk (tiny UNet, 32 px, 3 steps), through the generic trainer:
  TensorBoard events with mask images, an orbax checkpoint and results.json appear."""
  import json  # pylint: disable=g-import-not-at-top
  from fssjax.data import synthetic  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("FSSJAX_CACHE_DIR", str(tmp_path / "cache"))
  root = tmp_path / "synth"
  synthetic.generate(str(root), train=60, val=30, size=32, workers=1)
  c = _module("diffews_coco").get_config(f"demo,steps=3,batch=4,root={root}")
  c.data.image_size = 32
  c.data.test_episodes = 4
  c.eval.batch_size = 4
  c.eval.num_summary_images = 2
  c.train.log_every = 1
  c.optimizer.warmup_steps = 1
  c.train.checkpoint_every = 3
  c.model.unet = dict(block_out_channels=[16, 32], layers_per_block=1, attention_head_dim=2,
                      cross_attention_dim=16, norm_num_groups=8, in_channels=48,
                      out_channels=48, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
  work = tmp_path / "run"
  out = train.train_and_evaluate(c, str(work))
  assert out["step"] == 3
  results = json.loads((work / "results.json").read_text())["results"]
  assert results["n_episodes"] == 4 and 0.0 <= results["miou"] <= 100.0
  assert (work / "checkpoints" / "3").is_dir()
  acc = event_accumulator.EventAccumulator(str(work), size_guidance={"tensors": 0})
  acc.Reload()
  tags = acc.Tags()["tensors"]
  assert "train/latent_mse" in tags and "eval/miou" in tags
  assert "eval/episodes" in tags


@pytest.mark.parametrize("name,arg,bad,near", [
    ("hsnet_coco", "", "backbone_weight", "backbone_weights"),
    ("diffews_coco", "", "mask_treshold", "mask_threshold"),
])
def test_every_method_rejects_an_unknown_model_key(name, arg, bad, near):
  c = _module(name).get_config(arg)
  with c.unlocked():
    c.model[bad] = 1
  with pytest.raises(ValueError, match=rf"config.model.{bad}: unknown key.*model.{near}"):
    train.check_config(c)


def test_configs_compose_common_blocks_instead_of_loading_each_other():
  text = (REPO / "configs" / "diffews_pascal.py").read_text()
  assert "spec_from_file_location" not in text and "from configs" in text
  pascal = _module("diffews_pascal").get_config("fold=2")
  coco = _module("diffews_coco").get_config("fold=2")
  assert pascal.data.dataset == "pascal5i" and coco.data.dataset == "coco20i"
  assert pascal.model.to_dict() == coco.model.to_dict()
  assert pascal.optimizer.to_dict() == coco.optimizer.to_dict()


def _expand_braces(path: str) -> list[str]:
  m = re.search(r"\{([^{}]*)\}", path)
  if not m:
    return [path]
  return [p for alt in m.group(1).split(",")
          for p in _expand_braces(path[:m.start()] + alt + path[m.end():])]


def test_readme_names_only_what_exists():
  """Issue 8: every repository path the README names (`configs/...`, `docs/...`, ...) exists
  and is not empty; a documentation file it names (docs/*.md) has content."""
  text = (REPO / "README.md").read_text()
  named = set()
  for span in re.findall(r"`([^`\s]+)`", text):
    path = span.split(":", 1)[0]
    if re.match(r"(configs|docs|notebooks|benchmarks|launch|scripts|fssjax|tests|\.ci)(/|$)",
                path):
      named.update(_expand_braces(path))
  named.update(re.findall(r"\((docs/[\w./-]+)", text))
  assert {"configs/diffews_coco.py", "configs/hsnet_pascal.py", "docs/status.md",
          "notebooks/fewshot_demo.ipynb", "fssjax/nn/bert.py"} <= named, sorted(named)
  missing = [p for p in sorted(named) if not (REPO / p).exists()]
  assert not missing, missing
  empty = [p for p in sorted(named) if (REPO / p).is_dir() and not any((REPO / p).iterdir())
           or (REPO / p).is_file() and (REPO / p).stat().st_size == 0]
  assert not empty, empty
