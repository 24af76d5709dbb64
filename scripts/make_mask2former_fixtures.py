"""Builds the Mask2Former fixtures under tests/fixtures/mask2former/ (reference.npz, README.json).

tests/test_deformable_attention.py and tests/test_mask2former.py read them and need neither
torch nor transformers. To regenerate (deterministic for a given torch / transformers version):

  pip install torch==2.13.0          # CPU wheel; transformers is already a dependency
  python scripts/make_mask2former_fixtures.py

Everything comes from transformers' PyTorch Mask2Former code
(`transformers.models.mask2former.modeling_mask2former`), float32, tiny sizes:

  core/*    `multi_scale_deformable_attention` on random values over three levels of uneven
            sizes ((6, 5), (3, 4), (2, 2)), 2 images, 4 heads of 8 channels, 5 queries, 3
            points, sampling locations drawn in [-0.25, 1.25]^2 (so some fall outside the map and
            read zero padding) and softmax-ed attention weights: value (float16-exact, stored
            as float16), sampling_locations, attention_weights, output.
  msda/*    `Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(embed_dim=32,
            num_heads=4, n_levels=3, n_points=4)` with random float16-exact parameters
            (`msda/param/<torch key>`, PyTorch layout, stored as float16), as the pixel-decoder
            encoder calls it: queries = the
            flattened maps, position embeddings added, the encoder's reference points with
            valid ratios < 1 and a padding mask: hidden_states, position_embeddings (both
            float16-exact), reference_points, valid_ratios, attention_mask, output,
            attention_weights (of the first 8 queries); and the
            same module with box reference points (cx, cy, w, h): ref4, output4; and the
            published initial `sampling_offsets.bias` (init/sampling_offsets.bias).
  loss/*    `Mask2FormerLoss` (Mask2FormerConfig(num_labels=5, train_num_points=16,
            oversample_ratio=3, importance_sample_ratio=0.75, class_weight=2, mask_weight=5,
            dice_weight=5, no_object_weight=0.1)) on 2 images, 6 queries, mask logits 8x8 and
            binary targets 16x16 (3 and 2 objects). Its `torch.rand` draws are recorded in call
            order, so the JAX code can be fed the same points: matcher_points_<b> (the
            matcher's [1, P, 2] per image), over (the [M, 3P, 2] oversampled candidates of the
            M matched pairs, in the loss's pair order: image, then query), random (the
            [M, P/4, 2] uniform points); also the matcher's cost matrices cost_<b> [Q, T_b]
            (recomputed with the reference's pair-wise functions on the recorded points), the
            matched indices rows_<b> / cols_<b>, and the losses loss_cross_entropy, loss_mask,
            loss_dice.
  pixel/*   `Mask2FormerPixelDecoder(Mask2FormerConfig(**TINY), feature_channels=CHANNELS)`
            with random float16-exact parameters (`pixel/param/<torch key>`, stored as
            float16 without loss) on random float16-exact backbone maps (features_<i>, NHWC,
            finest first): mask_features and multi_scale_<i> (NHWC, float32).
  decoder/* `Mask2FormerTransformerModule(in_features=32, config)` with random float16-exact
            parameters on the pixel decoder's outputs rounded to float16 (pixel/multi_scale_<i>
            and pixel/mask_features as float16): last_hidden_state, intermediate_<l>
            ([B, Q, C], batch first) and masks_<l> ([B, Q, H/4, W/4]) for the decoder_layers
            predictions.

Float16-exact: inputs and parameters are rounded to float16 and the reference computes with
them in float32 (`half_exact`), so the fixture stores them as float16 without changing the
computation (the whole set stays < 300 KB). Outputs are float32.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fssjax.utils import atomic_write_bytes, atomic_write_json  # noqa: E402

import transformers  # noqa: E402
from transformers.models.mask2former import modeling_mask2former as m2f  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                    "mask2former")

SHAPES = [(6, 5), (3, 4), (2, 2)]


def core(ref: dict) -> None:
  g = torch.Generator().manual_seed(1)
  b, nh, dh, q, npt = 2, 4, 8, 5, 3
  s = sum(h * w for h, w in SHAPES)
  value = half_exact(torch.randn(b, s, nh, dh, generator=g))
  loc = torch.rand(b, q, nh, len(SHAPES), npt, 2, generator=g) * 1.5 - 0.25
  weights = torch.softmax(torch.randn(b, q, nh, len(SHAPES) * npt, generator=g), -1)
  weights = weights.view(b, q, nh, len(SHAPES), npt)
  out = m2f.multi_scale_deformable_attention(value, SHAPES, loc, weights)
  ref.update({"core/value": value.half(), "core/sampling_locations": loc,
              "core/attention_weights": weights, "core/output": out})


def msda(ref: dict) -> None:
  torch.manual_seed(2)
  mod = m2f.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(
      embed_dim=32, num_heads=4, n_levels=3, n_points=4).eval()
  with torch.no_grad():
    for name, p in mod.named_parameters():
      p.copy_(half_exact(torch.randn_like(p) * (0.05 if name == "sampling_offsets.weight"
                                                else 0.3)))
  b = 2
  s = sum(h * w for h, w in SHAPES)
  hidden = half_exact(torch.randn(b, s, 32))
  pos = half_exact(torch.randn(b, s, 32) * 0.5)
  valid = torch.tensor([[[1.0, 1.0]] * 3, [[0.8, 2 / 3]] * 3])
  refp = m2f.Mask2FormerPixelDecoderEncoderOnly.get_reference_points(SHAPES, valid, "cpu")
  mask = torch.zeros(b, s, dtype=torch.bool)
  mask[1, -3:] = True
  mask[1, 7] = True
  with torch.no_grad():
    out, attn = mod(hidden_states=hidden, attention_mask=mask, encoder_hidden_states=hidden,
                    position_embeddings=pos, reference_points=refp,
                    spatial_shapes_list=SHAPES)
    ref4 = half_exact(torch.cat([torch.rand(b, s, 3, 2), torch.rand(b, s, 3, 2) * 0.5], -1))
    out4, _ = mod(hidden_states=hidden, encoder_hidden_states=hidden, reference_points=ref4,
                  spatial_shapes_list=SHAPES)
  for k, v in mod.state_dict().items():
    ref[f"msda/param/{k}"] = v.half()
  # The published initialisation of the module (Mask2FormerPreTrainedModel._init_weights).
  fresh = m2f.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(
      embed_dim=32, num_heads=4, n_levels=3, n_points=4)
  holder = type("Holder", (), {"config": transformers.Mask2FormerConfig()})()
  m2f.Mask2FormerPreTrainedModel._init_weights(holder, fresh)  # pylint: disable=protected-access
  ref["msda/init/sampling_offsets.bias"] = fresh.sampling_offsets.bias.detach()
  ref.update({"msda/hidden_states": hidden.half(), "msda/position_embeddings": pos.half(),
              "msda/reference_points": refp, "msda/valid_ratios": valid,
              "msda/attention_mask": mask, "msda/output": out,
              "msda/attention_weights": attn[:, :8],  # the first 8 queries
              "msda/ref4": ref4.half(), "msda/output4": out4})


def loss(ref: dict) -> None:
  torch.manual_seed(3)
  cfg = transformers.Mask2FormerConfig(num_labels=5, train_num_points=16, oversample_ratio=3.0,
                                       importance_sample_ratio=0.75, class_weight=2.0,
                                       mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1)
  weight_dict = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
  crit = m2f.Mask2FormerLoss(cfg, weight_dict)
  b, q = 2, 6
  mask_logits = torch.randn(b, q, 8, 8) * 2
  class_logits = torch.randn(b, q, 6)
  labels = [torch.tensor([1, 4, 0]), torch.tensor([2, 2])]
  masks = []
  for n in (3, 2):
    mm = torch.zeros(n, 16, 16)
    for i in range(n):
      y0, x0 = np.random.RandomState(10 * n + i).randint(0, 10, 2)
      mm[i, y0:y0 + 6, x0:x0 + 5] = 1.0
    masks.append(mm)
  draws = []
  real_rand = torch.rand

  def recording_rand(*args, **kw):
    out = real_rand(*args, **kw)
    draws.append(out.clone())
    return out

  matched = []
  real_match = crit.matcher.forward

  def recording_match(*args, **kw):
    out = real_match(*args, **kw)
    matched.extend(out)
    return out

  torch.rand = recording_rand
  crit.matcher.forward = recording_match
  try:
    with torch.no_grad():
      losses = crit(mask_logits, class_logits, masks, labels)
  finally:
    torch.rand = real_rand
    crit.matcher.forward = real_match
  assert len(draws) == b + 2, len(draws)
  # Draw order: matcher (one per image), then the loss's over + random points.
  for i in range(b):
    pts = draws[i]
    ref[f"loss/matcher_points_{i}"] = pts
    probs = class_logits[i].softmax(-1)
    tgt = m2f.sample_point(masks[i][:, None], pts.repeat(len(labels[i]), 1, 1),
                           align_corners=False).squeeze(1)
    prd = m2f.sample_point(mask_logits[i][:, None], pts.repeat(q, 1, 1),
                           align_corners=False).squeeze(1)
    cost = (5.0 * m2f.pair_wise_sigmoid_cross_entropy_loss(prd, tgt)
            - 2.0 * probs[:, labels[i]] + 5.0 * m2f.pair_wise_dice_loss(prd, tgt))
    ref[f"loss/cost_{i}"] = cost
  ref["loss/over"], ref["loss/random"] = draws[b], draws[b + 1]
  for i, (rows, cols) in enumerate(matched):  # the assignment the loss used
    ref[f"loss/rows_{i}"], ref[f"loss/cols_{i}"] = rows, cols
  ref.update({"loss/mask_logits": mask_logits, "loss/class_logits": class_logits,
              "loss/masks_0": masks[0], "loss/masks_1": masks[1],
              "loss/labels_0": labels[0], "loss/labels_1": labels[1]})
  for k, v in losses.items():
    ref[f"loss/{k}"] = v


TINY = dict(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
            encoder_layers=2, decoder_layers=4, num_attention_heads=4, dim_feedforward=32,
            num_queries=5, common_stride=4, feature_strides=[4, 8, 16, 32])
CHANNELS = [8, 16, 24, 32]
FEATURE_SHAPES = [(8, 6), (4, 3), (2, 2), (1, 1)]


def half_exact(t: torch.Tensor) -> torch.Tensor:
  """t rounded to float16 precision (kept float32): stored as float16 without loss."""
  return t.half().float()


def randomize(module: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name.endswith("sampling_offsets.weight"):
        value = 0.05 * noise
      elif "norm" in name or name.split(".")[-2:-1] == ["1"] and name.endswith("weight"):
        value = 1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
      else:
        value = 0.3 * noise
      p.copy_(half_exact(value))


def decoder(ref: dict) -> None:
  cfg = transformers.Mask2FormerConfig(**TINY)
  pix = m2f.Mask2FormerPixelDecoder(cfg, feature_channels=CHANNELS).eval()
  randomize(pix, 4)
  g = torch.Generator().manual_seed(5)
  feats = [half_exact(torch.randn(2, c, h, w, generator=g)) for c, (h, w) in
           zip(CHANNELS, FEATURE_SHAPES)]
  with torch.no_grad():
    out = pix(feats)
  nhwc = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731
  for i, f in enumerate(feats):
    ref[f"pixel/features_{i}"] = nhwc(f).half()
  for k, v in pix.state_dict().items():
    ref[f"pixel/param/{k}"] = v.half()
  ref["pixel/mask_features"] = nhwc(out.mask_features)
  for i, f in enumerate(out.multi_scale_features):
    ref[f"pixel/multi_scale_{i}"] = nhwc(f)

  tm = m2f.Mask2FormerTransformerModule(in_features=32, config=cfg).eval()
  randomize(tm, 6)
  ms = [half_exact(f) for f in out.multi_scale_features]
  mask_features = half_exact(out.mask_features)
  with torch.no_grad():
    dec = tm(ms, mask_features)
  for k, v in tm.state_dict().items():
    ref[f"decoder/param/{k}"] = v.half()
  ref["decoder/last_hidden_state"] = dec.last_hidden_state
  for i, (h, m) in enumerate(zip(dec.intermediate_hidden_states, dec.masks_queries_logits)):
    ref[f"decoder/intermediate_{i}"] = h.transpose(0, 1)
    ref[f"decoder/masks_{i}"] = m


def main() -> None:
  os.makedirs(ROOT, exist_ok=True)
  ref: dict = {}
  core(ref)
  msda(ref)
  loss(ref)
  decoder(ref)
  arrays = {}
  for k, v in ref.items():
    a = v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    if isinstance(v, torch.Tensor) and v.dtype == torch.float16:
      a = v.detach().numpy()  # float16-exact values (see half_exact)
    elif a.dtype == np.float64:
      a = a.astype(np.float32)
    if a.dtype == np.int64:
      a = a.astype(np.int32)
    arrays[k] = a
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  atomic_write_bytes(os.path.join(ROOT, "reference.npz"), buf.getvalue())
  atomic_write_json(os.path.join(ROOT, "README.json"), {
      "made_by": "scripts/make_mask2former_fixtures.py",
      "torch": torch.__version__, "transformers": transformers.__version__,
      "spatial_shapes": SHAPES, "tiny_config": TINY, "feature_channels": CHANNELS,
      "feature_shapes": FEATURE_SHAPES}, indent=1)
  for d, _, files in os.walk(ROOT):
    for f in files:
      os.chmod(os.path.join(d, f), 0o644)
  print("wrote", ROOT, os.path.getsize(os.path.join(ROOT, "reference.npz")), "bytes")


if __name__ == "__main__":
  main()
