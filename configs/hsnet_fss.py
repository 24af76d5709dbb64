"""HSNet on FSS-1000 (Min, Kang, Cho: Hypercorrelation Squeeze for Few-Shot Segmentation,
ICCV 2021).

Published setting (juhongm999/hsnet): frozen ImageNet backbone (vgg16, resnet50 or resnet101;
torchvision weights), 400 x 400 square resize, no augmentation, 1-shot training on the 520
training classes, Adam lr 1e-3, batch 20, 2-class cross-entropy; evaluation on the 240 test
classes where every test image is a query once (2400 episodes), class-wise mIoU, K-shot by
voting. The published code trains until the validation mIoU (240 val classes) saturates and
keeps the best checkpoint; `steps` below is our budget, not a published number.

  W=/w/resnet50.safetensors; DATA=/data/FSS-1000
  python -m fssjax.main --workdir=/tmp/hsnet_fss_run \\
    --config=configs/hsnet_fss.py:backbone=resnet50,weights=$W,root=$DATA

`root` is the FSS-1000 directory (one folder per class, see fssjax.data.fss1000). Without it
the config still loads; the data layer raises a DataError naming the missing files at run time.

Arguments (`get_config("key=value,...")`): shot, backbone (vgg16 | resnet50 | resnet101 |
resnet_tiny), weights, allow_pickle, root, steps, batch, precision (float32 | bfloat16),
eval_resolution (resized | original).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  pylint: disable=g-import-not-at-top
from fssjax.configlib import parse_arg  # noqa: E402

DEFAULTS = dict(
    shot=1,
    backbone="resnet50",
    weights="",
    allow_pickle=False,
    root="",
    steps=50_000,
    batch=20,
    precision="float32",
    eval_resolution="resized",
)


def get_config(arg=None):
  a = parse_arg(arg, DEFAULTS)
  c = common.base("hsnet")
  common.benchmark(c, "fss1000", root=a["root"], shot=a["shot"], image_size=400,
                   eval_resolution=a["eval_resolution"])
  c.train.batch_size = a["batch"]
  c.train.num_steps = a["steps"]
  c.train.log_every = 100
  c.train.eval_every = 2_500
  c.train.checkpoint_every = 2_500
  c.train.precision = a["precision"]
  c.optimizer.name = "adam"
  c.optimizer.lr = 1e-3
  c.optimizer.schedule = "constant"
  c.eval.batch_size = 8
  return common.hsnet_model(c, a)
