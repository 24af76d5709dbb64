"""HSNet on COCO-20i (Min, Kang, Cho: Hypercorrelation Squeeze for Few-Shot Segmentation,
ICCV 2021).

Published setting (juhongm999/hsnet): frozen ImageNet ResNet-50 / ResNet-101 (torchvision
weights), 400 x 400 square resize, no augmentation, 1-shot training, Adam lr 1e-3, batch 40
(COCO; the README's command), 2-class cross-entropy; evaluation on 1000 fixed episodes per
fold, class-wise mIoU over the fold's 20 interleaved test classes, K-shot by voting.
Published 1-shot / 5-shot mIoU (mean of 4 folds): ResNet-50 39.2 / 46.9, ResNet-101 41.2 / 49.5.
The published code trains until the validation mIoU saturates and keeps the best checkpoint;
`steps` below is our budget, not a published number.

Real data (COCO 2014 under `root`; backbone weights: a torchvision state dict saved as
safetensors, e.g. `safetensors.torch.save_file(torchvision.models.resnet50(weights=
"IMAGENET1K_V1").state_dict(), "resnet50.safetensors")`):

  W=/w/resnet50.safetensors; DATA=/data/COCO2014
  python -m fssjax.main --workdir=/tmp/hsnet_coco_run \\
    --config=configs/hsnet_coco.py:fold=0,backbone=resnet50,weights=$W,root=$DATA

  Evaluate 5-shot with the trained model: the same config with `shot=5` and `--mode=eval`.
  Without `root` the config still loads; the data layer raises a DataError naming the missing
  COCO files when the run starts.

Offline demo (no downloads: the generated synthetic benchmark in COCO format, a small
`resnet_tiny` backbone trained from scratch together with the HSNet learner, 128 x 128, batch
8, 700 steps of Adam at 2e-3 with 50 warm-up steps (scaled with `steps`) and cosine decay,
evaluated on 300 episodes of fold 0's novel classes):

  python -m fssjax.main --config=configs/hsnet_coco.py:demo --workdir=runs/demo

  Measured (2026-11-30, 2-core CPU dev machine, as the first stage of
  configs/retrieval_coco.py:demo, whose training is this config's): mIoU 26.9, FB-IoU 60.8 on
  the 300 test episodes, against 7.8 / 3.9 for the all-foreground prediction (+19.1 mIoU).
  (2026-11-23: 25.8 / 60.4, 6m32s on the idle machine. Since then the support-mask resize
  uses PyTorch-exact bilinear weights and the small-map conv4d is one matmul on CPU (equal to
  7e-8, which 700 training steps amplify); which of the two moved the number was not bisected.)

Arguments (`get_config("key=value,...")`): fold, shot, backbone (resnet50 | resnet101 | vgg16 |
resnet_tiny), weights (safetensors path), allow_pickle (read a .pth instead), root, steps,
batch, precision (float32 | bfloat16), eval_resolution (resized | original), demo.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  pylint: disable=g-import-not-at-top
from fssjax.configlib import parse_arg  # noqa: E402

DEFAULTS = dict(
    fold=0,
    shot=1,
    backbone="resnet50",
    weights="",
    allow_pickle=False,
    root="",
    steps=0,  # 0: the setting's default
    batch=0,  # 0: the setting's default
    precision="float32",
    eval_resolution="resized",
    demo=False,
)


def get_config(arg=None):
  a = parse_arg(arg, DEFAULTS)
  c = common.base("hsnet")
  common.benchmark(c, "coco20i", root=a["root"], fold=a["fold"], shot=a["shot"],
                   image_size=400, eval_resolution=a["eval_resolution"])
  c.train.batch_size = a["batch"] or 40
  c.train.num_steps = a["steps"] or 100_000
  c.train.log_every = 100
  c.train.eval_every = 5_000
  c.train.checkpoint_every = 5_000
  c.train.precision = a["precision"]
  c.optimizer.name = "adam"
  c.optimizer.lr = 1e-3
  c.optimizer.schedule = "constant"
  c.eval.batch_size = 8
  common.hsnet_model(c, a)

  if a["demo"]:
    steps = a["steps"] or 700
    common.demo(c, root=a["root"], image_size=128, steps=steps, default_steps=700,
                batch=a["batch"] or 8, lr=2e-3, warmup=50, log_every=25,
                checkpoint_every=steps)
    c.model.backbone = "resnet_tiny" if a["backbone"] == DEFAULTS["backbone"] else a["backbone"]
    c.model.trainable = ("params/learner/.*", "params/backbone/.*")  # from scratch
    c.model.loss_boundary = "ignore"
  return c


def sweep(arg=None):
  """Folds x shots x seeds of this config, for `launch.run --sweep` (24 runs; each demo run
  takes about 7 minutes on 2 CPU cores):

    python -m launch.run --config=configs/hsnet_coco.py:demo --sweep --backend=local \\
      --workdir=runs/demo_sweep --max_parallel=2
    python -m launch.collect runs/demo_sweep
  """
  del arg
  return [{"data.fold": f, "data.shot": k, "seed": s}
          for f in range(4) for k in (1, 5) for s in (0, 1, 2)]
