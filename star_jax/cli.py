"""The one command-line style of every star_jax entry point.

Each command is a module with `main(argv=None) -> int` (argv includes the program name, as sys.argv
does; `main` wraps its work in `cli.guarded`) and, at the bottom, `if __name__ == '__main__':
cli.run(main)`. Flags are absl flags defined on the
command's own `FlagValues` (never absl's global FLAGS), so importing a command defines nothing and
`main` can run more than once in one process (the tests call it directly). Experiment configs are
ml_collections files given as `--config path.py[:arg]` and overridden with `--config.key=value`.
Flag names use underscores; `--show-ambiguity` and `--no-refine` style spellings are accepted too.

A problem the user can fix (a missing file, a bad value) is raised as `UserError` and printed as one
`error: ...` line with exit status 1; a malformed command line prints the usage with status 2.
"""

from __future__ import annotations

import logging as std_logging
import pathlib
import sys
from typing import Callable, Sequence

from absl import flags
from absl import logging

from star_jax import config_lib
from star_jax import cpu_tuning


class UserError(Exception):
  """A problem the user can fix; printed as 'error: <message>' (exit status 1), without a traceback."""


def _normalise(argv: Sequence[str]) -> list[str]:
  """'--foo-bar=x' -> '--foo_bar=x' and '--no-foo' -> '--nofoo' (absl spells flags with underscores);
  values and everything after a bare '--' are left alone."""
  out, passthrough = [], False
  for arg in argv:
    if passthrough or not arg.startswith('--') or arg == '--':
      passthrough = passthrough or arg == '--'
      out.append(arg)
      continue
    name, eq, value = arg[2:].partition('=')
    if name.startswith('no-'):
      name = 'no' + name[3:]
    out.append('--' + name.replace('-', '_') + eq + value)
  return out


class Command:
  """The flags of one command: define them on `.fv`, then `parse(argv)`.

  Args:
    doc: the command's help text (its module docstring), printed by --help and on usage errors.
    config: None for a command without an experiment config; else 'required' or 'optional', or a
      default config path, for the `--config file.py[:arg]` flag with `--config.key=value` overrides.
  """

  def __init__(self, doc: str, argv: Sequence[str], *, config: str | None = None):
    self.doc = doc
    self.argv = _normalise(argv)
    self.fv = flags.FlagValues()
    self._config = None
    self._config_required = config == 'required'
    if config is not None:
      # JAX-free ONNX path: predict --model runs without ml_collections installed, and has no config.
      from ml_collections import config_flags  # lazy: JAX-free ONNX path
      self.argv = config_lib.resolve_config_argv(self.argv)
      default = None if config in ('required', 'optional') else config_lib.resolve_config_path(config)
      self._config = config_flags.DEFINE_config_file(
          'config', default, 'experiment config file (configs/<name>.py[:arg]); override fields with '
          '--config.key=value', flag_values=self.fv, sys_argv=list(self.argv), lock_config=False)

  def parse(self) -> list[str]:
    """Parses the command line; returns the positional arguments (program name excluded).

    --help prints the docstring and the flags and exits 0; a malformed command line raises
    flags.Error (cli.run prints it with the usage, exit status 2).
    """
    if any(a in ('-h', '--help', '--helpfull') for a in self.argv[1:]):
      print(self.doc)
      print(self.fv.get_help())
      raise SystemExit(0)
    rest = self.fv(list(self.argv))[1:]
    if self._config_required and self._config.value is None:
      raise flags.Error('--config is required (e.g. --config configs/wflw.py)')
    return rest

  @property
  def config(self):
    """The experiment config (after `parse`), or None."""
    return None if self._config is None else self._config.value

  def require(self, *names: str) -> None:
    """Raises flags.Error for each named flag left unset."""
    missing = [f'--{n}' for n in names if self.fv[n].value is None]
    if missing:
      raise flags.Error(f'{", ".join(missing)} {"is" if len(missing) == 1 else "are"} required')


def setup_logging(level: str = 'info') -> None:
  """Log lines of star_jax at `level` through absl's handler; other libraries' (Orbax logs every file
  it writes) only from WARNING up. For commands, in `main` (changes the process's logging)."""
  package = str(pathlib.Path(__file__).resolve().parent)
  logging.use_absl_handler()
  logging.set_verbosity(level)
  handler = logging.get_absl_handler()
  if not any(getattr(f, '_star_jax', False) for f in handler.filters):
    def ours(record):
      if record.pathname.startswith(package):
        return True
      if record.levelno < std_logging.WARNING:
        return False
      # Their message, without the traceback: a library that logs the exception it then raises (Orbax
      # does, for a failed save) would otherwise print it beside our one-line 'error: ...'.
      record.exc_info, record.exc_text = None, None
      return True
    ours._star_jax = True  # pylint: disable=protected-access
    handler.addFilter(ours)


def guarded(work: Callable[[list[str]], int | None], argv: Sequence[str] | None, doc: str) -> int:
  """Runs `work(argv)` (sys.argv when argv is None), turning UserError into 'error: ...' (exit
  status 1) and flags.Error into the message and the usage (2); returns the exit status."""
  try:
    return int(work(list(sys.argv if argv is None else argv)) or 0)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except flags.Error as e:
    print(f'error: {e}\n\n{doc}', file=sys.stderr)
    return 2


def run(main: Callable[[], int]) -> None:
  """The `__main__` of an entry point: process set-up (the CPU tuning of star_jax/cpu_tuning.py,
  which may re-execute the process once), then `main()`, and exit with its status."""
  try:
    cpu_tuning.setup_process()
  except ValueError as e:
    sys.exit(f'error: {e}')
  sys.exit(main())
