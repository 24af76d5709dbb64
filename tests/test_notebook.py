"""notebooks/fewshot_demo.ipynb runs top to bottom (nbclient, CPU, a fresh kernel).

Shortened through its knobs (24 training steps; sweep budgets of 6 and 12 steps) so that it fits
CI; the committed copy in notebooks/ was executed with the defaults (400; 150 and 300). Checks that every cell ran, that the
pictures were drawn, that 1- and 5-shot predictions were made, and that the 4-point sweep's
table has its four runs.
"""

from __future__ import annotations

import os

import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "fewshot_demo.ipynb")


def _text(output) -> str:
  if output.get("output_type") == "stream":
    return output.get("text", "")
  data = output.get("data", {})
  return data.get("text/markdown", "") + data.get("text/plain", "")


def test_notebook_executes(tmp_path, monkeypatch):
  env = {"FSSJAX_NOTEBOOK_STEPS": "24", "FSSJAX_NOTEBOOK_SWEEP_STEPS": "6",
         "FSSJAX_NOTEBOOK_DIR": str(tmp_path / "work"), "JAX_PLATFORMS": "cpu",
         "FSSJAX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": REPO}
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("FSSJAX_DEMO_WORKDIR", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.get("execution_count") for c in code)
  outputs = [o for c in code for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the 1-/5-shot panel and the sweep plot
  text = "".join(_text(o) for o in outputs)
  assert "1-shot: IoU of the query" in text and "5-shot: IoU of the query" in text
  assert "mIoU" in text and "all-foreground prediction" in text
  # The sweep table: four runs (2 training budgets x 2 seeds), averaged over the seeds.
  for name in ("num_steps=6_seed=0", "num_steps=6_seed=1", "num_steps=12_seed=0",
               "num_steps=12_seed=1"):
    assert f"| {name} |" in text, text[-3000:]
  sweep_dir = tmp_path / "work" / "sweep_6steps"
  assert (sweep_dir / "results.csv").read_text().count("\n") == 5
