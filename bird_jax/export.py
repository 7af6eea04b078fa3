"""Training checkpoint -> Hugging Face Qwen-VL directory (what `--config.init_from` and transformers read).

  python -m bird_jax.export --config=cpu_demo --config.workdir=runs/cpu_demo --out=runs/cpu_demo/hf
  python -m bird_jax.train --config=cpu_demo --config.workdir=runs/next \\
      --config.init_from=runs/cpu_demo/hf --config.data.tokenizer=runs/cpu_demo/hf/tokenizer.json

Writes safetensors shards + index + config.json (`bird_jax.model.convert.export_hf`) and the tokenizer the run
trained with: the demo BPE's files, or, for a run that started from a Qwen-VL checkpoint (`init_from`), that
directory's non-weight files (qwen.tiktoken, remote code). Use it for staged training (one run's result as the
next run's start) and to hand a model to the original implementation.

A LoRA run (`--config.lora.rank=R`) exports its adapters merged into the base weights (W + alpha/r · A B), or
with `--peft` the adapters alone (plus the trained resampler as `modules_to_save`) in the layout `peft` loads
onto the original Qwen-VL-Chat: `adapter_config.json` + `adapter_model.safetensors`:

  python -m bird_jax.export --config=tpu_v5p --config.lora.rank=64 --config.init_from=/ckpt/Qwen-VL-Chat \
      --config.workdir=runs/lora --out=runs/lora/adapter --peft
  # PyTorch: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, ...), "runs/lora/adapter")
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from bird_jax.config_util import exit_on_config_error, parse_config_flags

DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16"}


def export_run(config, out: str | Path, *, checkpoint: str | Path | None = None, dtype: str = "keep",
               peft: bool = False) -> list[Path]:
  """Exports the newest (or the given) checkpoint of config.workdir's run to `out`; returns the weight files.
  peft: a LoRA run's adapters alone, in the PEFT layout, instead of the merged weights."""
  from bird_jax.model.convert import export_hf
  from bird_jax.model.lora_export import write_peft
  from bird_jax.run_state import load_checkpoint

  out = Path(out)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} is not empty; export into a new folder")
  checkpoint = checkpoint or Path(config.workdir) / "checkpoints"
  model, params, tokenizer, *_ = load_checkpoint(config, checkpoint, merge_lora=not peft)
  if peft:
    return write_peft(params, model.config, out, base_model=config.init_from or None,
                      modules_to_save=bool(config.train.train_resampler))
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
  p.add_argument("--peft", action="store_true",
                 help="a LoRA run: write the adapters alone (adapter_config.json + adapter_model.safetensors)")
  args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
  config, _, unknown = parse_config_flags(rest)
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  try:
    files = export_run(config, args.out, checkpoint=args.checkpoint, dtype=args.dtype, peft=args.peft)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.peft:
    print(f"wrote the LoRA adapters (PEFT layout: adapter_config.json, adapter_model.safetensors) to {args.out}")
  else:
    print(f"wrote {len(files)} weight file(s) and config.json to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
