"""`tfds` console script: `tfds build` without TensorFlow; other sub-commands go to the stock TFDS CLI.

The stock CLI imports its `convert_format` command, which needs TensorFlow at import time (and Beam and
mlcroissant for others), so `tfds build` cannot even start in our TF-free environment. `build` here uses the
stock `build.Args` dataclass and flag parser, so every flag (`--data_dir`, `--manual_dir`, `--config`,
`--file_format`, `--overwrite`, ...) means exactly what the TFDS documentation says. Differences: our
datasets (`med_grit`) are registered first, and the default file format is array_record (what
`tfds.data_source` and Grain read).

  tfds build med_grit --data_dir D [--manual_dir M] [--config generated|official] [--file_format array_record]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

DEFAULT_FILE_FORMAT = "array_record"


def _has_flag(argv: list[str], *names: str) -> bool:
  return any(a == n or a.startswith(n + "=") for a in argv for n in names)


def _with_defaults(argv: list[str]) -> list[str]:
  """array_record unless --file_format is given; for med_grit the "generated" config unless one is chosen
  (the stock CLI would otherwise build every config, and "official" needs the released files)."""
  out = list(argv)
  if not _has_flag(out, "--file_format"):
    out.append(f"--file_format={DEFAULT_FILE_FORMAT}")
  if "med_grit" in out and not _has_flag(out, "--config", "-c", "--config_idx", "--builder_config_id"):
    out.append("--config=generated")
  return out


def _setup_logging() -> None:
  # Same idea as the stock CLI: show absl INFO lines (progress, skip counts) through Python logging.
  import logging as python_logging

  from absl import logging

  logging.use_python_logging(quiet=True)
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler().python_handler
  handler.setFormatter(python_logging.Formatter("{levelname}[{filename}]: {message}", style="{"))


def build_main(argv: Sequence[str]) -> None:
  """`tfds build ...`; argv[0] is the program name, the rest are `build`'s arguments."""
  from absl import app
  from tensorflow_datasets.scripts.cli import build, cli_utils

  import bird_jax.data.med_grit  # noqa: F401  (registers "med_grit" before the name is resolved)

  parse = cli_utils.make_flags_parser(build.Args, description="tfds build (TensorFlow-free, bird_jax)")

  def run(args: build.Args) -> None:
    _setup_logging()
    from bird_jax.data.med_grit.records import UnreadableFile

    try:
      args.execute()
    except (FileNotFoundError, UnreadableFile) as e:  # bad inputs: the message already says what to pass
      # Its first line names the flag or file and the fix; instructions that follow it go above, so the last
      # line of stderr is that one line. Exit status 2, as for the other command-line mistakes.
      head, _, details = str(e).partition("\n")
      if details.strip():
        print(details.rstrip(), file=sys.stderr)
        head = head.rstrip(" :")
        head += " above" if head.endswith("instructions") else " (details above)"
      print(f"tfds build: error: {head}", file=sys.stderr)
      sys.exit(2)

  # absl's app.run parses its own flags from sys.argv; hand it exactly the build command line.
  sys.argv = [str(argv[0]), *_with_defaults(list(argv[1:]))]
  app.run(run, flags_parser=parse)


def main() -> None:
  argv = list(sys.argv)
  if len(argv) > 1 and argv[1] == "build":
    build_main([f"{argv[0]} build", *argv[2:]])
    return
  try:
    from tensorflow_datasets.scripts.cli import main as stock
  except ModuleNotFoundError as e:
    sub = argv[1] if len(argv) > 1 else "(no command)"
    sys.exit(f"tfds {sub}: the stock TFDS CLI needs the '{e.name}' package (it is not installed here); "
             "`tfds build` works without it, or install tensorflow-cpu, apache-beam and mlcroissant")
  stock.launch_cli()


if __name__ == "__main__":
  main()
