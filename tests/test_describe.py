"""Class descriptions (fssjax.priors.describe): the synthetic sidecar, LLM generation through
the client and its cache (mocked endpoint, tests/llm_mock.py), and the shipped files."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import respx

from fssjax.data import folds, synthetic
from fssjax.data.base import DataError
from fssjax.priors import describe
from llm_mock import BASE, KEY_ENV, SECRET, completion, make_client  # tests/llm_mock.py


def test_synthetic_reads_the_sidecar_file(tmp_path, monkeypatch):
  expected = synthetic.descriptions()["categories"]
  # A benchmark directory: its descriptions.json is read as it is (here with one edit, to show
  # that the file, not the generator, is the source).
  root = tmp_path / "bench"
  root.mkdir()
  side = synthetic.descriptions()
  side["categories"][3]["description"] = "EDITED: " + side["categories"][3]["description"]
  (root / "descriptions.json").write_text(json.dumps(side))
  out = tmp_path / "syn.json"
  assert describe.main(["--dataset=synthetic", f"--root={root}", f"--out={out}"]) == 0
  doc = json.loads(out.read_text())
  assert doc["source"] == str(root / "descriptions.json") and doc["model"] is None
  assert [c["name"] for c in doc["classes"]] == describe.class_names("synthetic")
  assert [c["index"] for c in doc["classes"]] == list(range(80))
  assert doc["classes"][3]["description"].startswith("EDITED: ")
  assert doc["classes"][0]["description"] == expected[0]["description"]
  assert doc["classes"][0]["fields"]["shape"] == expected[0]["shape"]
  assert describe.load_descriptions("synthetic", str(out))[expected[3]["name"]].startswith("EDITED")
  # A parent of generated sets (like the default cache root) finds the sidecar inside.
  assert describe.describe_synthetic(str(tmp_path))["classes"][3]["description"].startswith(
      "EDITED")
  # No generated set anywhere: the generator's own text, which is what the sidecar holds.
  monkeypatch.setenv("FSSJAX_DATA", str(tmp_path / "nothing_here"))
  doc = describe.describe_synthetic()
  assert doc["source"] == "fssjax.data.synthetic.descriptions()"
  assert [c["description"] for c in doc["classes"]] == [c["description"] for c in expected]
  with pytest.raises(DataError, match="descriptions.json"):
    describe.describe_synthetic(str(tmp_path / "missing"))


def test_llm_descriptions_record_model_and_prompt_and_rerun_offline(tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  router = respx.MockRouter(assert_all_called=False)
  route = router.post(f"{BASE}/chat/completions").mock(side_effect=[
      httpx.Response(200, json=completion("  A zebra is a horse-like animal\n with black and "
                                          "white stripes. ")),
      httpx.Response(200, json=completion("A dining table is a flat top on four legs.")),
  ])
  client = make_client(router, tmp_path / "cache", max_tokens=100)
  doc = describe.describe_with_llm("coco", client, names=["zebra"])
  pascal = describe.describe_with_llm("pascal", client, names=["diningtable"])
  assert doc["classes"] == [{"index": 22, "name": "zebra", "description":
                             "A zebra is a horse-like animal with black and white stripes."}]
  assert (doc["backend"], doc["model"], doc["sampling"]["max_tokens"]) == ("openai",
                                                                           "test-model", 100)
  assert doc["prompt"]["user"] == describe.USER_PROMPT and "{name}" in doc["prompt"]["user"]
  sent = [json.loads(c.request.content)["messages"] for c in route.calls]
  assert sent[0][0]["content"] == describe.SYSTEM_PROMPT
  assert sent[0][1]["content"] == describe.USER_PROMPT.format(name="zebra")
  # PASCAL's run-together names are spelled out in the prompt; the stored name stays VOC's.
  assert "a dining table looks like" in sent[1][1]["content"]
  assert pascal["classes"][0]["name"] == "diningtable"
  assert pascal["prompt"]["name_substitutions"]["diningtable"] == "dining table"
  # The rerun is served by the cache, offline, and identical.
  rerun = make_client(router, tmp_path / "cache", max_tokens=100, offline=True)
  assert describe.describe_with_llm("coco", rerun, names=["zebra"]) == doc
  assert route.call_count == 2
  with pytest.raises(ValueError, match="not coco class names"):
    describe.describe_with_llm("coco", rerun, names=["zebra", "unicorn"])


@pytest.mark.parametrize("dataset,names", [("coco", folds.COCO_CLASS_NAMES),
                                           ("pascal", folds.VOC_CLASS_NAMES)])
def test_shipped_descriptions(dataset, names):
  """The package ships one description per class, made by this module with SmolLM2."""
  path = f"{describe.SHIPPED_DIR}/{dataset}.json"
  with open(path) as f:
    doc = json.load(f)
  assert doc["dataset"] == dataset and doc["backend"] == "local"
  assert doc["model"].startswith("SmolLM2-135M-Instruct")
  assert doc["prompt"]["user"] == describe.USER_PROMPT
  assert doc["prompt"]["system"] == describe.SYSTEM_PROMPT
  assert doc["command"].startswith(f"python -m fssjax.priors.describe --dataset={dataset} "
                                   "--backend=local")
  assert [c["name"] for c in doc["classes"]] == list(names)
  assert [c["index"] for c in doc["classes"]] == list(range(len(names)))
  texts = [c["description"] for c in doc["classes"]]
  assert all(len(t) >= 20 for t in texts)
  assert len(set(texts)) == len(texts)  # not one canned answer for every class
  assert describe.load_descriptions(dataset) == dict(zip(names, texts))


def test_clean_description():
  loop = ("A giraffe has a long neck and a spotted coat. Its main parts include a head with a "
          "large head with a large head with a large head")
  assert describe.clean_description(loop) == "A giraffe has a long neck and a spotted coat."
  assert describe.clean_description(
      '  "A laptop is flat.\n It is grey. It is grey. It has a') == "A laptop is flat. It is grey."
  assert describe.clean_description("one two three four one two three four") == (
      "one two three four")


@pytest.mark.parametrize("argv,message", [
    (["--dataset=synthetic", "--root={tmp}/absent"], "{tmp}/absent: no descriptions.json"),
    (["--dataset=coco", "--classes=personn", "--offline"],
     "classes ['personn'] are not coco class names"),
])
def test_user_errors_are_one_paragraph(tmp_path, capsys, argv, message):
  argv = [a.format(tmp=tmp_path) for a in argv] + [f"--out={tmp_path}/out.json"]
  assert describe.main(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith("python -m fssjax.priors.describe: " + message.format(tmp=tmp_path))
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "out.json")
