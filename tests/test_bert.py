"""BERT encoder, its loader and the sentence encoder (fixtures by scripts/make_bert_fixtures.py).

Parity with transformers' PyTorch BertModel in float32 on two tiny random models (with and
without pooler / `bert.` prefix / minimal config.json), and with the real all-MiniLM-L6-v2
(transformers' BertModel + sentence-transformers' mean pooling and normalisation, texts
tokenised by transformers' BertTokenizerFast with truncation to 256). Tolerance: max |ours -
reference| <= 1e-4 * max(1, max |reference|).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fssjax.nn.bert import BertConfig, l2_normalize, mean_pool
from fssjax.priors.text_encoder import SentenceEncoder
from fssjax.weights.bert import config_from_state_dict, load_bert
from parity import assert_close  # tests/parity.py

BERT_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bert")
MINILM_TEXTS = json.load(open(os.path.join(BERT_FIXTURES, "README.json")))["minilm_texts"]


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(BERT_FIXTURES, "reference.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def minilm():
  return SentenceEncoder.minilm(batch_size=4)


@pytest.mark.parametrize("name", ["tiny", "tiny_nopool"])
def test_bert_matches_transformers(name, ref):
  model, params = load_bert(os.path.join(BERT_FIXTURES, name))
  assert model.config.add_pooling_layer == (name == "tiny")
  assert model.config.hidden_act == ("gelu" if name == "tiny" else "gelu_new")
  # tiny_nopool's config.json gives only model_type, heads and activation: the rest is inferred.
  assert (model.config.num_hidden_layers, model.config.intermediate_size,
          model.config.max_position_embeddings, model.config.vocab_size) == (2, 64, 40, 40)

  @jax.jit
  def run(params, ids, mask, types):
    out = model.apply({"params": params}, ids, mask, types, output_hidden_states=True)
    out["sentence"] = l2_normalize(mean_pool(out["last_hidden_state"], mask))
    return out

  for p in (f"{name}/", f"{name}/pair_"):
    out = run(params, ref[p + "input_ids"], ref[p + "attention_mask"], ref[p + "token_type_ids"])
    # Padded positions included: transformers computes them the same way.
    assert_close(out["last_hidden_state"], ref[p + "last_hidden_state"], what=p + "last")
    assert_close(out["hidden_states"][1], ref[p + "hidden1"], what=p + "hidden_states[1]")
    assert len(out["hidden_states"]) == 3
    assert_close(out["sentence"], ref[p + "sentence"], what=p + "sentence")
    if name == "tiny":
      assert_close(out["pooler_output"], ref[p + "pooler"], what=p + "pooler")
    else:
      assert "pooler_output" not in out
  # The pair's second segment uses token type 1: with all-zero types the output changes.
  p = f"{name}/pair_"
  zero = run(params, ref[p + "input_ids"], ref[p + "attention_mask"],
             np.zeros_like(ref[p + "token_type_ids"]))
  assert np.abs(np.asarray(zero["last_hidden_state"]) - ref[p + "last_hidden_state"]).max() > 1e-3


def test_padding_does_not_change_valid_tokens(ref):
  """Row 1 of the batch ('the red car', 5 tokens) alone equals its padded version."""
  model, params = load_bert(os.path.join(BERT_FIXTURES, "tiny"))
  apply = jax.jit(model.apply)
  ids = ref["tiny/input_ids"][1:2, :5]
  alone = apply({"params": params}, ids, np.ones_like(ids))["last_hidden_state"]
  assert_close(alone, ref["tiny/last_hidden_state"][1:2, :5], what="unpadded")
  # Without the mask the padding would leak into the valid tokens.
  leaky = apply({"params": params}, ref["tiny/input_ids"][1:2])["last_hidden_state"]
  assert np.abs(np.asarray(leaky[:, :5]) - ref["tiny/last_hidden_state"][1:2, :5]).max() > 1e-3


def test_sentence_encoder_on_the_tiny_model(ref):
  """tokenizer.json through `tokenizers` gives transformers' ids; embeddings match."""
  texts = json.load(open(os.path.join(BERT_FIXTURES, "README.json")))["texts"]
  enc = SentenceEncoder.load(os.path.join(BERT_FIXTURES, "tiny"), batch_size=3)
  assert enc.max_seq_length == 40 and enc.model_id == "tiny"
  ids = enc.tokenize(texts)
  for i, row in enumerate(ids):
    n = int(ref["tiny/attention_mask"][i].sum())
    np.testing.assert_array_equal(row, ref["tiny/input_ids"][i, :n])
  # batch_size 3 < 4 texts: two forward passes, reassembled in input order.
  assert_close(enc.encode(texts), ref["tiny/sentence"], what="sentence embeddings")


def test_loader_errors(tmp_path):
  src = os.path.join(BERT_FIXTURES, "tiny")
  with pytest.raises(ValueError, match="model_type"):
    BertConfig.from_transformers({"model_type": "roberta"})
  with pytest.raises(ValueError, match="hidden_act"):
    BertConfig.from_transformers({"hidden_act": "swish"})
  with pytest.raises(ValueError, match="divisible"):
    BertConfig.from_transformers({"hidden_size": 30, "num_attention_heads": 4})
  with pytest.raises(ValueError, match="word_embeddings"):
    config_from_state_dict({}, {"encoder.layer.0.output.dense.weight": np.zeros((2, 2))})
  # A config.json contradicting the tensors: a shape error naming the tensor.
  bad = tmp_path / "bad"
  shutil.copytree(src, bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["intermediate_size"] = 48
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"intermediate\.dense\.(weight|bias).*expects"):
    load_bert(str(bad))
  # A pickle is refused unless asked for by name.
  pk = tmp_path / "pickle"
  pk.mkdir()
  shutil.copy(os.path.join(src, "config.json"), pk / "config.json")
  (pk / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ValueError, match="allow_pickle"):
    load_bert(str(pk))
  model, params = load_bert(src)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 41), jnp.int32)), params)


def test_minilm_matches_transformers(minilm, ref):
  assert minilm.max_seq_length == 256 and minilm.dim == 384 and minilm.normalize
  for i in range(3):
    np.testing.assert_array_equal(minilm.tokenize([MINILM_TEXTS[i]])[0],
                                  ref[f"minilm/input_ids_{i}"])
  # The long text is truncated to 256 word pieces, [CLS] and [SEP] included.
  assert [len(x) for x in minilm.tokenize(MINILM_TEXTS)] == ref["minilm/num_tokens"].tolist()
  emb = minilm.encode(MINILM_TEXTS)
  assert emb.dtype == np.float32 and emb.shape == (4, 384)
  assert_close(emb, ref["minilm/sentence"], what="all-MiniLM-L6-v2 embeddings")
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  # Batching and order do not change the result.
  one = minilm.encode([MINILM_TEXTS[2]])
  assert_close(one, emb[2:3], tol=1e-5, what="alone vs in a batch")
  with pytest.raises(TypeError, match="list of strings"):
    minilm.encode("a single string")
  assert minilm.encode([]).shape == (0, 384)


def test_minilm_ranks_similarity_like_a_person(minilm):
  """Expected orderings a person would give (cosine similarity of the embeddings)."""
  anchors = ["a zebra is a striped horse-like animal", "a red sports car on a road",
             "a slice of pizza with cheese"]
  candidates = ["a horse", "a laptop", "a racing car", "a banana", "a hot dog"]
  a, c = minilm.encode(anchors), minilm.encode(candidates)
  sim = {(x, y): float(a[i] @ c[j]) for i, x in enumerate(anchors)
         for j, y in enumerate(candidates)}
  z, car, pizza = anchors
  # zebra: horse >> laptop, banana; car: racing car first; pizza: the two foods above the rest.
  assert sim[z, "a horse"] > sim[z, "a laptop"] + 0.1
  assert max(candidates, key=lambda y: sim[z, y]) == "a horse"
  assert max(candidates, key=lambda y: sim[car, y]) == "a racing car"
  foods = sorted(candidates, key=lambda y: -sim[pizza, y])[:2]
  assert set(foods) == {"a hot dog", "a banana"} or foods[0] == "a hot dog"
  # Paraphrases are closer than unrelated sentences.
  p = minilm.encode(["A man is eating food.", "A man is eating a piece of bread.",
                     "A monkey is playing drums."])
  assert p[0] @ p[1] > p[0] @ p[2] + 0.3
