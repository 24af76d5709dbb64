"""A straightforward PyTorch HSNet (ResNet-50 backbone + HPN learner) for side-by-side timing.

The modules follow the published code line by line (juhongm999/hsnet: model/hsnet.py,
model/learner.py, model/base/conv4d.py, model/base/correlation.py, model/base/feature.py) and
torchvision's ResNet-50 (v1.5 bottlenecks), written here so that neither the published repository
nor torchvision has to be installed: only `torch`. Module and state-dict names are the published
ones (`backbone.layer2.0.conv1.weight`, `hpn_learner.encoder_layer4.0.conv1.weight`, ...), so
`state_dict_from_fssjax` converts an fssjax HSNet's variables into a state dict for it.

Used by benchmarks/vs_torch.py only; imports torch at module import.
"""

from __future__ import annotations

from functools import reduce
from operator import add
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# torchvision ResNet-50 (the parts HSNet uses).


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, width: int, stride: int = 1):
    super().__init__()
    out = width * self.expansion
    self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or inplanes != out:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(out))


class ResNet(nn.Module):

  def __init__(self, layers=(3, 4, 6, 3)):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    inplanes = 64
    for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
      blocks = []
      for j in range(n):
        blocks.append(Bottleneck(inplanes, width, stride=2 if (i > 0 and j == 0) else 1))
        inplanes = width * 4
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))


def extract_feat_res(img, backbone, feat_ids, bottleneck_ids, lids):
  """Published model/base/feature.py."""
  feats = []
  feat = backbone.conv1.forward(img)
  feat = backbone.bn1.forward(feat)
  feat = backbone.relu.forward(feat)
  feat = backbone.maxpool.forward(feat)
  for hid, (bid, lid) in enumerate(zip(bottleneck_ids, lids)):
    block = getattr(backbone, "layer%d" % lid)[bid]
    res = feat
    feat = block.conv1.forward(feat)
    feat = block.bn1.forward(feat)
    feat = block.relu.forward(feat)
    feat = block.conv2.forward(feat)
    feat = block.bn2.forward(feat)
    feat = block.relu.forward(feat)
    feat = block.conv3.forward(feat)
    feat = block.bn3.forward(feat)
    if bid == 0:
      res = block.downsample.forward(res)
    feat += res
    if hid + 1 in feat_ids:
      feats.append(feat.clone())
    feat = block.relu.forward(feat)
  return feats


# ----------------------------------------------------------------------------------------------
# Published HSNet modules.


class CenterPivotConv4d(nn.Module):
  """Published model/base/conv4d.py."""

  def __init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=True):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size[:2], stride=stride[:2],
                           bias=bias, padding=padding[:2])
    self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size[2:], stride=stride[2:],
                           bias=bias, padding=padding[2:])
    self.stride34 = stride[2:]
    self.kernel_size = kernel_size
    self.stride = stride
    self.padding = padding
    self.idx_initialized = False

  def prune(self, ct):
    bsz, ch, ha, wa, hb, wb = ct.size()
    if not self.idx_initialized:
      idxh = torch.arange(start=0, end=hb, step=self.stride[2:][0], device=ct.device)
      idxw = torch.arange(start=0, end=wb, step=self.stride[2:][1], device=ct.device)
      self.len_h = len(idxh)
      self.len_w = len(idxw)
      self.idx = (idxw.repeat(self.len_h, 1) + idxh.repeat(self.len_w, 1).t() * wb).view(-1)
      self.idx_initialized = True
    return ct.view(bsz, ch, ha, wa, -1).index_select(4, self.idx).view(
        bsz, ch, ha, wa, self.len_h, self.len_w)

  def forward(self, x):
    out1 = self.prune(x) if self.stride[2:][-1] > 1 else x
    bsz, inch, ha, wa, hb, wb = out1.size()
    out1 = out1.permute(0, 4, 5, 1, 2, 3).contiguous().view(-1, inch, ha, wa)
    out1 = self.conv1(out1)
    outch, o_ha, o_wa = out1.size(-3), out1.size(-2), out1.size(-1)
    out1 = out1.view(bsz, hb, wb, outch, o_ha, o_wa).permute(0, 3, 4, 5, 1, 2).contiguous()

    bsz, inch, ha, wa, hb, wb = x.size()
    out2 = x.permute(0, 2, 3, 1, 4, 5).contiguous().view(-1, inch, hb, wb)
    out2 = self.conv2(out2)
    outch, o_hb, o_wb = out2.size(-3), out2.size(-2), out2.size(-1)
    out2 = out2.view(bsz, ha, wa, outch, o_hb, o_wb).permute(0, 3, 1, 2, 4, 5).contiguous()

    if out1.size()[-2:] != out2.size()[-2:] and self.padding[-2:] == (0, 0):
      out1 = out1.view(bsz, outch, o_ha, o_wa, -1).sum(dim=-1)
      out2 = out2.squeeze()
    return out1 + out2


class HPNLearner(nn.Module):
  """Published model/learner.py."""

  def __init__(self, inch):
    super().__init__()

    def make_building_block(in_channel, out_channels, kernel_sizes, spt_strides, group=4):
      layers = []
      for idx, (outch, ksz, stride) in enumerate(zip(out_channels, kernel_sizes, spt_strides)):
        inch_ = in_channel if idx == 0 else out_channels[idx - 1]
        layers.append(CenterPivotConv4d(inch_, outch, (ksz,) * 4, (1, 1) + (stride,) * 2,
                                        (ksz // 2,) * 4))
        layers.append(nn.GroupNorm(group, outch))
        layers.append(nn.ReLU(inplace=True))
      return nn.Sequential(*layers)

    outch1, outch2, outch3 = 16, 64, 128
    self.encoder_layer4 = make_building_block(inch[0], [outch1, outch2, outch3], [3, 3, 3],
                                              [2, 2, 2])
    self.encoder_layer3 = make_building_block(inch[1], [outch1, outch2, outch3], [5, 3, 3],
                                              [4, 2, 2])
    self.encoder_layer2 = make_building_block(inch[2], [outch1, outch2, outch3], [5, 5, 3],
                                              [4, 4, 2])
    self.encoder_layer4to3 = make_building_block(outch3, [outch3] * 3, [3, 3, 3], [1, 1, 1])
    self.encoder_layer3to2 = make_building_block(outch3, [outch3] * 3, [3, 3, 3], [1, 1, 1])
    self.decoder1 = nn.Sequential(nn.Conv2d(outch3, outch3, (3, 3), padding=(1, 1), bias=True),
                                  nn.ReLU(),
                                  nn.Conv2d(outch3, outch2, (3, 3), padding=(1, 1), bias=True),
                                  nn.ReLU())
    self.decoder2 = nn.Sequential(nn.Conv2d(outch2, outch2, (3, 3), padding=(1, 1), bias=True),
                                  nn.ReLU(),
                                  nn.Conv2d(outch2, 2, (3, 3), padding=(1, 1), bias=True))

  def interpolate_support_dims(self, hypercorr, spatial_size=None):
    bsz, ch, ha, wa, hb, wb = hypercorr.size()
    hypercorr = hypercorr.permute(0, 4, 5, 1, 2, 3).contiguous().view(bsz * hb * wb, ch, ha, wa)
    hypercorr = F.interpolate(hypercorr, spatial_size, mode="bilinear", align_corners=True)
    o_hb, o_wb = spatial_size
    return hypercorr.view(bsz, hb, wb, ch, o_hb, o_wb).permute(0, 3, 4, 5, 1, 2).contiguous()

  def forward(self, hypercorr_pyramid):
    sqz4 = self.encoder_layer4(hypercorr_pyramid[0])
    sqz3 = self.encoder_layer3(hypercorr_pyramid[1])
    sqz2 = self.encoder_layer2(hypercorr_pyramid[2])
    sqz4 = self.interpolate_support_dims(sqz4, sqz3.size()[-4:-2])
    mix43 = self.encoder_layer4to3(sqz4 + sqz3)
    mix43 = self.interpolate_support_dims(mix43, sqz2.size()[-4:-2])
    mix432 = self.encoder_layer3to2(mix43 + sqz2)
    bsz, ch, ha, wa, hb, wb = mix432.size()
    encoded = mix432.view(bsz, ch, ha, wa, -1).mean(dim=-1)
    decoded = self.decoder1(encoded)
    upsample_size = (decoded.size(-1) * 2,) * 2
    decoded = F.interpolate(decoded, upsample_size, mode="bilinear", align_corners=True)
    return self.decoder2(decoded)


def multilayer_correlation(query_feats, support_feats, stack_ids):
  """Published model/base/correlation.py."""
  eps = 1e-5
  corrs = []
  for query_feat, support_feat in zip(query_feats, support_feats):
    bsz, ch, hb, wb = support_feat.size()
    support_feat = support_feat.view(bsz, ch, -1)
    support_feat = support_feat / (support_feat.norm(dim=1, p=2, keepdim=True) + eps)
    bsz, ch, ha, wa = query_feat.size()
    query_feat = query_feat.view(bsz, ch, -1)
    query_feat = query_feat / (query_feat.norm(dim=1, p=2, keepdim=True) + eps)
    corr = torch.bmm(query_feat.transpose(1, 2), support_feat).view(bsz, ha, wa, hb, wb)
    corrs.append(corr.clamp(min=0))
  corr_l4 = torch.stack(corrs[-stack_ids[0]:]).transpose(0, 1).contiguous()
  corr_l3 = torch.stack(corrs[-stack_ids[1]:-stack_ids[0]]).transpose(0, 1).contiguous()
  corr_l2 = torch.stack(corrs[-stack_ids[2]:-stack_ids[1]]).transpose(0, 1).contiguous()
  return [corr_l4, corr_l3, corr_l2]


class HypercorrSqueezeNetwork(nn.Module):
  """Published model/hsnet.py (ResNet-50 only; the backbone stays in eval mode)."""

  def __init__(self):
    super().__init__()
    self.backbone = ResNet((3, 4, 6, 3))
    self.feat_ids = list(range(4, 17))
    nbottlenecks = [3, 4, 6, 3]
    self.bottleneck_ids = reduce(add, list(map(lambda x: list(range(x)), nbottlenecks)))
    self.lids = reduce(add, [[i + 1] * x for i, x in enumerate(nbottlenecks)])
    self.stack_ids = torch.tensor(self.lids).bincount().__reversed__().cumsum(dim=0)[:3]
    self.backbone.eval()
    self.hpn_learner = HPNLearner(list(reversed(nbottlenecks[-3:])))
    self.cross_entropy_loss = nn.CrossEntropyLoss()

  def forward(self, query_img, support_img, support_mask):
    with torch.no_grad():
      extract = lambda img: extract_feat_res(img, self.backbone, self.feat_ids,  # noqa: E731
                                             self.bottleneck_ids, self.lids)
      query_feats = extract(query_img)
      support_feats = self.mask_feature(extract(support_img), support_mask.clone())
      corr = multilayer_correlation(query_feats, support_feats, self.stack_ids)
    logit_mask = self.hpn_learner(corr)
    return F.interpolate(logit_mask, support_img.size()[2:], mode="bilinear", align_corners=True)

  def mask_feature(self, features, support_mask):
    for idx, feature in enumerate(features):
      mask = F.interpolate(support_mask.unsqueeze(1).float(), feature.size()[2:],
                           mode="bilinear", align_corners=True)
      features[idx] = features[idx] * mask
    return features

  def compute_objective(self, logit_mask, gt_mask):
    bsz = logit_mask.size(0)
    return self.cross_entropy_loss(logit_mask.view(bsz, 2, -1), gt_mask.view(bsz, -1).long())

  def train_mode(self):
    self.train()
    self.backbone.eval()


# ----------------------------------------------------------------------------------------------
# Weights from an fssjax HSNet.


def _flatten(tree: Mapping[str, Any], prefix=()) -> dict[tuple[str, ...], np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = np.asarray(v, np.float32)
  return out


def _learner_key(path: tuple[str, ...]) -> str:
  """('encoder_layer4', 'layers_0', 'conv1', 'kernel') -> encoder_layer4.0.conv1.weight."""
  mods = []
  for p in path[:-1]:
    if p.startswith("layers_"):
      mods.append(p[len("layers_"):])
    elif p.startswith("decoder"):
      mods.extend(p.split("_"))
    else:
      mods.append(p)
  leaf = path[-1]
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return ".".join(["hpn_learner"] + mods + [leaf])


def state_dict_from_fssjax(*trees: Mapping[str, Any]) -> dict[str, torch.Tensor]:
  """The torch state dict of `HypercorrSqueezeNetwork` holding an fssjax HSNet's weights.

  trees: the fssjax variables, whole or in parts (for example the trainer's params and frozen
  trees); every leaf is found by its path: a path through 'learner' is a learner variable, one
  through 'backbone' a backbone variable ('batch_stats' in the path: BatchNorm statistics).
  """
  from fssjax.weights import torchvision as tv  # pylint: disable=g-import-not-at-top

  out = {}
  for tree in trees:
    for path, v in _flatten(tree).items():
      v = np.ascontiguousarray(np.transpose(v, (3, 2, 0, 1)) if v.ndim == 4 else v)
      if "learner" in path:
        key = _learner_key(path[path.index("learner") + 1:])
      elif "backbone" in path:
        collection = "batch_stats" if "batch_stats" in path else "params"
        key = "backbone." + tv.torch_key(collection, path[path.index("backbone") + 1:])
      else:
        raise ValueError(f"fssjax HSNet variable {'/'.join(path)} is neither learner nor backbone")
      if key in out:
        raise ValueError(f"two fssjax variables map to the torch key {key}")
      out[key] = torch.from_numpy(v.copy())
  return out
