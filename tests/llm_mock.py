"""A respx router mounted as the openai SDK's transport (tests of fssjax.priors.*).

The test double stands for the paid API only: the real `openai` SDK builds, sends and retries
the requests; a respx router answers `POST {BASE}/chat/completions`. The SDK (openai 3.x)
sends through `httpx2`, which respx does not patch, so the router is mounted as the SDK's
transport (`httpx2.MockTransport` calling `router.handler`).
"""

from __future__ import annotations

import httpx
import httpx2
import respx

BASE = "https://llm.example.test/v1"
KEY_ENV = "FSSJAX_TEST_LLM_KEY"
SECRET = "sk-test-DO-NOT-LEAK-7f3a9c"


def completion(text: str) -> dict:
  """An OpenAI chat.completion response body whose answer is `text`."""
  return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "test-model",
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": text}}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}


def mounted(router: respx.MockRouter) -> httpx2.Client:
  """An httpx2 client whose transport is the respx router."""
  def handle(request: httpx2.Request) -> httpx2.Response:
    req = httpx.Request(request.method, str(request.url), headers=list(request.headers.raw),
                        content=request.read())
    resp = router.handler(req)
    return httpx2.Response(resp.status_code, headers=list(resp.headers.raw), content=resp.read())
  return httpx2.Client(transport=httpx2.MockTransport(handle))


def make_client(router, cache_dir, **cfg):
  """An LLMClient (openai backend, model 'test-model') talking to `router`."""
  from fssjax.priors.llm import LLMClient  # pylint: disable=import-outside-toplevel
  config = dict(backend="openai", model="test-model", base_url=BASE, api_key_env=KEY_ENV,
                cache_dir=str(cache_dir), max_retries=0)
  config.update(cfg)
  return LLMClient.from_config(config, http_client=mounted(router))
