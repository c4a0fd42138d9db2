"""Helpers for the ml_collections config files in `configs/`."""

from __future__ import annotations

import importlib.util
import pathlib
import types


def import_sibling(config_file: str, name: str) -> types.ModuleType:
  """Imports `name`.py from the folder of `config_file` (config files are loaded by path, not as a package)."""
  path = pathlib.Path(config_file).with_name(f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'star_jax_configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg: str | None, **defaults):
  """Parses a config argument like 'tiny' or 'tiny,batch_size=8' into a dict over `defaults`.

  A bare word sets a boolean default to True; `key=value` casts to the default's type.
  """
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in out:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(out)}')
    if not value:
      out[key] = True
    elif isinstance(out[key], bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      out[key] = type(out[key])(value) if out[key] is not None else value
  return out
