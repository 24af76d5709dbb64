"""fssjax against a PyTorch implementation of the same network, side by side, in one process.

  pip install -e '.[bench]'        # torch (CPU) and diffusers, optional benchmark dependencies
  python benchmarks/vs_torch.py --method=hsnet --batch=1 --rounds=5
  python benchmarks/vs_torch.py --method=hsnet --batch=8 --rounds=3
  python benchmarks/vs_torch.py --method=diffews --rounds=5              # demo-size UNet, 64 px
  python benchmarks/vs_torch.py --method=diffews --diffews_unet=sd21 --image_size=256 --batch=1

What is compared (same shapes, float32, random weights, the SAME weights on both sides):

* hsnet: ResNet-50 HSNet at 400 x 400 (`--image_size`), 1-shot. PyTorch side: the published
  model code (juhongm999/hsnet) and torchvision's ResNet-50, written out in
  benchmarks/torch_hsnet.py (torch only). fssjax side: `configs/hsnet_coco.py`'s method, and the
  trainer's own jitted step. Train step = forward, 2-class cross-entropy, backward, Adam update
  of the learner; inference = one 1-shot forward (+ the argmax / score map).
* diffews: the DiffewS UNet step at the demo size (configs/diffews_coco.py:demo's UNet, 64 x 64
  images = 8 x 8 latents, batch 16) or SD 2.1's UNet (`--diffews_unet=sd21`). PyTorch side:
  diffusers' `UNet2DConditionModel` with DiffewS's K/V bank as an attention processor (the
  support pass records every attn1's K and V, the query pass appends them; benchmarks/
  torch_diffews.py); fssjax side: `fssjax.nn.unet` with `return_kv` / `kv_bank`. Train step =
  support pass (8-channel conv_in_ref), query pass with the bank, latent MSE, backward, AdamW;
  inference = both passes without gradients. The VAE is left out on both sides (frozen, the
  same work in both).

Before timing, the script asserts that both sides give the same outputs from the same weights
(HSNet logits, DiffewS UNet output; relative max error < 1e-3) and the same loss.

Denormal floats are flushed to zero on both sides (XLA's CPU default; `torch.set_flush_denormal`),
since random weights produce denormals that slow PyTorch's kernels several-fold otherwise.

Timing: compile and warm-up excluded; `--rounds` rounds, each running `--steps` calls of every
(side, benchmark) pair, alternating sides, so both see the same machine load. One JSON line per
benchmark: medians, min / max over all timed calls, `speedup` = torch median / fssjax median
(> 1: fssjax faster), the median process CPU time per call of each side and their ratio (on a
shared machine wall times suffer from other processes, and PyTorch's OpenMP threads suffer more
than XLA's pool: compare the CPU times there, and quote wall times from an idle machine), thread
counts, versions, the CPU model, the load average, the date, and
fssjax's FLOPs per call from XLA's cost analysis with the fraction of the device's bf16 and fp32
peaks (benchmarks/common.py; none for a CPU), and the process's peak memory (device statistics
where the device has them, else the host's peak RSS, both sides together).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_METHOD = flags.DEFINE_enum("method", "hsnet", ["hsnet", "diffews"], "Network to compare.")
_BATCH = flags.DEFINE_integer("batch", 0, "Batch (episodes); 0: 1 for hsnet, 16 for the "
                              "diffews demo, 1 for sd21.")
_IMAGE = flags.DEFINE_integer("image_size", 0, "Image size; 0: 400 (hsnet), 64 (diffews "
                              "demo), 256 (sd21).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
_STEPS = flags.DEFINE_integer("steps", 1, "Timed calls per side per round.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls per side before the rounds.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch intra-op threads; 0: os.cpu_count(). XLA "
                                "CPU uses one thread per core.")
_WHAT = flags.DEFINE_list("what", ["train", "infer"], "Benchmarks to run: train, infer.")
_UNET = flags.DEFINE_enum("diffews_unet", "demo", ["demo", "sd21"], "DiffewS UNet size.")
_SKIP_CHECK = flags.DEFINE_bool("skip_check", False, "Skip the same-output assertion.")


def machine() -> dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return dict(cpu=cpu, cpu_count=os.cpu_count(), load_avg=list(os.getloadavg()),
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              python=platform.python_version())


def interleave(pairs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], rounds: int,
               steps: int, warmup: int) -> dict[str, dict[str, list[float]]]:
  """Times every (fssjax, torch) pair, alternating sides within each round.

  pairs: name -> (fssjax call, torch call); each call blocks until its result is ready.
  Returns name -> {'fssjax': [wall seconds...], 'torch': [...], 'fssjax_cpu': [process CPU
  seconds...], 'torch_cpu': [...]}.
  """
  for fj, pt in pairs.values():
    for _ in range(warmup):
      fj()
      pt()
  times = {name: {"fssjax": [], "torch": [], "fssjax_cpu": [], "torch_cpu": []}
           for name in pairs}
  for r in range(rounds):
    for name, (fj, pt) in pairs.items():
      order = (("fssjax", fj), ("torch", pt)) if r % 2 == 0 else (("torch", pt), ("fssjax", fj))
      for side, fn in order:
        for _ in range(steps):
          t, c = time.perf_counter(), time.process_time()
          fn()
          times[name][side].append(time.perf_counter() - t)
          times[name][side + "_cpu"].append(time.process_time() - c)
  return times


def summary(name: str, t: dict[str, list[float]], extra: dict[str, Any]) -> dict[str, Any]:
  fj, pt = statistics.median(t["fssjax"]), statistics.median(t["torch"])
  rec = dict(benchmark=f"vs_torch/{name}", fssjax_s_median=fj, fssjax_s_min=min(t["fssjax"]),
             fssjax_s_max=max(t["fssjax"]), torch_s_median=pt, torch_s_min=min(t["torch"]),
             torch_s_max=max(t["torch"]), speedup=pt / fj, calls=len(t["fssjax"]),
             fssjax_cpu_s_median=statistics.median(t["fssjax_cpu"]),
             torch_cpu_s_median=statistics.median(t["torch_cpu"]),
             cpu_time_ratio=statistics.median(t["torch_cpu"]) / statistics.median(t["fssjax_cpu"]))
  rec.update(extra)
  return rec


def versions(torch_threads: int) -> dict[str, Any]:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  out = dict(jax=jax.__version__, jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__")
             else None, flax=flax.__version__, torch=torch.__version__,
             torch_threads=torch_threads, torch_interop_threads=torch.get_num_interop_threads(),
             torch_flush_denormal=True,
             xla_flags=os.environ.get("XLA_FLAGS", ""), backend=jax.default_backend(),
             device_kind=jax.devices()[0].device_kind)
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    out["diffusers"] = diffusers.__version__
  except ImportError:
    pass
  return out


def device_fraction(flops: float | None, seconds: float) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  kind = jax.devices()[0].device_kind
  achieved = flops / seconds if flops else None
  peak = common.peak_flops(kind)
  peak32 = common.peak_flops(kind, common.PEAK_FLOPS_FP32)
  return dict(fssjax_flops=flops, fssjax_flops_per_s=achieved,
              fraction_of_peak=(achieved / peak) if (achieved and peak) else None,
              fraction_of_peak_fp32=(achieved / peak32) if (achieved and peak32) else None)


# ----------------------------------------------------------------------------------------------
# HSNet.


def run_hsnet(threads: int) -> list[dict[str, Any]]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from configs import hsnet_coco  # pylint: disable=g-import-not-at-top
  import torch_hsnet  # pylint: disable=g-import-not-at-top

  batch_size = _BATCH.value or 1
  size = _IMAGE.value or 400
  config = hsnet_coco.get_config(f"batch={batch_size}")
  with config.unlocked():
    config.data.image_size = size
  mesh, state, frozen, step, lr, batch = common.build_train_step(config)
  from fssjax.methods import get_method  # pylint: disable=g-import-not-at-top
  method = get_method(config)

  # Same weights on the torch side.
  model = torch_hsnet.HypercorrSqueezeNetwork()
  sd = torch_hsnet.state_dict_from_fssjax(jax.device_get(state["params"]),
                                          jax.device_get(frozen))
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [k for k in missing if not k.endswith("num_batches_tracked")]
  if missing or unexpected:
    raise RuntimeError(f"torch HSNet weights: missing {missing}, unexpected {unexpected}")
  host = {k: np.asarray(v) for k, v in jax.device_get(batch).items()}
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))  # noqa: E731
  q_t = nchw(host["query_image"])
  s_t = nchw(host["support_images"][:, 0])
  m_t = torch.from_numpy((host["support_masks"][:, 0] == 1).astype(np.float32))
  gt_t = torch.from_numpy((host["query_mask"] == 1).astype(np.int64))

  logits_fn = jax.jit(lambda p, f, b: method.logits(p, f, b["query_image"],
                                                    b["support_images"][:, 0],
                                                    b["support_masks"][:, 0]))
  predict = jax.jit(method.predict)
  with jax.set_mesh(mesh):
    if not _SKIP_CHECK.value:
      ours = np.asarray(logits_fn(state["params"], frozen, batch))
      model.eval()
      with torch.no_grad():
        theirs = model(q_t, s_t, m_t).permute(0, 2, 3, 1).numpy()
      err = float(np.max(np.abs(ours - theirs)) / (np.max(np.abs(theirs)) + 1e-12))
      if not err < 1e-3:
        raise AssertionError(f"HSNet logits differ between fssjax and torch: relative max "
                             f"error {err:.3g}")
      with torch.no_grad():
        ref_loss = float(model.compute_objective(torch.from_numpy(
            np.moveaxis(theirs, -1, 1).copy()), gt_t))
      print(json.dumps(dict(check="hsnet_logits", relative_max_error=err,
                            torch_loss=ref_loss)), flush=True)

    compiled_step = step.lower(state, frozen, batch, lr).compile()
    compiled_pred = predict.lower(state["params"], frozen, batch).compile()
    box = {"state": state}

    def fj_train():
      box["state"], metrics = compiled_step(box["state"], frozen, batch, lr)
      jax.block_until_ready(metrics["loss"])

    def fj_infer():
      jax.block_until_ready(compiled_pred(box["state"]["params"], frozen, batch))

    opt = torch.optim.Adam([p for n, p in model.named_parameters() if n.startswith("hpn_")],
                           lr=1e-3)
    for p in model.backbone.parameters():
      p.requires_grad_(False)

    def pt_train():
      model.train_mode()
      logit = model(q_t, s_t, m_t)
      loss = model.compute_objective(logit, gt_t)
      opt.zero_grad()
      loss.backward()
      opt.step()

    def pt_infer():
      model.eval()
      with torch.no_grad():
        model(q_t, s_t, m_t).argmax(dim=1)

    pairs = {}
    if "train" in _WHAT.value:
      pairs["hsnet_train_step"] = (fj_train, pt_train)
    if "infer" in _WHAT.value:
      pairs["hsnet_1shot_inference"] = (fj_infer, pt_infer)
    times = interleave(pairs, _ROUNDS.value, _STEPS.value, _WARMUP.value)
  flops = {"hsnet_train_step": common.flops_of(compiled_step),
           "hsnet_1shot_inference": common.flops_of(compiled_pred)}
  out = []
  for name, t in times.items():
    extra = dict(method="hsnet", backbone="resnet50", batch=batch_size, image_size=size,
                 precision="float32", torch_reference="juhongm999/hsnet model code + "
                 "torchvision ResNet-50 (benchmarks/torch_hsnet.py)")
    extra.update(device_fraction(flops[name], statistics.median(t["fssjax"])))
    out.append(summary(name, t, extra))
  return out


# ----------------------------------------------------------------------------------------------
# DiffewS.


def run_diffews(threads: int) -> list[dict[str, Any]]:
  import torch_diffews  # pylint: disable=g-import-not-at-top
  return torch_diffews.run(unet=_UNET.value, batch=_BATCH.value, image_size=_IMAGE.value,
                           what=_WHAT.value, rounds=_ROUNDS.value, steps=_STEPS.value,
                           warmup=_WARMUP.value, check=not _SKIP_CHECK.value,
                           interleave=interleave, summary=summary,
                           device_fraction=device_fraction)


def main(argv: Sequence[str]) -> None:
  del argv
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit("benchmarks/vs_torch.py needs PyTorch (CPU): pip install -e '.[bench]' "
                     f"or pip install torch ({e})") from e
  threads = _THREADS.value or os.cpu_count()
  torch.set_num_threads(threads)
  # XLA's CPU code flushes denormal floats to zero; PyTorch does not by default, and random
  # weights produce denormals that slow its kernels several-fold (HSNet's learner: 5x). Same
  # arithmetic on both sides.
  torch.set_flush_denormal(True)
  records = run_hsnet(threads) if _METHOD.value == "hsnet" else run_diffews(threads)
  import jax  # pylint: disable=g-import-not-at-top
  peak_bytes, peak_source = common.peak_memory(jax.devices())
  info = dict(machine=machine(), versions=versions(threads), peak_memory_bytes=peak_bytes,
              peak_memory_source=peak_source)
  for rec in records:
    rec.update(info)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
