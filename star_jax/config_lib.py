"""Finding and reading the experiment configs (`configs/*.py`, ml_collections files with `get_config`).

Configs are files, loaded by path (`--config configs/wflw.py[:arg]`). They also ship inside the
package as `star_jax_configs`, so that an installed star_jax (not only a checkout) finds
`configs/<name>.py`: a config path that does not exist is looked up there by its file name.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import types

CONFIGS_PACKAGE = 'star_jax_configs'


def installed_configs_dir() -> pathlib.Path | None:
  """The folder of the configs installed with star_jax (the checkout's configs/ in an editable
  install), or None."""
  spec = importlib.util.find_spec(CONFIGS_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def resolve_config_path(spec: str) -> str:
  """'configs/wflw.py[:arg]' -> an existing file path (with the same ':arg'): the path itself when it
  exists, else the installed config of that file name. Unknown names are returned unchanged (the
  config flag then reports the missing file)."""
  path, colon, arg = str(spec).partition(':')
  if os.path.exists(path):
    return spec
  installed = installed_configs_dir()
  if installed is not None and (installed / pathlib.Path(path).name).is_file():
    return str(installed / pathlib.Path(path).name) + colon + arg
  return spec


def resolve_config_argv(argv: list[str]) -> list[str]:
  """`argv` with the value of its --config flag (either spelling) passed through resolve_config_path."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith('--config='):
      out[i] = '--config=' + resolve_config_path(arg[len('--config='):])
    elif arg == '--config' and i + 1 < len(out):
      out[i + 1] = resolve_config_path(out[i + 1])
  return out


def load_config(spec: str):
  """The ConfigDict of 'path.py[:arg]' (get_config(arg)), as the --config flag would load it."""
  path, _, arg = resolve_config_path(spec).partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} does not exist')
  module = _load_module(pathlib.Path(path))
  return module.get_config(arg) if arg else module.get_config()


def _load_module(path: pathlib.Path) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location(f'star_jax_configs_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def import_sibling(config_file: str, name: str) -> types.ModuleType:
  """Imports `name`.py from the folder of `config_file` (config files are loaded by path, not as a package)."""
  return _load_module(pathlib.Path(config_file).with_name(f'{name}.py'))


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
