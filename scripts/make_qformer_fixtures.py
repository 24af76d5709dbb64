"""Builds the BLIP-2 Q-Former fixtures under tests/fixtures/qformer/.

tests/test_qformer.py reads these files and needs no torch. To regenerate (deterministic for a
given torch / transformers version):

  pip install torch==2.13.0          # CPU wheel; transformers is already a dependency
  python scripts/make_qformer_fixtures.py

Each fixture is a tiny random transformers `Blip2Model` (float32; vision tower and OPT
language model tiny too), of which the checkpoint keeps what the Q-Former path uses
(`query_tokens`, `qformer.*`, `language_projection.*`) plus the vision tower's
`vision_model.post_layernorm.*` (which the loader must ignore), saved as model.safetensors
with the Blip2Model key names and the full Blip2Config as config.json:

  freq2/   3 layers, cross-attention every 2nd layer (layers 0 and 2), erf GELU, 8 queries.
  freq1/   2 layers, cross-attention in every layer, gelu_new, 4 queries.

reference.npz `<name>/<what>`: image_features [2, S, E] (random), encoder_mask [2, S] (row 1:
the last 3 features are padding), and with / without that mask (`masked_` prefix):
last_hidden_state (Q-Former output), hidden1 (the first layer's output), tokens (after
`language_projection`), computed as Blip2Model does: query_tokens.expand(B) ->
qformer(query_embeds, encoder_hidden_states, encoder_attention_mask) -> language_projection.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import torch
from safetensors.torch import save as st_save

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fssjax.utils import atomic_write_bytes, atomic_write_json  # noqa: E402

import transformers  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                    "qformer")

VISION = dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              image_size=16, patch_size=8)
TEXT = dict(vocab_size=50, hidden_size=40, ffn_dim=48, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=40)
CONFIGS = {
    "freq2": dict(qformer=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                               intermediate_size=48, cross_attention_frequency=2,
                               hidden_act="gelu", encoder_hidden_size=24),
                  num_query_tokens=8),
    "freq1": dict(qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=40, cross_attention_frequency=1,
                               hidden_act="gelu_new", encoder_hidden_size=24),
                  num_query_tokens=4),
}
NUM_FEATURES = 10  # S


def main() -> None:
  torch.manual_seed(0)
  os.makedirs(ROOT, exist_ok=True)
  ref: dict[str, np.ndarray] = {}
  for name, spec in CONFIGS.items():
    cfg = transformers.Blip2Config(
        vision_config=VISION, qformer_config=spec["qformer"],
        text_config=dict(TEXT, model_type="opt"), num_query_tokens=spec["num_query_tokens"])
    model = transformers.Blip2Model(cfg).eval()
    with torch.no_grad():
      # Non-trivial LayerNorms, biases and queries; projections 10x transformers' init (std
      # 0.2, not 0.02) so that attention is far from uniform and the image matters.
      for n, p in model.named_parameters():
        if "LayerNorm" in n or "layernorm" in n or n.endswith(".bias"):
          p.add_(0.1 * torch.randn_like(p))
        elif n.startswith(("qformer.", "language_projection.")) and n.endswith(".weight"):
          p.normal_(0.0, 0.2)
      model.query_tokens.normal_(0.0, 1.0)
    state = {k: v for k, v in model.state_dict().items()
             if k == "query_tokens" or k.startswith(("qformer.", "language_projection.",
                                                     "vision_model.post_layernorm."))}
    d = os.path.join(ROOT, name)
    os.makedirs(d, exist_ok=True)
    atomic_write_bytes(os.path.join(d, "model.safetensors"),
                       st_save({k: v.detach().contiguous() for k, v in state.items()}))
    atomic_write_json(os.path.join(d, "config.json"), cfg.to_dict(), indent=1)

    feats = torch.randn(2, NUM_FEATURES, spec["qformer"]["encoder_hidden_size"])
    mask = torch.ones(2, NUM_FEATURES, dtype=torch.long)
    mask[1, -3:] = 0
    ref[f"{name}/image_features"] = feats.numpy()
    ref[f"{name}/encoder_mask"] = mask.numpy().astype(np.int32)
    for prefix, m in (("", None), ("masked_", mask)):
      with torch.no_grad():
        q = model.query_tokens.expand(2, -1, -1)
        out = model.qformer(query_embeds=q, encoder_hidden_states=feats,
                            encoder_attention_mask=m, output_hidden_states=True)
        tokens = model.language_projection(out.last_hidden_state)
      hs = out.hidden_states
      # transformers records the embedding output first, then each layer's output.
      assert len(hs) == spec["qformer"]["num_hidden_layers"] + 1, len(hs)
      ref[f"{name}/{prefix}last_hidden_state"] = out.last_hidden_state.numpy()
      ref[f"{name}/{prefix}hidden1"] = hs[1].numpy()
      ref[f"{name}/{prefix}tokens"] = tokens.numpy()

  buf = io.BytesIO()
  np.savez_compressed(buf, **ref)
  atomic_write_bytes(os.path.join(ROOT, "reference.npz"), buf.getvalue())
  atomic_write_json(os.path.join(ROOT, "README.json"), {
      "made_by": "scripts/make_qformer_fixtures.py",
      "torch": torch.__version__, "transformers": transformers.__version__,
      "configs": CONFIGS}, indent=1)
  for d, _, files in os.walk(ROOT):  # atomic writes create 0600 files
    for f in files:
      os.chmod(os.path.join(d, f), 0o644)
  print("wrote", ROOT)


if __name__ == "__main__":
  main()
