"""DiffewS on PASCAL-5i (Zhu et al., NeurIPS 2024; aim-uofa/DiffewS).

The published recipe of configs/diffews_coco.py on PASCAL-5i: SD 2.1 UNet fully fine-tuned
(VAE and text encoder frozen, empty prompt), 512 x 512 square resize (training images nearest),
no augmentation, support K/V bank, timestep 1, target = the negated query-mask latent, latent
MSE, AdamW lr 1e-5 linear decay, weight decay 0.01, gradient clipping 1.0, global batch 32 as
8 devices x 1 x 4 accumulation steps, bf16 compute; 0.25 x max mask rule. Evaluation: 1000
fixed episodes of the fold's 5 classes with the 255 boundary ignored, class-wise mIoU. In the
training target a 255 boundary pixel is background (white-on-black masks have no third value).
The DiffewS paper reports no PASCAL-5i number, and the published scripts give no
PASCAL step count: `steps` (default 20,000, the COCO budget) is ours.

  python -m fssjax.main --workdir=runs/diffews_pascal_f0 \\
    --config=configs/diffews_pascal.py:fold=0,root=/data/VOCdevkit,sd_path=/w/stable-diffusion-2-1

`root` holds VOC2012 with SegmentationClassAug (layout in fssjax.data.pascal); `sd_path` a
diffusers-layout SD 2.1. Without them the run stops at once with a message naming both paths.
The offline demo is `configs/diffews_coco.py:demo` (the synthetic benchmark is COCO-format).

Arguments (`get_config("key=value,...")`): fold, shot, train_shot_max, root, sd_path, steps,
batch, grad_accum, precision (bfloat16 | float32), remat, eval_resolution (resized | original).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.diffews_coco import recipe  # noqa: E402  pylint: disable=g-import-not-at-top
from fssjax.configlib import parse_arg  # noqa: E402

DEFAULTS = dict(
    fold=0,
    shot=1,
    train_shot_max=0,
    root="datasets/VOCdevkit",
    sd_path="weights/stable-diffusion-2-1",
    steps=20_000,
    batch=32,
    grad_accum=4,
    precision="bfloat16",
    remat=False,
    eval_resolution="resized",
)


def get_config(arg=None):
  return recipe(parse_arg(arg, DEFAULTS), "pascal5i")
