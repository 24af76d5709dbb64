"""HSNet on PASCAL-5i (Min, Kang, Cho: Hypercorrelation Squeeze for Few-Shot Segmentation,
ICCV 2021).

Published setting (juhongm999/hsnet): frozen ImageNet backbone (vgg16, resnet50 or resnet101;
torchvision weights), 400 x 400 square resize, no augmentation, 1-shot training, Adam lr 1e-3,
batch 20, 2-class cross-entropy in which the 255 boundary counts as background (the published
loader maps it to 0 and the loss has no ignore index); evaluation on 1000 fixed episodes per
fold with the boundary ignored, class-wise mIoU over the fold's 5 classes, K-shot by voting.
Published 1-shot / 5-shot mIoU (mean of 4 folds): ResNet-50 64.0 / 69.5, ResNet-101 66.2 / 70.4.
The published code trains until the validation mIoU saturates and keeps the best checkpoint;
`steps` below is our budget, not a published number.

  W=/w/resnet101.safetensors; DATA=/data/VOCdevkit
  python -m fssjax.main --workdir=/tmp/hsnet_pascal_run \\
    --config=configs/hsnet_pascal.py:fold=0,backbone=resnet101,weights=$W,root=$DATA

`root` holds VOC2012 with SegmentationClassAug (see fssjax.data.pascal for the layout). Without
it the config still loads; the data layer raises a DataError naming the missing files at run
time. Backbone weights: a torchvision state dict saved as safetensors (see
fssjax.weights.torchvision).

Arguments (`get_config("key=value,...")`): fold, shot, backbone (vgg16 | resnet50 | resnet101 |
resnet_tiny), weights, allow_pickle, root, steps, batch, precision (float32 | bfloat16),
eval_resolution (resized | original).
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
    steps=50_000,
    batch=20,
    precision="float32",
    eval_resolution="resized",
)


def get_config(arg=None):
  a = parse_arg(arg, DEFAULTS)
  c = common.base("hsnet")
  common.benchmark(c, "pascal5i", root=a["root"], fold=a["fold"], shot=a["shot"], image_size=400,
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
