"""Training checkpoint -> Hugging Face Qwen-VL directory (what `--config.init_from` and transformers read).

  python -m bird_jax.export --config=cpu_demo --config.workdir=runs/cpu_demo --out=runs/cpu_demo/hf
  python -m bird_jax.train --config=cpu_demo --config.workdir=runs/next \\
      --config.init_from=runs/cpu_demo/hf --config.data.tokenizer=runs/cpu_demo/hf/tokenizer.json

Writes safetensors shards + index + config.json (`bird_jax.model.convert.export_hf`) and the tokenizer the run
trained with: the demo BPE's files, or, for a run that started from a Qwen-VL checkpoint (`init_from`), that
directory's non-weight files (qwen.tiktoken, remote code). Use it for staged training (one run's result as the
next run's start) and to hand a model to the original implementation.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from bird_jax.config_util import exit_on_config_error, parse_config_flags

DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16"}


def export_run(config, out: str | Path, *, checkpoint: str | Path | None = None, dtype: str = "keep") -> list[Path]:
  """Exports the newest (or the given) checkpoint of config.workdir's run to `out`; returns the weight files."""
  from bird_jax.model.convert import export_hf
  from bird_jax.run_state import load_checkpoint

  out = Path(out)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} is not empty; export into a new folder")
  checkpoint = checkpoint or Path(config.workdir) / "checkpoints"
  model, params, tokenizer, *_ = load_checkpoint(config, checkpoint)
  files = export_hf(params, model.config, out, dtype=DTYPES[dtype], extra_files_from=config.init_from or None)
  if not config.init_from:
    source = Path(tokenizer.source_path)
    folder = source if source.is_dir() else source.parent
    for f in {folder / "tokenizer.json", folder / "bird_tokenizer.json", source}:
      if f.is_file() and not (out / f.name).exists():
        shutil.copy2(f, out / f.name)
  return files


@exit_on_config_error
def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m bird_jax.export", description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="new folder for the Hugging Face checkpoint")
  p.add_argument("--checkpoint", default=None, help="<workdir>/checkpoints (newest step, the default) or a step in it")
  p.add_argument("--dtype", default="keep", choices=sorted(DTYPES), help="tensor dtype in the files")
  args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
  config, _, unknown = parse_config_flags(rest)
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  try:
    files = export_run(config, args.out, checkpoint=args.checkpoint, dtype=args.dtype)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {len(files)} weight file(s) and config.json to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
