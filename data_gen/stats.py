"""Statistics of a Med-GRIT folder: QA counts per split x task x modality, box sizes, turns per record.

Reads only the JSON files, so it works on any Med-GRIT-style folder (ours or a released one):
`python -m data_gen stats DIR`. Writes stats.md, box_sizes.png and turns.png into the folder.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from data_gen.boxes import parse_boxes
from data_gen.sources.base import MODALITIES
from data_gen.tasks import TASKS, classify_turn, modality_of

SPLIT_FILES = {"train": ["train.json"], "test": [f"test_{t}.json" for t in TASKS]}


def _load(folder: Path, name: str) -> list[dict[str, Any]]:
  p = folder / name
  if not p.is_file():
    return []
  with open(p, encoding="utf-8") as f:
    return json.load(f)


def compute_stats(folder: str | Path) -> dict[str, Any]:
  folder = Path(folder)
  qa: dict[str, dict[str, Counter]] = {s: defaultdict(Counter) for s in SPLIT_FILES}
  turns: dict[str, Counter] = {s: Counter() for s in SPLIT_FILES}
  box_sides: dict[str, list[float]] = {s: [] for s in SPLIT_FILES}
  for split, files in SPLIT_FILES.items():
    for name in files:
      for rec in _load(folder, name):
        mod = modality_of(rec)
        conv = rec.get("conversations", [])
        turns[split][len(conv)] += 1
        fixed = rec.get("task") if rec.get("task") in TASKS else None
        for q, a in conv:
          qa[split][fixed or classify_turn(q, a)][mod] += 1
          for x1, y1, x2, y2 in parse_boxes(q) + parse_boxes(a):
            # sqrt of the box's area fraction: "side length" as a fraction of the image side
            box_sides[split].append(max(0, x2 - x1) * max(0, y2 - y1) / 1e6)
  return {
    "qa": {s: {t: dict(c) for t, c in d.items()} for s, d in qa.items()},
    "turns": {s: {str(k): v for k, v in sorted(c.items())} for s, c in turns.items()},
    "box_area_fracs": box_sides,
  }


def _table(qa: dict[str, dict[str, dict[str, int]]]) -> list[str]:
  mods = [m for m in MODALITIES if any(m in c for d in qa.values() for c in d.values())]
  extra = sorted({m for d in qa.values() for c in d.values() for m in c} - set(mods))
  mods += extra
  lines = []
  for split, d in qa.items():
    lines.append(f"\n### {split}: question-answer pairs per task x modality\n")
    lines.append("| task | " + " | ".join(mods) + " | total |")
    lines.append("|---|" + "---|" * (len(mods) + 1))
    for t in TASKS:
      row = [d.get(t, {}).get(m, 0) for m in mods]
      lines.append(f"| {t} | " + " | ".join(str(v) for v in row) + f" | {sum(row)} |")
    tot = [sum(d.get(t, {}).get(m, 0) for t in TASKS) for m in mods]
    lines.append("| all | " + " | ".join(str(v) for v in tot) + f" | {sum(tot)} |")
  return lines


def summary_table(qa: dict[str, dict[str, dict[str, int]]]) -> str:
  return "\n".join(_table(qa)).strip()


def llm_section(llm: dict[str, Any]) -> list[str]:
  """stats.md lines for an LLM-written folder: acceptance per stage, records by LLM vs template, spend."""
  s = llm.get("stats") or {}
  md = ["", f"### LLM stage ({(llm.get('config') or {}).get('model', '?')})", "",
        "| stage | round | requests | kept / asked | acceptance | failed | top rejections |",
        "|---|---:|---:|---:|---:|---:|---|"]
  for name, q in (s.get("quality") or {}).items():
    rate = "-" if q.get("acceptance") is None else f"{100 * q['acceptance']:.1f}%"
    top = ", ".join(f"{why} ({n})" for why, n in list((q.get("rejected") or {}).items())[:3]) or "-"
    md.append(f"| {name} | {q.get('round')} | {q.get('requests')} | {q.get('accepted')} / {q.get('units')} | {rate} "
              f"| {q.get('failed')} | {top} |")
  rec = s.get("records") or {}
  if rec:
    md += ["", "| file | records by the LLM | by templates |", "|---|---:|---:|"]
    md += [f"| {name} | {r['llm']} | {r['template']} |" for name, r in rec.items()]
    md += ["", 'Which ones: manifest.json["llm"]["stats"]["records"][file]["by_record"], one letter per record '
           "in file order (L: LLM, T: template)."]
  cost = s.get("cost_usd")
  md += ["", f"Requests {s.get('requests', 0)} ({s.get('cache_hits', 0)} from the cache), tokens "
         f"{s.get('prompt_tokens', 0)}+{s.get('completion_tokens', 0)} paid in the run that wrote this folder, cost "
         + ("unknown" if cost is None else f"${cost:.4f}") + "."]
  return md


def write_stats(folder: str | Path, llm: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes stats.md + box_sizes.png + turns.png into `folder`; returns the file names.

  llm: the manifest's "llm" block (read from manifest.json when not given) adds the LLM stage's section."""
  # Figures drawn straight onto the Agg canvas, not through pyplot: no global backend switch, so a notebook
  # (or any caller) that generates data in-process keeps its own matplotlib backend.
  import numpy as np
  from matplotlib.figure import Figure

  folder = Path(folder)
  st = compute_stats(folder)
  md = ["# Dataset statistics", "", "Counts are question-answer pairs (turns), classified per turn by form."]
  md += _table(st["qa"])
  md += ["", "### conversation turns per record", "", "| split | " + " | ".join(
    sorted({k for c in st["turns"].values() for k in c}, key=int)) + " |"]
  keys = sorted({k for c in st["turns"].values() for k in c}, key=int)
  md += ["|---|" + "---|" * len(keys)]
  for s, c in st["turns"].items():
    md.append(f"| {s} | " + " | ".join(str(c.get(k, 0)) for k in keys) + " |")
  if llm is None and (folder / "manifest.json").is_file():
    try:
      llm = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("llm")
    except (OSError, ValueError, AttributeError):
      llm = None
  if llm:
    md += llm_section(llm)
  (folder / "stats.md").write_text("\n".join(md) + "\n", encoding="utf-8")

  fig = Figure(figsize=(6, 3.5))
  ax = fig.subplots()
  bins = np.linspace(0, 1, 41)
  for s, v in st["box_area_fracs"].items():
    if v:
      ax.hist(np.sqrt(v), bins=bins, alpha=0.6, label=f"{s} (n={len(v)})")
  ax.set_xlabel("sqrt(box area / image area)")
  ax.set_ylabel("boxes")
  ax.set_title("Box sizes")
  ax.legend()
  fig.tight_layout()
  fig.savefig(folder / "box_sizes.png", dpi=90)

  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  width = 0.4
  for i, (s, c) in enumerate(st["turns"].items()):
    xs = np.array([int(k) for k in keys])
    ax.bar(xs + (i - 0.5) * width, [c.get(k, 0) for k in keys], width=width, label=s)
  ax.set_xlabel("turns per record")
  ax.set_ylabel("records")
  ax.set_title("Conversation turns")
  ax.legend()
  fig.tight_layout()
  fig.savefig(folder / "turns.png", dpi=90)
  return {"report": "stats.md", "plots": ["box_sizes.png", "turns.png"]}
