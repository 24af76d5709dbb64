"""LLaFS on PASCAL-5i (Zhu, Chen, Ji, Ye, Liu, CVPR 2024; no published code).

The setting of configs/llafs_coco.py (CodeLLaMA-7B in Hugging Face layout under LoRA, frozen
ResNet-50 -> Q-Former -> linear, the full instruction, 16-point polygons, the refinement
network, 400 x 400, 1000 test episodes per fold) on PASCAL-5i (SegmentationClassAug masks).
Published PASCAL-5i mIoU: 73.5 (1-shot) / 75.6 (5-shot), mean of 4 folds (not reproduced
here: no PASCAL or CodeLLaMA weights on the development machines).

  python -m fssjax.main --workdir=runs/llafs_pascal_f0 \\
    --config=configs/llafs_pascal.py:fold=0,root=/data/VOCdevkit/VOC2012,llm=/w/CodeLlama-7b-Instruct-hf,backbone=/w/resnet50.safetensors

  Without `llm` or `root` the config stops at once, naming what is missing and the demo
  command (the demo runs on the embedded benchmark: configs/llafs_coco.py:demo).

Arguments: those of configs/llafs_coco.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import llafs_coco  # noqa: E402  pylint: disable=g-import-not-at-top
from fssjax.configlib import parse_arg  # noqa: E402

DEFAULTS = dict(llafs_coco.DEFAULTS)


def get_config(arg=None):
  a = parse_arg(arg, DEFAULTS)
  c = common.base("llafs")
  common.benchmark(c, "pascal5i", root=a["root"], fold=a["fold"], shot=a["shot"],
                   image_size=400)
  llafs_coco.paper_training(c, a)
  llafs_coco.llafs_model(c, a)
  if a["demo"]:
    return llafs_coco.demo(c, a)
  return c
