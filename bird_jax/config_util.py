"""`--config=NAME` and `--config.a.b=value` for every bird-jax entry point.

NAME resolves to the module `configs/NAME.py` of the installed `configs` package (so it works from any
working directory), or to a path ending in `.py`. Overrides are typed by the field they replace and
unknown names fail with one line that lists what exists — the two mistakes users make most.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections


class ConfigError(ValueError):
  """A user mistake in --config flags; the message is one line naming the fix."""


def available_configs() -> list[str]:
  import configs

  return sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if not m.name.startswith("_"))


def _load_module(name: str):
  if name.endswith(".py"):
    path = Path(name)
    if not path.is_file():
      raise ConfigError(f"config file {name} does not exist")
    spec = importlib.util.spec_from_file_location(f"_bird_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  if name not in available_configs():
    raise ConfigError(f"unknown config '{name}'; available: {', '.join(available_configs())}")
  return importlib.import_module(f"configs.{name}")


def get_config(name: str) -> ml_collections.ConfigDict:
  module = _load_module(name)
  config = module.get_config()
  config.lock()
  return config


def _parse_value(text: str, current):
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"expected true/false, got '{text}'")
  if isinstance(current, int) and not isinstance(current, bool):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str, config_name: str) -> None:
  parts = dotted.split(".")
  parent = config
  for i, part in enumerate(parts):
    if not isinstance(parent, ml_collections.ConfigDict) or part not in parent:
      where = ".".join(parts[:i]) or "<top>"
      fields = ", ".join(sorted(parent.keys())) if isinstance(parent, ml_collections.ConfigDict) else "none"
      raise ConfigError(f"unknown config field '{dotted}' in {config_name}; fields under {where}: {fields}")
    if i < len(parts) - 1:
      parent = parent[part]
  leaf = parts[-1]
  try:
    value = _parse_value(text, parent[leaf])
  except ValueError as e:
    raise ConfigError(f"bad value for --config.{dotted}: {e}") from None
  with parent.ignore_type():
    parent[leaf] = value


def parse_config_flags(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str, list[str]]:
  """Splits argv into (config, config name, remaining args). `--config` is required."""
  name = None
  overrides: list[tuple[str, str]] = []
  rest: list[str] = []
  for arg in argv:
    if arg.startswith("--config="):
      name = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      key, sep, value = arg[len("--config."):].partition("=")
      if not sep:
        raise ConfigError(f"override {arg} needs a value: --config.{key}=VALUE")
      overrides.append((key, value))
    else:
      rest.append(arg)
  if name is None:
    raise ConfigError(f"--config=NAME is required; available: {', '.join(available_configs())}")
  config = get_config(name)
  for key, value in overrides:
    apply_override(config, key, value, name)
  return config, name, rest


def exit_on_config_error(fn):
  """Decorator for CLI mains: a ConfigError becomes a one-line message and exit status 2."""

  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(2) from None

  return wrapper
