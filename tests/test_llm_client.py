"""fssjax.priors.llm: the openai backend against a mocked endpoint, the cache, JSON answers.

The endpoint is a respx router standing for the paid API (tests/llm_mock.py); the real
`openai` SDK builds, sends and retries the requests.
"""

from __future__ import annotations

import json
import logging
import os

import httpx
import pytest
import respx

from fssjax.priors import llm
from fssjax.priors.llm import LLMClient, LLMCacheMiss, LLMError, LLMSchemaError
from llm_mock import BASE, KEY_ENV, SECRET, completion, make_client  # tests/llm_mock.py


def all_cache_text(cache_dir) -> str:
  out = []
  for root, _, files in os.walk(cache_dir):
    for f in files:
      with open(os.path.join(root, f), encoding="utf-8") as fh:
        out.append(fh.read())
  return "\n".join(out)


MESSAGES = [{"role": "system", "content": "You describe objects."},
            {"role": "user", "content": "Describe a zebra in one sentence."}]


def test_openai_request_cache_and_key_privacy(tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.DEBUG)  # every logger, the SDK's and httpx's included
  monkeypatch.setenv(KEY_ENV, SECRET)
  router = respx.MockRouter(assert_all_called=False)
  route = router.post(f"{BASE}/chat/completions").mock(
      return_value=httpx.Response(200, json=completion("A zebra is a striped horse.")))
  client = make_client(router, tmp_path / "cache", max_tokens=32, temperature=0.0, seed=3)
  assert client.chat(MESSAGES) == "A zebra is a striped horse."
  assert route.call_count == 1 and client.stats == {"requests": 1, "cache_hits": 0, "reasks": 0}
  sent = route.calls[0].request
  assert sent.headers["authorization"] == f"Bearer {SECRET}"  # the key reaches the SDK only
  body = json.loads(sent.content)
  assert body["model"] == "test-model" and body["messages"] == MESSAGES
  assert (body["max_tokens"], body["temperature"], body["seed"]) == (32, 0.0, 3)
  # One cache file: the request and the answer, no key.
  files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "cache") for f in fs]
  assert len(files) == 1
  entry = json.load(open(files[0]))
  assert entry["response"] == "A zebra is a striped horse."
  assert entry["request"]["messages"] == MESSAGES and entry["request"]["model"] == "test-model"
  assert os.path.basename(files[0]) == llm.request_key(entry["request"]) + ".json"

  # A rerun (new client, no key in the environment at all) is served from the cache.
  monkeypatch.delenv(KEY_ENV)
  again = make_client(router, tmp_path / "cache", max_tokens=32, temperature=0.0, seed=3)
  assert again.chat(MESSAGES) == "A zebra is a striped horse."
  assert route.call_count == 1
  assert again.stats == {"requests": 0, "cache_hits": 1, "reasks": 0}
  # Another sampling setting is another request; it needs the key, which is gone.
  with pytest.raises(LLMError, match=KEY_ENV):
    again.chat(MESSAGES, temperature=0.7)
  assert route.call_count == 1
  # Offline mode refuses a miss instead of sending it.
  monkeypatch.setenv(KEY_ENV, SECRET)
  offline = make_client(router, tmp_path / "cache", offline=True)
  with pytest.raises(LLMCacheMiss, match="offline"):
    offline.chat([{"role": "user", "content": "something new"}])
  assert route.call_count == 1

  assert SECRET not in all_cache_text(tmp_path / "cache")
  assert SECRET not in caplog.text and SECRET not in repr(client.backend)
  assert caplog.records  # something was logged, and none of it is the key


def test_cache_key_covers_the_whole_request(tmp_path):
  client = LLMClient(llm.LocalBackend(model="m"), cache_dir=str(tmp_path))
  base = llm.request_key(client.request(MESSAGES))
  assert base == llm.request_key(client.request([dict(m) for m in MESSAGES]))
  variants = [client.request(MESSAGES, temperature=0.5), client.request(MESSAGES, seed=1),
              client.request(MESSAGES, max_tokens=7), client.request(MESSAGES[1:]),
              client.request(MESSAGES, schema={"type": "array"}),
              LLMClient(llm.LocalBackend(model="m2")).request(MESSAGES)]
  keys = {llm.request_key(v) for v in variants}
  assert len(keys) == len(variants) and base not in keys
  with pytest.raises(ValueError, match="role"):
    client.request([{"role": "robot", "content": "hi"}])


def test_schema_reask_then_success_then_cached(tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  schema = {"type": "array", "items": {"type": "string"}, "minItems": 1}
  router = respx.MockRouter(assert_all_called=False)
  route = router.post(f"{BASE}/chat/completions").mock(side_effect=[
      httpx.Response(200, json=completion("The most similar classes are horse and zebra.")),
      httpx.Response(200, json=completion('Here:\n```json\n["zebra", "horse"]\n```')),
  ])
  ask = [{"role": "user", "content": "Which classes look like a giraffe?"}]
  client = make_client(router, tmp_path)
  assert client.chat_json(ask, schema) == ["zebra", "horse"]
  assert route.call_count == 2 and client.stats["reasks"] == 1
  first, second = (json.loads(c.request.content)["messages"] for c in route.calls)
  assert "JSON schema" in first[-1]["content"]  # the schema is part of the question
  assert second[-2] == {"role": "assistant",
                        "content": "The most similar classes are horse and zebra."}
  assert "not valid" in second[-1]["content"]
  # The same question again: both answers come from the cache, nothing is sent.
  rerun = make_client(router, tmp_path)
  assert rerun.chat_json(ask, schema) == ["zebra", "horse"]
  assert route.call_count == 2 and rerun.stats == {"requests": 0, "cache_hits": 2, "reasks": 1}


def test_schema_fails_twice_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  router = respx.MockRouter(assert_all_called=False)
  route = router.post(f"{BASE}/chat/completions").mock(side_effect=[
      httpx.Response(200, json=completion('{"classes": ["zebra"]}')),
      httpx.Response(200, json=completion('["zebra", 2]')),
  ])
  client = make_client(router, tmp_path)
  with pytest.raises(LLMSchemaError, match=r"also after one re-ask.*second error: at 1: 2 is "
                                           r"not of type 'string'"):
    client.chat_json([{"role": "user", "content": "List classes."}],
                     {"type": "array", "items": {"type": "string"}})
  assert route.call_count == 2


def test_sdk_retries_and_http_errors(tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  router = respx.MockRouter(assert_all_called=False)
  route = router.post(f"{BASE}/chat/completions").mock(side_effect=[
      httpx.Response(503, headers={"retry-after-ms": "1"}, json={"error": {"message": "busy"}}),
      httpx.Response(200, json=completion("ok")),
      httpx.Response(401, json={"error": {"message": "invalid api key"}}),
  ])
  client = make_client(router, tmp_path / "a", max_retries=1)
  assert client.chat([{"role": "user", "content": "ping"}]) == "ok"
  assert route.call_count == 2  # the SDK retried the 503 once
  with pytest.raises(LLMError, match="HTTP 401") as e:
    client.chat([{"role": "user", "content": "ping 2"}])
  assert SECRET not in str(e.value)


def test_config_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="environment variable"):
    LLMClient.from_config({"backend": "openai", "model": "m", "api_key": SECRET})
  with pytest.raises(ValueError, match="api_key_env"):
    LLMClient.from_config({"backend": "openai", "model": "m", "api_key_env": SECRET + "!"})
  with pytest.raises(ValueError, match="backend"):
    LLMClient.from_config({"backend": "anthropic"})
  with pytest.raises(ValueError, match="unknown keys"):
    LLMClient.from_config({"backend": "local", "temprature": 0.1})
  monkeypatch.delenv(KEY_ENV, raising=False)
  client = LLMClient.from_config({"backend": "openai", "model": "m", "api_key_env": KEY_ENV,
                                  "cache_dir": str(tmp_path)})
  with pytest.raises(LLMError, match=f"{KEY_ENV}.*not set"):
    client.chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("text,expected", [
    ('["a", "b"]', ["a", "b"]),
    ('Sure.\n```json\n{"x": 1}\n```\nDone.', {"x": 1}),
    ('The list is ["cat", "dog"] as asked.', ["cat", "dog"]),
    ('[not json] then {"ok": true}', {"ok": True}),
])
def test_parse_json_answer(text, expected):
  assert llm.parse_json_answer(text) == expected


def test_parse_json_answer_without_json():
  with pytest.raises(ValueError, match="no JSON"):
    llm.parse_json_answer("horse, zebra and camel")


def test_chat_many_caches_each_conversation(tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  router = respx.MockRouter(assert_all_called=False)
  route = router.post(f"{BASE}/chat/completions").mock(side_effect=[
      httpx.Response(200, json=completion(f"answer {i}")) for i in range(3)])
  convs = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
  client = make_client(router, tmp_path)
  assert client.chat(convs[1]) == "answer 0"
  # One hit, two requests (the openai backend has no batch call: one request each).
  assert client.chat_many(convs, batch_size=2) == ["answer 1", "answer 0", "answer 2"]
  assert route.call_count == 3 and client.stats["cache_hits"] == 1
  assert make_client(router, tmp_path).chat(convs[2]) == "answer 2" and route.call_count == 3


def test_local_backend_for_real(tmp_path):
  """One short greedy answer from SmolLM2-135M-Instruct; the rerun never loads the model."""
  question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
  client = LLMClient.from_config({"backend": "local", "cache_dir": str(tmp_path),
                                  "max_tokens": 8})
  assert client.model == "SmolLM2-135M-Instruct.Q4_1.gguf"
  answer = client.chat(question)
  assert "paris" in answer.lower() and client.stats["requests"] == 1
  rerun = LLMClient.from_config({"backend": "local", "cache_dir": str(tmp_path),
                                 "max_tokens": 8})
  assert rerun.chat(question) == answer and rerun.stats["cache_hits"] == 1
  assert rerun.backend._lm is None  # pylint: disable=protected-access


IMAGE_MESSAGES = [{"role": "user", "content": [
    {"type": "text", "text": "Describe the image."},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]


def test_image_content_parts_reach_the_endpoint_and_the_cache_key(tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  router = respx.MockRouter(assert_all_called=False)
  route = router.post(f"{BASE}/chat/completions").mock(
      return_value=httpx.Response(200, json=completion("A red disk left of a blue square.")))
  client = make_client(router, tmp_path / "cache")
  assert client.chat(IMAGE_MESSAGES) == "A red disk left of a blue square."
  assert json.loads(route.calls[0].request.content)["messages"] == IMAGE_MESSAGES
  # Another image is another request (the image is part of the cache key).
  other = [{"role": "user", "content": [IMAGE_MESSAGES[0]["content"][0], {
      "type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
  client.chat(other)
  assert route.call_count == 2
  client.chat(IMAGE_MESSAGES)
  assert route.call_count == 2  # served from the cache
  with pytest.raises(ValueError, match="message 0 .* content parts"):
    client.chat([{"role": "user", "content": [{"type": "audio", "data": "x"}]}])


def test_local_backend_refuses_images_with_a_clear_error():
  backend = llm.LocalBackend(lm=object(), model="SmolLM2")
  with pytest.raises(LLMError, match=r"local backend \(SmolLM2\): message 0 has content parts"):
    backend.complete(IMAGE_MESSAGES, llm.Sampling())
