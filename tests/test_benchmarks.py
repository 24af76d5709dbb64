"""The benchmark scripts' own logic (no timing here: numbers come from running them)."""

import functools
import importlib.util
import pathlib

import ml_collections
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@functools.cache  # the script defines absl flags: import it once
def _train_step_module():
  spec = importlib.util.spec_from_file_location("bench_train_step",
                                                REPO / "benchmarks" / "train_step.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("unit,capacity,limit,expected", [
    (1, 11, 256, 11), (2, 11, 256, 10), (8, 64, 256, 64), (4, 1000, 24, 24), (4, 3, 64, 0),
    (1, 1, 64, 1)])
def test_largest_batch_search(monkeypatch, unit, capacity, limit, expected):
  bench = _train_step_module()
  calls = []

  def fake_fits(config, batch):  # stands in for the device's memory limit only
    calls.append(batch)
    assert batch % unit == 0 and batch <= limit
    return batch <= capacity

  monkeypatch.setattr(bench, "batch_fits", fake_fits)
  config = ml_collections.ConfigDict({"train": {"batch_size": unit}})
  best, tried = bench.largest_batch(config, limit)
  assert best == expected
  assert [b for b, _ in tried] == calls and len(calls) == len(set(calls))
  assert all(ok == (b <= capacity) for b, ok in tried)


def test_oom_detection():
  bench = _train_step_module()
  assert bench._is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
  assert not bench._is_oom(ValueError("shapes do not match"))


def test_peak_flops_tables():
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(REPO / "benchmarks"))
  import common  # pylint: disable=import-outside-toplevel
  assert common.peak_flops("NVIDIA H200") == 989e12
  assert common.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert common.peak_flops("NVIDIA A100-SXM4-40GB", common.PEAK_FLOPS_FP32) == 19.5e12
  assert common.peak_flops("TPU v5 lite") == 197e12
  assert common.peak_flops("TPU v4", common.PEAK_FLOPS_FP32) is None  # no fp32 matrix unit
  assert common.peak_flops("cpu") is None
