"""Per-image descriptions and their priors (objects, attributes, relations), for LLMFormer.

  python -m fssjax.priors.describe_images --dataset=synthetic_dense --backend=exact --out=p.json
  python -m fssjax.priors.describe_images --dataset=ade20k_150 --root=DIR --backend=openai \
      --model=gpt-4o-mini --base-url=https://api.openai.com/v1 --api-key-env=OPENAI_API_KEY \
      --max-images=100 --out=ade150_priors.json
  python -m fssjax.priors.describe_images --dataset=synthetic_dense --backend=local \
      --base-url=http://127.0.0.1:8080/v1 --model=llava --out=p.json

LLMFormer (Shi, Dao, Cai, IJCV 2024) asks a multimodal LLM to describe each image and parses
the description into object, attribute and relation priors. This command does both:

  * the images come from any dense source of the dense evaluator (`--dataset`: a name
    registered with `fssjax.evaluators.register_dense_source`, e.g. 'synthetic_dense' (the
    embedded benchmark; 'synthetic' is an alias) or 'ade20k_150'; `--root`, `--split`
    ('test'), `--classes` (synthetic_dense), `--max-images`);
  * backends: `openai`: any OpenAI-compatible endpoint through the project's priors client
    (`fssjax.priors.llm.LLMClient`: the key is read from the environment variable NAMED by
    `--api-key-env` and never written anywhere; every request is cached on disk, so a rerun
    sends nothing); the user turn is `PROMPT` followed by the image as a PNG data URL (OpenAI's
    `image_url` content part); `local`: the same client against a multimodal model served on
    this machine behind the same API (llama.cpp's `llama-server` with a LLaVA GGUF and its
    projector, vLLM, ...; `--base-url`, default `LOCAL_BASE_URL`; no key needed); `exact`: no
    model: the embedded benchmark's exact descriptions (`fssjax.data.synthetic_truth`),
    offline;
  * each description is parsed with `fssjax.priors.scene_graph.SceneGraphParser` (spaCy +
    SceneGraphParser) into objects (name, attributes) and relations; on the embedded benchmark
    its attribute words (`synthetic_truth.ATTRIBUTE_WORDS`: colours, texture adjectives, size
    and twin words) are kept as attributes where spaCy would make them nouns.

Output JSON: {"dataset", "split", "source" (the dense source's name), "backend", "model",
"prompt" (null for exact), "sampling", "parser" (the spaCy model), "command", "images":
[{"index", "description", "priors" (`ScenePriors.to_json`: text, objects [{name, attributes,
span}], relations [{subject, relation, object}]), and for the embedded benchmark "truth" (the
exact priors from the generator, to compare the parse with)}]}. `load_priors(path)` reads it
back as {index: ScenePriors}.

Errors in the arguments or the data (a missing root, an unknown dataset, 'exact' on a data set
without exact descriptions, a missing key) print one paragraph and exit with status 2.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from fssjax import utils
from fssjax.data.base import DataError

BACKENDS = ("exact", "openai", "local")
LOCAL_BASE_URL = "http://127.0.0.1:8080/v1"  # llama.cpp llama-server's default address
LOCAL_KEY_ENV = "FSSJAX_LOCAL_LLM_KEY"  # local servers take any key; set to 'none' if unset
PROMPT = ("Describe this image for a segmentation model. Name every object you see with its "
          "size, its colours and its texture or pattern, one sentence each, like 'There is a "
          "small red striped star.' Then say where the objects are relative to each other, "
          "one sentence per pair, like 'The striped star is left of the dotted circle.', "
          "'The dotted circle is above the solid square.' or 'The striped star overlaps the "
          "dotted circle.' Write plain sentences only, no list and no introduction.")


class UserError(Exception):
  """A bad argument or data set (printed as one paragraph, exit status 2)."""


def image_content(image: np.ndarray) -> dict[str, Any]:
  """OpenAI's image content part for a uint8 [H, W, 3] image (lossless PNG data URL)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  data = base64.b64encode(buf.getvalue()).decode("ascii")
  return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def messages_for(image: np.ndarray, prompt: str = PROMPT) -> list[dict[str, Any]]:
  """The chat of one image: one user turn with the prompt and the image."""
  return [{"role": "user", "content": [{"type": "text", "text": prompt}, image_content(image)]}]


def ask(client, image: np.ndarray, prompt: str = PROMPT) -> str:
  """The client's (cached) answer to `messages_for(image, prompt)`.

  A client whose `request` takes text-only messages (`fssjax.priors.llm` before content parts)
  builds the request from the text turn (validated, sampling filled in) and gets the messages
  with the image put back: the cache key hashes the image too, and the openai backend sends
  the content parts as they are.
  """
  messages = messages_for(image, prompt)
  try:
    return client.chat(messages)
  except ValueError:
    req = client.request([{"role": "user", "content": prompt}])
    req["messages"] = messages
    return client._chat(req)  # pylint: disable=protected-access


def _dense_source(args):
  import ml_collections  # pylint: disable=import-outside-toplevel
  from fssjax import evaluators  # pylint: disable=import-outside-toplevel
  from fssjax.data import synthetic_dense  # pylint: disable=import-outside-toplevel
  synthetic_dense.register()  # 'synthetic_dense' (also registered on import; idempotent)
  dataset = "synthetic_dense" if args.dataset == "synthetic" else args.dataset
  data = dict(dataset=dataset, root=args.root or "", split=args.split,
              max_images=args.max_images)
  if dataset == "synthetic_dense":
    data["classes"] = args.classes
  elif args.classes != "all":
    raise UserError(f"--classes={args.classes} applies to --dataset=synthetic_dense only, not "
                    f"{dataset!r}")
  try:
    return evaluators.dense_source(ml_collections.ConfigDict(data))
  except (DataError, ValueError) as e:
    raise UserError(f"--dataset={args.dataset} --root={args.root!r}: {e}") from e


def _client(args):
  from fssjax.priors.llm import LLMClient  # pylint: disable=import-outside-toplevel
  if not args.model:
    raise UserError(f"--backend={args.backend} needs --model: the model name the endpoint "
                    "serves (e.g. gpt-4o-mini, or the name a local llama-server / vLLM reports)")
  if args.backend == "local":
    base_url = args.base_url or LOCAL_BASE_URL
    key_env = args.api_key_env or LOCAL_KEY_ENV
    if key_env == LOCAL_KEY_ENV:
      os.environ.setdefault(LOCAL_KEY_ENV, "none")  # not a secret: local servers ignore it
  else:
    base_url, key_env = args.base_url or None, args.api_key_env or "OPENAI_API_KEY"
  cfg = dict(backend="openai", model=args.model, base_url=base_url, api_key_env=key_env,
             max_tokens=args.max_tokens, temperature=0.0, seed=0, offline=args.offline)
  if args.cache_dir:
    cfg["cache_dir"] = args.cache_dir
  try:
    return LLMClient.from_config(cfg, http_client=getattr(args, "http_client", None))
  except ValueError as e:
    raise UserError(str(e)) from e


def describe(args) -> dict[str, Any]:
  """Runs the command for parsed `args`; returns the output document (also written)."""
  from fssjax.priors import scene_graph  # pylint: disable=import-outside-toplevel
  from fssjax.priors.llm import LLMError  # pylint: disable=import-outside-toplevel
  if args.backend not in BACKENDS:
    raise UserError(f"--backend={args.backend!r}; expected one of {BACKENDS}")
  if args.backend == "exact" and args.dataset not in ("synthetic", "synthetic_dense"):
    raise UserError(f"--backend=exact needs exact per-image descriptions, which only the "
                    f"embedded benchmark has (--dataset=synthetic_dense); {args.dataset!r} has "
                    "none: use --backend=openai (or local) to ask a multimodal LLM")
  client = None if args.backend == "exact" else _client(args)
  source = _dense_source(args)
  has_truth = hasattr(source, "scene")
  try:
    if has_truth:  # the embedded benchmark's vocabulary stays attributes ('bullseye', 'lime')
      from fssjax.data import synthetic_truth  # pylint: disable=import-outside-toplevel
      parser = scene_graph.SceneGraphParser(
          attribute_words=scene_graph.COLOUR_WORDS | synthetic_truth.ATTRIBUTE_WORDS)
    else:
      parser = scene_graph.SceneGraphParser()
  except ImportError as e:
    raise UserError(str(e)) from e
  n = len(source)
  records = []
  t0 = time.time()
  for index in range(n):
    if args.backend == "exact":
      text = source.description(index)
    else:
      image, _ = source.load(index)
      try:
        text = ask(client, image)
      except LLMError as e:
        raise UserError(f"image {index} of {source.name}: {e}") from e
    rec = {"index": index, "description": text, "priors": parser.parse(text).to_json()}
    if has_truth:
      rec["truth"] = source.scene(index)["priors"]
    records.append(rec)
    if (index + 1) % 50 == 0 or index + 1 == n:
      logging.info("described %d/%d images of %s (%.1f s)", index + 1, n, source.name,
                   time.time() - t0)
  doc = {"dataset": args.dataset, "split": args.split, "source": source.name,
         "backend": args.backend, "model": None if client is None else client.model,
         "prompt": None if client is None else PROMPT,
         "sampling": None if client is None else dict(temperature=0.0, seed=0,
                                                      max_tokens=args.max_tokens),
         "parser": scene_graph.SPACY_MODEL,
         "command": "python -m fssjax.priors.describe_images " + " ".join(args.argv),
         "images": records}
  if client is not None:
    doc["llm_stats"] = dict(client.stats)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  utils.atomic_write_json(args.out, doc, indent=1)
  return doc


def load_priors(path: str) -> dict[int, Any]:
  """{image index: ScenePriors} of an output file.

  Raises:
    DataError: not an output of this command.
  """
  from fssjax.priors.scene_graph import ScenePriors  # pylint: disable=import-outside-toplevel
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
    return {int(r["index"]): ScenePriors.from_json(r["priors"]) for r in doc["images"]}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: expected the output of `python -m fssjax.priors.describe_images` "
                    f"(an 'images' list of records with 'index' and 'priors'); "
                    f"{type(e).__name__}: {e}") from e


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m fssjax.priors.describe_images",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", required=True,
                 help="a dense source: synthetic_dense (alias synthetic), ade20k_150, ...")
  p.add_argument("--root", default="", help="the data set's root ('' = default)")
  p.add_argument("--split", default="test", choices=("train", "val", "test"))
  p.add_argument("--classes", default="all", choices=("all", "seen", "unseen"),
                 help="synthetic_dense only: the class split")
  p.add_argument("--max-images", type=int, default=0, help="> 0: the first images only")
  p.add_argument("--backend", required=True, choices=BACKENDS)
  p.add_argument("--model", default="", help="openai / local: the served model's name")
  p.add_argument("--base-url", default="", help="openai / local: the endpoint")
  p.add_argument("--api-key-env", default="",
                 help="NAME of the environment variable holding the key (default "
                      "OPENAI_API_KEY; local: none needed)")
  p.add_argument("--max-tokens", type=int, default=400)
  p.add_argument("--cache-dir", default="", help="LLM response cache (default: the client's)")
  p.add_argument("--offline", action="store_true", help="answers from the cache only")
  p.add_argument("--out", required=True, help="output JSON file")
  return p


def main(argv: Optional[Sequence[str]] = None, *, http_client: Any = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  args.argv, args.http_client = argv, http_client
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    doc = describe(args)
  except UserError as e:
    print(f"describe_images: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {len(doc['images'])} images of {doc['source']} described by "
        f"{doc['backend']}" + (f" ({doc['model']})" if doc["model"] else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
