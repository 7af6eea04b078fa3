"""Command line: `python -m data_gen --source phantom --out DIR [...]` and `python -m data_gen stats DIR`.

Examples:
  python -m data_gen --source phantom --out data/phantom                 # the demo dataset (~1,950 images)
  python -m data_gen --source phantom --out /tmp/p --num-cases 4 --image-size 64
  python -m data_gen --source msd --root Task03_Liver --out /tmp/liver --axis axial --ct-window abdomen
  python -m data_gen --source phantom --out /tmp/pl --llm-base-url https://api.openai.com/v1 --llm-model gpt-4o-mini
                                                 # LLM-written conversations (key in $OPENAI_API_KEY), see data_gen/llm
  python -m data_gen stats data/phantom                                  # (re)write stats.md + plots
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_gen.llm.cli import add_llm_args, llm_config_from_args
from data_gen.llm.cli import summary as llm_summary
from data_gen.llm.client import LLMBudgetError, LLMError, LLMQualityError
from data_gen.pipeline import generate_dataset
from data_gen.stats import summary_table, write_stats
from data_gen.tasks import parse_task_weights
from data_gen.writer import read_manifest


def _build_source(args: argparse.Namespace):
  if args.source == "phantom":
    from data_gen.sources.phantom import DEFAULT_MODALITIES, PhantomSource, parse_objects, parse_sizes

    mods = tuple(m.strip() for m in args.modalities.split(",")) if args.modalities else DEFAULT_MODALITIES
    lo, hi = parse_objects(args.objects)
    small, big = parse_sizes(args.size)
    return PhantomSource(num_cases=args.num_cases, image_size=args.image_size, seed=args.seed,
                         modalities=mods, slices_per_case=args.slices_per_case, min_objects=lo, max_objects=hi,
                         min_frac=small, max_frac=big,
                         balance_modalities=args.balance_modalities, layout=args.layout,
                         texture_amplitude=args.texture, palette=args.palette)
  if args.source in ("sam_med2d", "png_folder"):
    if not args.root:
      raise ValueError(f"--source {args.source} needs --root DIR (the dataset folder to read)")
    try:
      if args.source == "sam_med2d":
        from data_gen.sources.sam_med2d import SamMed2DSource as Src
      else:
        from data_gen.sources.png_folder import PngFolderSource as Src
    except ImportError as e:
      raise ValueError(f"--source {args.source} is not available in this version ({e})") from e
    kw = {}
    if args.modalities:
      kw["modality"] = args.modalities.strip()
    return Src(args.root, **kw)
  if args.source in ("msd", "nnunet"):
    if not args.root:
      raise ValueError(f"--source {args.source} needs --root DIR (the folder holding dataset.json)")
    from data_gen.sources.nifti import MsdSource, NnUNetSource

    Src = MsdSource if args.source == "msd" else NnUNetSource
    return Src(args.root, axis=args.axis, ct_window=args.ct_window, max_slices_per_case=args.max_slices_per_case,
               seed=args.seed, modality=args.modalities.strip() if args.modalities else None)
  raise ValueError(f"unknown --source {args.source!r}; use phantom, sam_med2d, png_folder, msd or nnunet")


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["stats"]:
    p = argparse.ArgumentParser(prog="python -m data_gen stats", description="write stats.md and plots")
    p.add_argument("folder", type=Path)
    a = p.parse_args(argv[1:])
    if not (a.folder / "train.json").is_file():
      print(f"error: {a.folder} has no train.json; point `stats` at a dataset folder", file=sys.stderr)
      return 2
    write_stats(a.folder)
    print((a.folder / "stats.md").read_text())
    return 0

  p = argparse.ArgumentParser(prog="python -m data_gen",
                              description="Generate a Med-GRIT-style dataset folder.")
  p.add_argument("--source", default="phantom", help="phantom | sam_med2d | png_folder | msd | nnunet")
  p.add_argument("--out", required=True, type=Path, help="output dataset folder (created atomically)")
  p.add_argument("--root", default=None, help="input folder for file-based sources")
  p.add_argument("--num-cases", type=int, default=150, help="phantom: cases per modality")
  p.add_argument("--image-size", type=int, default=128, help="phantom: image side in pixels")
  p.add_argument("--slices-per-case", type=int, default=None, help="phantom: slices per ct/mr case (6)")
  p.add_argument("--layout", default="random",
                 help="phantom: random (a structure anywhere in the body) | anatomical (each class around its home)")
  p.add_argument("--texture", type=float, default=0.0,
                 help="phantom: grey-level amplitude of each class's stripe/checker texture (0: flat structures)")
  p.add_argument("--palette", default="grey",
                 help="phantom: grey (each class its grey level) | hue (each class its own colour: recognition "
                      "made easy, as in the cpu_demo set; a diagnostic to test grounding alone)")
  p.add_argument("--objects", default="2,4", help="phantom: MIN,MAX labelled structures per image (2,4)")
  p.add_argument("--size", default="0.12,0.45",
                 help="phantom: MIN,MAX side of a structure's box as a fraction of the image side (0.12,0.45)")
  p.add_argument("--balance-modalities", action="store_true",
                 help="phantom: more cases for 1-slice modalities (x-ray) so each gives about as many images")
  p.add_argument("--modalities", default=None,
                 help="phantom: comma list (default ct,mr,x); sam_med2d demo / png_folder: the one modality; "
                      "msd/nnunet: overrides the modality read from dataset.json")
  p.add_argument("--axis", default="axial", help="msd/nnunet: axial | coronal | sagittal (comma list allowed)")
  p.add_argument("--ct-window", default="auto",
                 help="msd/nnunet CT: abdomen | lung | bone | brain | liver | mediastinum | soft_tissue | head_neck "
                      "| auto (from the dataset name) | LEVEL,WIDTH in HU (write --ct-window=-600,1500)")
  p.add_argument("--max-slices-per-case", type=int, default=10, help="msd/nnunet: slice cap per volume (0: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of cases per modality for test")
  p.add_argument("--max-turns", type=int, default=3, help="train conversations have 1..N turns")
  p.add_argument("--records-per-image", type=int, default=1, help="train conversations per image")
  p.add_argument("--task-weights", default="",
                 help="how often each task is drawn for a train turn, e.g. VG=0.45,RO=0.35,GC=0.1,MII=0.1")
  p.add_argument("--limit", type=int, default=None, help="read at most N samples from the source")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
  add_llm_args(p)
  a = p.parse_args(argv)

  try:
    source = _build_source(a)
    llm = llm_config_from_args(a)
    task_weights = parse_task_weights(a.task_weights) if a.task_weights else None
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  t0 = time.time()
  # A complete folder with these parameters is returned as it is: nothing generated, nothing sent (told below).
  before = read_manifest(a.out) if a.out.is_dir() and not a.overwrite and not a.llm_dry_run else None
  try:
    m = generate_dataset(source, a.out, seed=a.seed, test_fraction=a.test_fraction, max_turns=a.max_turns,
                         workers=a.workers, limit=a.limit, overwrite=a.overwrite,
                         records_per_image=a.records_per_image, progress=True, llm=llm,
                         task_weights=task_weights, llm_dry_run=a.llm_dry_run)
  except LLMBudgetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except LLMQualityError as e:
    print(f"error: {e}", file=sys.stderr)
    return 4
  except (FileExistsError, ValueError, LLMError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  dt = time.time() - t0
  if "llm_estimate" in m:
    from data_gen.llm.estimate import format_estimate

    print(format_estimate(m["llm_estimate"]))
    return 0
  if before is not None and m == before:
    print(f"\n{a.out}: already complete with these parameters (made {m.get('created', '?')}); nothing generated"
          + (", no LLM request sent" if "llm" in m else "") + ". Pass --overwrite to build it again.")
    if "llm" in m:
      s = m["llm"]["stats"]
      cost = "unknown" if s.get("cost_usd") is None else f"${s['cost_usd']:.4f}"
      print(f"  llm (the run that made it): {s['requests']} requests, {s['http_calls']} HTTP calls, cost {cost}")
    return 0
  c = m["counts"]
  print(f"\n{a.out}: source={m['source']} seed={m['seed']} version={m['version']} ({dt:.1f}s)")
  for s in ("train", "test"):
    imgs = c["images"][s]
    print(f"  {s:5s} cases={sum(c['cases'][s].values()):5d} images={sum(imgs.values()):6d}  "
          + " ".join(f"{k}:{v}" for k, v in imgs.items()))
  print(summary_table(c["qa"]))
  if "llm" in m:
    print(llm_summary(m["llm"]))
  skipped = m["skipped"]["counts"]
  if skipped:
    print("\nskipped:")
    for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]):
      print(f"  {n:8d}  {reason}")
      for e in m["skipped"]["examples"].get(reason, [])[:2]:
        print(f"            e.g. {e}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
