"""The three notebooks of launch/notebooks/, executed top to bottom on CPU in their CI setting (BIRD_NB_CI=1,
offline), as a user runs them: a Jupyter kernel, cell by cell (nbclient). Each notebook's last cell prints one
JSON line of what it did; the test checks it, and that the committed files carry no outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "launch" / "notebooks"
FIXTURES = ROOT.parent / "shared" / "fixtures"


def execute(name: str, workdir: Path, monkeypatch) -> tuple[nbformat.NotebookNode, dict]:
  from nbclient import NotebookClient

  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  # The kernel inherits this environment: offline, tiny settings, the worktree's code, CPU.
  for key, value in {"BIRD_NB_CI": "1", "BIRD_NB_ONLINE": "0", "BIRD_NB_WORKDIR": str(workdir),
                     "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  streams = [o["text"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if o.get("output_type") == "stream" and o.get("name") == "stdout"]
  last = [line for text in streams for line in text.splitlines() if line.startswith('{"notebook"')]
  assert last, "the last cell printed no result line"
  return nb, json.loads(last[-1])


def images_shown(nb: nbformat.NotebookNode) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_committed_notebooks_have_no_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before committing"


@pytest.mark.slow  # trains and evaluates: 40-90 s on 2 shared CPU cores
def test_quickstart_notebook_trains_evaluates_and_draws(tmp_path, monkeypatch):
  nb, result = execute("01_quickstart.ipynb", tmp_path, monkeypatch)
  assert result["backend"] == "cpu" and result["steps"] == 8
  assert result["eval_tasks"] == ["RO", "VG"] and result["answers"] == 4
  assert (tmp_path / "quickstart" / "checkpoints" / "8").is_dir()
  assert result["metrics_lines"] == 8  # one line per step (log_every 2 only thins the log)
  assert images_shown(nb) >= 2  # the loss curve and the predictions


def test_inference_notebook_asks_grounding_referring_and_batched_questions(tmp_path, monkeypatch):
  assert (FIXTURES / "qwen_vl_tiny_official").is_dir(), "the ../shared fixtures must sit next to the repo"
  nb, result = execute("02_inference.ipynb", tmp_path, monkeypatch)
  assert result["answers"] == 4 and result["batch_row_equals_single_ask"] is True
  # the pixel box typed in the question, converted to Qwen's [0,1000) grid
  (w, h), (x1, y1, x2, y2) = result["image_size"], result["region_px"]
  want = [round(x1 / w * 1000), round(y1 / h * 1000), round(x2 / w * 1000), round(y2 / h * 1000)]
  assert all(abs(a - b) <= 1 for a, b in zip(result["referring_question_box"], want, strict=True))
  assert images_shown(nb) >= 3


def test_data_generation_notebook_writes_sets_statistics_and_draws_boxes(tmp_path, monkeypatch):
  nb, result = execute("03_data_generation.ipynb", tmp_path, monkeypatch)
  out = tmp_path / "med_grit_sam_med2d"
  assert result["sam_train"] == len(json.loads((out / "train.json").read_text())) > 0
  assert result["phantom_train"] > 0 and result["boxes_drawn"] > 0
  assert {"stats.md", "box_sizes.png", "turns.png"} <= {p.name for p in out.iterdir()}
  assert images_shown(nb) >= 5  # two SA-Med2D plots, its records, the phantom plot and records
