"""The demo's harder set: 2-4 grey structures per image and all four tasks (the cpu_demo default until it
was shown not to learn in CPU minutes; docs/demo_findings.md).

  python -m bird_jax.train --config=cpu_crowded

Five-turn conversations about 2-4 structures of one grey level each, a first stage of 600 steps on one
structure per image (VG only, short rows) so positions can be read out before the model must pick the named
structure, then 2,000 steps on the main set; 16 resampler queries. Reaches VG 0.036 / ROC 0.214 in 15 minutes
(class prior 0.003 / 0.234): picking the named structure of several is the part this budget does not teach.
"""

from __future__ import annotations

from configs import cpu_demo


def get_config():
  c = cpu_demo.get_config()
  c.workdir = "runs/cpu_crowded"
  c.data.phantom.objects = ""  # data_gen's default: 2-4
  c.data.phantom.palette = "grey"
  c.data.phantom.size = ""  # data_gen's default: 0.12-0.45 of the side
  # Grounding-heavy training mix (the test files still hold every task): VG/RO turns carry the spatial signal.
  c.data.phantom.task_weights = "VG=0.4,RO=0.4,GC=0.1,MII=0.1"
  c.data.phantom.max_turns = 5
  c.data.phantom.balance_modalities = False
  c.data.seq_len = 256
  # Curriculum: the first 600 steps ground one structure per image (VG only, short rows, ~2 of the 15
  # minutes), so positions can be read out before the model must pick the named one of 2-4 structures.
  c.data.curriculum.steps = 600
  c.data.curriculum.seq_len = 96
  c.model.n_queries = 16
  c.train.steps = 2000
  c.train.checkpoint_every = 300
  return c
