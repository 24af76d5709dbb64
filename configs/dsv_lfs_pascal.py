"""DSV-LFS on PASCAL-5i (Karimi and Poullis, CVPR 2025; published code aminpdik/DSV-LFS).

The published recipe of configs/dsv_lfs_coco.py (LLaVA-1.5-7B + LoRA, SAM ViT-H, dense
matching on all encoder blocks, 1024 longest-side SAM input, scoring at 400 x 400, 2000 test
episodes per fold, AdamW 3e-4) on PASCAL-5i (SegmentationClassAug masks; the class
descriptions of `fssjax/priors/descriptions/pascal.json`). The published PASCAL evaluation
counts the 255 boundary as background; here the loss ignores it and the evaluator follows
the shared protocol (fssjax.evaluate).

  python -m fssjax.main --workdir=runs/dsv_lfs_pascal_f0 \\
    --config=configs/dsv_lfs_pascal.py:fold=0,root=/data/VOCdevkit/VOC2012,llava=/w/llava-v1.5-7b,sam=/w/sam-vit-huge

  Cross-domain (PASCAL -> COCO): add `cross=coco20i,cross_root=/data/COCO2014`: all 80 COCO
  classes minus the 15 the PASCAL fold trained on (65 kept), RePRI's `filter_classes` rule
  (configs/dsv_lfs_coco.py `cross_domain`); `cross_fold=k` restricts to COCO-20i fold k.
  Without the data or the weights the run stops at once naming each missing path and the
  demo command (the demo runs on the embedded benchmark: configs/dsv_lfs_coco.py:demo).

Arguments: those of configs/dsv_lfs_coco.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import dsv_lfs_coco  # noqa: E402  pylint: disable=g-import-not-at-top
from fssjax.configlib import parse_arg  # noqa: E402

DEFAULTS = dict(dsv_lfs_coco.DEFAULTS)


def get_config(arg=None):
  a = parse_arg(arg, DEFAULTS)
  c = common.base("dsv_lfs")
  common.benchmark(c, "pascal5i", root=a["root"], fold=a["fold"], shot=a["shot"],
                   image_size=400)
  c.data.test_episodes = 2000  # the published loader
  dsv_lfs_coco.published_training(c, a)
  dsv_lfs_coco.dsv_lfs_model(c, a, "pascal")
  dsv_lfs_coco.cross_domain(c, a, "pascal5i", "coco20i")
  if a["demo"]:
    dsv_lfs_coco.demo(c, a)
  return c
