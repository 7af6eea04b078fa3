"""How fast does the vision tower learn *what* a structure is? A direct-supervision naming probe.

  python -m bird_jax.benchmarks.vision_probe --config=cpu_demo --config.workdir=RUN [--steps=600] [--method=tower]

RUN holds a one-structure-per-image med_grit build (`RUN/tfds`), e.g. a `cpu_demo` run (coloured structures),
or one with `--config.data.phantom.palette=grey` for grey ones (docs/demo_findings.md: `--config=cpu_crowded` with
`--config.data.phantom.objects=1,1 --config.data.phantom.task_weights=VG=0.5,RO=0.5 --config.data.phantom.max_turns=1
--config.data.seq_len=96 --config.data.curriculum.steps=0 --config.data.phantom.balance_modalities=True`). The
probe trains the config's vision tower from its random init (`--method=tower`: ViT + resampler + proj; `trunk`:
the ViT alone), its tokens mean-pooled, with one zero-initialised linear layer on top, to name the lone
structure of each training image (the class in its RO answer or VG `<ref>`), AdamW with warmup-cosine; it prints
held-out accuracy as it goes. Baseline measured in the same run: a ridge classifier on each image's grey-level
histogram (the pixels, no learning of features). Records without a VG/RO turn, or naming more than one
structure, are skipped (counted).

Why: the demo must both recognise structures and bind a name to one of them; this isolates the first half
(docs/demo_findings.md's "local resampler init hides *what*" table was measured with it).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

LEARNING_RATE = 1e-3
BATCH_SIZE = 24
WARMUP_STEPS = 30


def lone_structure(turns: list[tuple[str, str]]) -> str | None:
  """The class a one-structure record names (RO answers, VG `<ref>`s; other turns are ignored), or None when
  it names several structures or none."""
  from bird_jax.metrics import parse_boxes
  from data_gen.tasks import classify_turn

  names, boxes = set(), set()
  for user, answer in turns:
    task = classify_turn(user, answer)
    if task == "VG":
      names.update(r.strip().lower() for r in re.findall(r"<ref>(.*?)</ref>", answer))
    elif task == "RO":
      names.add(answer.strip().lower())
    else:
      continue
    boxes.update(b for b in parse_boxes(user + answer, fallback=False) if b)
  return names.pop() if len(names) == 1 and len(boxes) == 1 else None


def load_lone_structures(data_source: Any, image_size: int) -> tuple[np.ndarray, list[str], int]:
  """Preprocessed images [N, S, S, 3], their lone structure's class, and how many records were skipped."""
  from bird_jax.data.image import preprocess_image
  from bird_jax.data.pipeline import as_turn_pairs, decode_image

  images, names, skipped = [], [], 0
  for i in range(len(data_source)):
    record = data_source[i]
    name = lone_structure(as_turn_pairs(record["conversations"]))
    if name is None:
      skipped += 1
      continue
    images.append(preprocess_image(decode_image(record["image"]), image_size))
    names.append(name)
  if not images:
    raise ValueError("no one-structure records in the split: build the set with data.phantom.objects=1,1")
  return np.stack(images), names, skipped


def histogram_baseline(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                       bins: int = 32, lam: float = 1.0) -> float:
  """Held-out accuracy of a one-vs-all ridge classifier on each image's normalised grey-level histogram."""
  def features(x: np.ndarray) -> np.ndarray:
    grey = x.mean(-1).reshape(len(x), -1)
    lo, hi = float(train_x.min()), float(train_x.max())
    h = np.stack([np.histogram(g, bins=bins, range=(lo, hi))[0] for g in grey]).astype(np.float64)
    return np.concatenate([h / grey.shape[1], np.ones((len(x), 1))], axis=1)

  a, b = features(train_x), features(test_x)
  targets = np.eye(int(max(train_y.max(), test_y.max())) + 1)[train_y]
  w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ targets)
  return float(((b @ w).argmax(-1) == test_y).mean())


def train_probe(cfg: Any, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                steps: int, method: str = "tower", lr: float = LEARNING_RATE, batch_size: int = BATCH_SIZE,
                seed: int = 0, every: int = 100, log=print) -> list[dict[str, float]]:
  """Trains the vision tower of `cfg` (from its random init) + a linear head; held-out accuracy every `every`
  steps and at the end."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from bird_jax.model.qwen_vl import init_params
  from bird_jax.model.vit import VisionTower

  if method not in ("tower", "trunk"):
    raise ValueError(f"vision_probe method {method!r}: use tower (ViT + resampler) or trunk (ViT alone)")
  classes = int(max(train_y.max(), test_y.max())) + 1
  tower = VisionTower(cfg)
  width = cfg.vision_width if method == "trunk" else cfg.hidden_size
  params = {"vision": nn.unbox(init_params(cfg, jax.random.key(seed)))["visual"],
            "head": jnp.zeros((width, classes), jnp.float32)}

  def logits(p, x):
    tokens = tower.apply({"params": p["vision"]}, x, method="trunk" if method == "trunk" else None)
    return tokens.mean(1) @ p["head"]

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(WARMUP_STEPS, steps), steps),
                   b2=0.98, weight_decay=0.01)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  predict = jax.jit(lambda p, x: logits(p, x).argmax(-1))

  def accuracy(p) -> float:
    hits = sum(int((np.asarray(predict(p, jnp.asarray(test_x[i:i + 256]))) == test_y[i:i + 256]).sum())
               for i in range(0, len(test_x), 256))
    return hits / len(test_x)

  rng = np.random.default_rng(seed)
  history, start = [], time.time()
  for s in range(1, steps + 1):
    idx = rng.integers(0, len(train_x), batch_size)
    params, opt, loss = step(params, opt, jnp.asarray(train_x[idx]), jnp.asarray(train_y[idx]))
    if s % every == 0 or s == steps:
      history.append({"step": s, "loss": float(loss), "held_out_accuracy": accuracy(params)})
      log(f"step {s:5d}  loss {float(loss):.3f}  held-out accuracy {history[-1]['held_out_accuracy']:.3f}  "
          f"{time.time() - start:.0f} s")
  return history


def main(argv: list[str] | None = None) -> dict[str, Any]:
  from bird_jax.config_util import parse_config_flags
  from bird_jax.data.pipeline import load_split
  from bird_jax.model import QwenVLConfig

  config, _, rest = parse_config_flags(sys.argv[1:] if argv is None else argv)
  opts = dict(a[2:].split("=", 1) for a in rest if a.startswith("--") and "=" in a)
  unknown = set(opts) - {"steps", "method"}
  if unknown or len(opts) != len(rest):
    raise SystemExit(f"error: unknown arguments {rest}; use --steps=N and --method=tower|trunk")
  cfg = QwenVLConfig(**config.model.to_dict())  # the vision tower does not depend on the vocabulary
  manifest = Path(config.workdir) / "data" / "med_grit_phantom" / "manifest.json"
  if manifest.exists():  # a one-turn record of a crowded image names one structure too: refuse those sets
    source = json.loads(manifest.read_text())["params"].get("source_params", {})
    if source.get("max_objects", 1) > 1:
      raise SystemExit(f"error: {manifest} is a set with up to {source['max_objects']} structures per image; "
                       "the probe needs one (--config.data.phantom.objects=1,1)")
  tfds_dir = f"{config.workdir}/tfds"
  train_x, train_names, skipped_train = load_lone_structures(load_split(tfds_dir, "train"), cfg.image_size)
  test_x, test_names, skipped_test = load_lone_structures(load_split(tfds_dir, "test"), cfg.image_size)
  classes = sorted(set(train_names))
  unseen = sorted(set(test_names) - set(classes))
  if unseen:
    raise SystemExit(f"error: {len(unseen)} test classes never occur in training (e.g. {unseen[0]!r}); "
                     "rebuild the set with more cases")
  train_y = np.array([classes.index(n) for n in train_names])
  test_y = np.array([classes.index(n) for n in test_names])
  print(f"{len(train_x)} training / {len(test_x)} held-out images, {len(classes)} classes "
        f"(chance {1 / len(classes):.3f}); skipped {skipped_train + skipped_test} records "
        "(several structures, or no VG/RO turn)")
  baseline = histogram_baseline(train_x, train_y, test_x, test_y)
  print(f"baseline: grey-level histogram ridge classifier, held-out accuracy {baseline:.3f}")
  history = train_probe(cfg, train_x, train_y, test_x, test_y, steps=int(opts.get("steps", 600)),
                        method=opts.get("method", "tower"))
  final = history[-1]["held_out_accuracy"]
  print(f"vision probe ({opts.get('method', 'tower')}): held-out accuracy {final:.3f} = "
        f"{final / max(baseline, 1e-9):.2f}x the histogram baseline")
  return {"baseline": baseline, "history": history, "classes": classes}


if __name__ == "__main__":
  main()
