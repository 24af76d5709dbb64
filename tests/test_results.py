"""Results files: names, no overwriting, permissions, atomic writes and their content."""

import json
import os
import stat

import numpy as np
import pytest

from fssjax import configlib
from fssjax import results


def episodic_results(**kw):
  res = dict(
      evaluator="episodic", name="fewshot", miou=100.0, miou_all_classes=80.0, fbiou=95.5,
      baseline_miou=12.0, baseline_fbiou=30.0, n_episodes=24, left_out_classes=[4],
      support_empty=2, masks_resized=3, wall_time_s=1.5, per_class_iou={0: 100.0, 4: 0.0},
      class_names={0: "cat", 4: "rare"}, shots=1, resolution="16x16", summaries=[{"x": 1}],
      protocol=dict(evaluator="episodic", benchmark="synthetic", dataset="synthetic", fold=2,
                    episodes=24, resolution="16x16", manifest_sha256="ab" * 32, test_seed=0,
                    kshot=1, class_ids=[0, 4], left_out_classes=[4]))
  res.update(kw)
  return res


def test_names_never_overwritten_mode_0644_atomic(tmp_path):
  config = configlib.base_config()
  config.method = "hsnet"
  old = os.umask(0o077)  # a restrictive umask must not make the files private
  try:
    paths = [results.write(str(tmp_path), mode="train", step=1000, results=episodic_results(),
                           config=config) for _ in range(3)]
  finally:
    os.umask(old)
  names = [os.path.basename(p) for p in paths]
  assert names == ["train_fold2_shot1_step1000.json", "train_fold2_shot1_step1000-2.json",
                   "train_fold2_shot1_step1000-3.json"]
  for p in paths:
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
  # Nothing else is left in the directory (no temporary files).
  assert sorted(os.listdir(tmp_path / "results")) == sorted(names)
  # The first file is unchanged by the later writes.
  first = results.read(paths[0])
  assert first["step"] == 1000 and first["mode"] == "train"
  other = results.write(str(tmp_path), mode="eval", step=7, config=config,
                        results=episodic_results(name="ade", evaluator="dense", miou=33.0,
                                                 fbiou=None, macc=40.0, fwiou=50.0,
                                                 pixel_acc=60.0, n_images=5))
  assert os.path.basename(other) == "eval_fold2_shot1_step7_ade.json"
  with pytest.raises(ValueError, match="results mode 'test'"):
    results.write(str(tmp_path), mode="test", step=1, results=episodic_results(), config=config)
  assert [r["path"] for r in results.collect(str(tmp_path))] == sorted(paths + [other])


def test_content(tmp_path):
  config = configlib.base_config()
  config.method = "hsnet"
  config.data.fold = 2
  path = results.write(str(tmp_path), mode="eval", step=5,
                       results=episodic_results(per_class_iou={0: 100.0, 4: float("nan")}),
                       config=config, warnings=["fold 2's test classes were training classes"])
  with open(path) as f:
    doc = json.load(f)  # strict JSON (no NaN)
  for key in ("mode", "method", "benchmark", "fold", "shot", "step", "evaluator", "miou",
              "fbiou", "miou_all_classes", "baseline_miou", "baseline_fbiou", "num_episodes",
              "left_out_classes", "wall_time_s", "protocol", "config", "per_class_iou",
              "warnings"):
    assert key in doc, key
  assert (doc["mode"], doc["method"], doc["benchmark"], doc["fold"], doc["shot"]) == (
      "eval", "hsnet", "synthetic", 2, 1)
  assert doc["miou"] == 100.0 and doc["miou_all_classes"] == 80.0 and doc["num_episodes"] == 24
  assert doc["left_out_classes"] == [4] and doc["support_empty"] == 2
  p = doc["protocol"]
  assert (p["episodes"], p["resolution"], p["manifest_sha256"], p["test_seed"], p["kshot"]) == (
      24, "16x16", "ab" * 32, 0, 1)
  assert doc["config"]["data.fold"] == 2 and doc["config"]["optimizer.lr"] == 1e-3
  assert doc["per_class_iou"] == {"0": 100.0, "4": None}
  assert doc["warnings"][0] == "fold 2's test classes were training classes"
  assert any("left out" in w and "4 rare" in w for w in doc["warnings"])
  assert any("2 support masks were empty" in w for w in doc["warnings"])
  assert doc["masks_resized"] == 3 and any("3 masks differed in size" in w
                                           for w in doc["warnings"])
  assert "summaries" not in doc and doc["dense"] is None
  assert isinstance(json.loads(json.dumps(doc)), dict)
  np.testing.assert_equal(doc["class_names"], {"0": "cat", "4": "rare"})


def test_evaluation_settings_off_their_default_are_in_the_name(tmp_path):
  config = configlib.base_config()
  proto = dict(evaluator="dense", dataset="toy", candidates="dataset")
  plain = results.write(str(tmp_path), mode="eval", step=5, config=config, results=dict(
      evaluator="dense", name="unseen", miou=1.0, protocol=proto))
  described = results.write(str(tmp_path), mode="eval", step=5, config=config, results=dict(
      evaluator="dense", name="unseen", miou=2.0, protocol=dict(proto, candidates="description")))
  assert os.path.basename(plain) == "eval_fold0_shot1_step5_unseen.json"
  assert os.path.basename(described) == "eval_fold0_shot1_step5_unseen_description.json"
  assert results.read(plain)["miou"] == 1.0  # not overwritten


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_are_readable_per_umask(tmp_path, umask):
  from fssjax import utils
  path = tmp_path / "sub" / "results.json"
  old = os.umask(umask)
  try:
    utils.atomic_write_json(str(path), {"a": 1})
    utils.atomic_write_json(str(path), {"a": 2})  # replaced atomically, same mode
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
  assert json.loads(path.read_text()) == {"a": 2}
  assert os.listdir(tmp_path / "sub") == ["results.json"]  # no temporary file left
