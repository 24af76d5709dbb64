"""python -m fssjax.priors.describe_images: exact descriptions of the embedded benchmark (for
real: spaCy + SceneGraphParser), and a multimodal LLM behind a mocked OpenAI-compatible
endpoint (tests/llm_mock.py: the real openai SDK, a respx router as the endpoint)."""

from __future__ import annotations

import base64
import io
import json
import os

import httpx
import numpy as np
import pytest
import respx
from PIL import Image

from fssjax.data import synthetic
from fssjax.data import synthetic_dense as sd
from fssjax.data import synthetic_truth as st
from fssjax.priors import describe_images as di
from llm_mock import BASE, KEY_ENV, SECRET, completion, mounted  # tests/llm_mock.py

ANSWER = ("There is a small red striped star. There is a large blue dotted circle. The striped "
          "star is left of the dotted circle.")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("describe") / "set")
  synthetic.generate(path, workers=1, train=2, val=3, size=48, seed=3)
  return path


def _objects(priors):
  return [(o["name"], list(o["attributes"])) for o in priors["objects"]]


def _relations(priors):
  return sorted((r["subject"], r["relation"], r["object"]) for r in priors["relations"])


def test_exact_backend_parses_the_exact_descriptions(root, tmp_path, capsys):
  out = str(tmp_path / "exact.json")
  assert di.main(["--dataset=synthetic", f"--root={root}", "--backend=exact",
                  f"--out={out}"]) == 0
  assert "wrote" in capsys.readouterr().out
  doc = json.load(open(out))
  assert doc["backend"] == "exact" and doc["model"] is None and doc["prompt"] is None
  scenes = st.load_scenes(root, "val")
  assert [r["description"] for r in doc["images"]] == [s["description"] for s in scenes]
  assert [r["truth"] for r in doc["images"]] == [s["priors"] for s in scenes]
  # Image 0: "There is a medium green and cyan gradient circle. There is a medium yellow and
  # cyan gradient circle. The green gradient circle is left of the yellow gradient circle."
  first = doc["images"][0]["priors"]
  assert _objects(first) == [("circle", ["medium", "green", "cyan", "gradient"]),
                             ("circle", ["medium", "yellow", "cyan", "gradient"])]
  assert _relations(first) == [(0, "left of", 1)]
  for rec in doc["images"]:  # the parse recovers the generator's truth on these images
    assert _objects(rec["priors"]) == _objects(rec["truth"])
    assert _relations(rec["priors"]) == _relations(rec["truth"])
  back = di.load_priors(out)
  assert sorted(back) == [0, 1, 2] and back[0].objects[1].name == "circle"


def _router(base):
  router = respx.MockRouter(assert_all_called=False)
  route = router.post(f"{base}/chat/completions").mock(
      return_value=httpx.Response(200, json=completion(ANSWER)))
  return router, route


def test_openai_backend_sends_each_image_and_caches(root, tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  router, route = _router(BASE)
  out, cache = str(tmp_path / "llm.json"), str(tmp_path / "cache")
  argv = ["--dataset=synthetic_dense", f"--root={root}", "--split=val", "--max-images=2",
          "--backend=openai", "--model=test-model", f"--base-url={BASE}",
          f"--api-key-env={KEY_ENV}", f"--cache-dir={cache}", f"--out={out}"]
  assert di.main(argv, http_client=mounted(router)) == 0
  assert route.call_count == 2
  source = sd.SyntheticDenseSource(root, "val")
  for index, call in enumerate(route.calls):
    assert call.request.headers["authorization"] == f"Bearer {SECRET}"
    body = json.loads(call.request.content)
    assert body["model"] == "test-model" and body["max_tokens"] == 400
    (turn,) = body["messages"]
    text, image = turn["content"]
    assert text == {"type": "text", "text": di.PROMPT}
    url = image["image_url"]["url"]
    assert image["type"] == "image_url" and url.startswith("data:image/png;base64,")
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    np.testing.assert_array_equal(sent, source.load(index)[0])  # the image itself, lossless
  doc = json.load(open(out))
  assert doc["model"] == "test-model" and doc["llm_stats"]["requests"] == 2
  for rec in doc["images"]:
    assert rec["description"] == ANSWER
    assert _objects(rec["priors"]) == [("star", ["small", "red", "striped"]),
                                       ("circle", ["large", "blue", "dotted"])]
    assert _relations(rec["priors"]) == [(0, "left of", 1)]
  # A rerun without the key is served from the cache; the key is written nowhere.
  monkeypatch.delenv(KEY_ENV)
  assert di.main(argv, http_client=mounted(router)) == 0
  assert route.call_count == 2 and json.load(open(out))["llm_stats"]["cache_hits"] == 2
  written = [open(out).read()] + [open(os.path.join(d, f)).read()
                                  for d, _, fs in os.walk(cache) for f in fs]
  assert len(written) == 3 and not any(SECRET in w for w in written)


def test_local_backend_uses_a_local_server_without_a_key(root, tmp_path, monkeypatch):
  monkeypatch.delenv(di.LOCAL_KEY_ENV, raising=False)
  router, route = _router(di.LOCAL_BASE_URL)
  out = str(tmp_path / "local.json")
  assert di.main(["--dataset=synthetic", f"--root={root}", "--max-images=1", "--backend=local",
                  "--model=llava", f"--cache-dir={tmp_path / 'c'}", f"--out={out}"],
                 http_client=mounted(router)) == 0
  assert route.call_count == 1
  assert json.load(open(out))["images"][0]["description"] == ANSWER


@pytest.mark.parametrize("args, message", [
    (["--dataset=ade20k_150", "--backend=exact"],
     "--backend=exact needs exact per-image descriptions, which only the embedded benchmark"),
    (["--dataset=synthetic", "--backend=openai"], "--backend=openai needs --model"),
    (["--dataset=synthetic", "--root={tmp}/nowhere", "--backend=exact"],
     "synthetic_dense data.root='{tmp}/nowhere' does not exist"),
    (["--dataset=synthetic", "--root={root}", "--backend=openai", "--model=m",
      "--api-key-env=FSSJAX_TEST_UNSET_KEY_42", "--cache-dir={tmp}/c"],
     "image 0 of synthetic_dense-val-all: openai backend: the environment variable "
     "FSSJAX_TEST_UNSET_KEY_42"),
])
def test_user_errors_are_one_paragraph(root, tmp_path, capsys, monkeypatch, args, message):
  monkeypatch.delenv("FSSJAX_TEST_UNSET_KEY_42", raising=False)
  fill = dict(tmp=str(tmp_path), root=root)
  argv = [a.format(**fill) for a in args] + [f"--out={tmp_path / 'x.json'}"]
  assert di.main(argv) == 2
  err = capsys.readouterr().err
  assert message.format(**fill) in err
  assert err.startswith("describe_images: ") and err.count("\n") == 1 and "Traceback" not in err
  assert not os.path.exists(tmp_path / "x.json")
