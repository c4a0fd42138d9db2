"""star_jax's cache folder and JAX's persistent compilation cache in it (star_jax/home.py)."""

import os
import subprocess
import sys

import jax

from conftest import DATA, REPO
from star_jax import home


def test_the_cache_folder_comes_from_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv('STAR_JAX_HOME', str(tmp_path / 'mine'))
  assert home.home() == tmp_path / 'mine'
  monkeypatch.delenv('STAR_JAX_HOME')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert home.home() == tmp_path / 'xdg' / 'star_jax'
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'user'))
  assert home.home() == tmp_path / 'user' / '.cache' / 'star_jax'


def test_enabling_the_compilation_cache_respects_the_switch_and_a_users_own_cache(monkeypatch, tmp_path):
  before = jax.config.jax_compilation_cache_dir
  monkeypatch.setenv('STAR_JAX_HOME', str(tmp_path))
  try:
    monkeypatch.setenv('STAR_JAX_COMPILATION_CACHE', 'off')
    assert home.enable_compilation_cache() is None and not (tmp_path / 'jax_cache').exists()
    monkeypatch.setenv('STAR_JAX_COMPILATION_CACHE', '1')
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'theirs'))
    assert home.enable_compilation_cache() == tmp_path / 'theirs'
    jax.config.update('jax_compilation_cache_dir', None)
    assert home.enable_compilation_cache() == tmp_path / 'jax_cache'
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'jax_cache') and (tmp_path / 'jax_cache').is_dir()
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


def _entries(folder):
  return sorted(p.name for p in folder.rglob('*') if p.is_file() and not p.name.endswith('-atime'))


def test_a_second_predict_loads_its_programs_from_the_cache(tiny_wflw_checkpoint, tmp_path):
  """The real command twice, in fresh processes: the first fills <home>/jax_cache, the second finds
  every program there (it adds none)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  env.update(JAX_PLATFORMS='cpu', STAR_JAX_HOME=str(tmp_path / 'home'), STAR_JAX_COMPILATION_CACHE='1',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')  # every program, however quick to compile
  command = [sys.executable, '-m', 'star_jax.predict', '--checkpoint', str(tiny_wflw_checkpoint),
             str(DATA / 'real_faces_full' / 'takeo.png'), '--box', '31,66,135,169', '--norefine']
  cache = tmp_path / 'home' / 'jax_cache'
  runs = []
  for i in range(2):
    out = subprocess.run(command + ['--output', str(tmp_path / f'out{i}')], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs.append(_entries(cache))
  assert runs[0] and runs[1] == runs[0]
  assert (tmp_path / 'out0' / 'takeo.json').read_text() == (tmp_path / 'out1' / 'takeo.json').read_text()
