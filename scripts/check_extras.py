"""Checks that the extras install as written: none changes a package that is installed already.

  python scripts/check_extras.py [--extras export,demo,...]     (default: every extra in pyproject.toml)

Runs `pip install --dry-run --report` of the project with the extras, in this environment (which
holds the project installed, as CI installs it), and fails, naming each package with its installed
and its would-be version, when the resolution would upgrade or downgrade an installed package: an
extra may add packages, never change the training stack that `pip install .` installs (jax2onnx, whose
metadata holds orbax-checkpoint below the version star_jax uses, is installed with --no-deps for this
reason, README). All the extras are resolved together (one resolution, a few seconds); when that fails,
each alone, to say which one. Needs the package index. Exit status 0 when nothing would change, 1 when
something would, 2 when pip cannot resolve.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]


def normalise(name: str) -> str:
  """A distribution name as PEP 503 compares them."""
  return re.sub(r'[-_.]+', '-', name).lower()


def changes(report: dict, installed: dict[str, str], own: str = 'star-jax') -> list[tuple[str, str, str]]:
  """(name, installed version, version pip would install) of every installed package, other than the
  project itself, that pip's --report `report` would install at another version."""
  out = []
  for item in report.get('install', []):
    name, version = normalise(item['metadata']['name']), item['metadata']['version']
    if name != own and name in installed and installed[name] != version:
      out.append((name, installed[name], version))
  return sorted(out)


def installed_versions() -> dict[str, str]:
  return {normalise(d.metadata['Name']): d.version for d in importlib.metadata.distributions() if d.metadata['Name']}


def resolve(extras: list[str]) -> dict:
  """pip's --report of installing the project with `extras` here (nothing is installed)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / 'report.json'
    spec = f'{REPO}[{",".join(extras)}]' if extras else str(REPO)
    proc = subprocess.run([sys.executable, '-m', 'pip', 'install', '--dry-run', '--quiet', '--report', str(out), spec],
                          capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f'pip cannot resolve {spec}: {proc.stderr.strip()[-2000:]}')
    return json.loads(out.read_text())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--extras', default='', help='comma-separated extras (default: all in pyproject.toml)')
  args = parser.parse_args(argv)
  extras = [e for e in args.extras.split(',') if e] or sorted(
      tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['optional-dependencies'])
  installed = installed_versions()
  try:
    found = changes(resolve(extras), installed)
    if not found:
      print(f'check_extras: {", ".join(extras)}: nothing installed would change')
      return 0
    for extra in extras:
      for name, have, want in changes(resolve([extra]), installed):
        print(f'check_extras: [{extra}] would change {name} {have} -> {want}', file=sys.stderr)
  except RuntimeError as e:
    print(f'check_extras: {e}', file=sys.stderr)
    return 2
  print(f'check_extras: failed: {", ".join(f"{n} {h} -> {w}" for n, h, w in found)}', file=sys.stderr)
  return 1


if __name__ == '__main__':
  sys.exit(main())
