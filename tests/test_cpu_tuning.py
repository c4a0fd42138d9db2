"""star_jax/cpu_tuning.py: the XLA flag and the malloc re-exec do what they say, and can be turned off."""

import os
import subprocess
import sys

import pytest

from star_jax import cpu_tuning

_PRINT_TUNABLES = ('from star_jax import cpu_tuning; cpu_tuning.reexec_with_malloc_tuning(); import os, sys; '
                   'print(repr(os.environ.get("GLIBC_TUNABLES")), repr(os.environ.get("{orig}")), sys.argv[1:])')


def _run(code, env_update, *args):
  env = dict(os.environ)
  env.pop('GLIBC_TUNABLES', None)
  env.pop(cpu_tuning.ORIGINAL_TUNABLES_ENV, None)
  env.update(env_update)
  out = subprocess.run([sys.executable, '-c', code.format(orig=cpu_tuning.ORIGINAL_TUNABLES_ENV), *args],
                       env=env, capture_output=True, text=True, check=True, timeout=120)
  return out.stdout.strip()


def test_xla_flags_keep_the_users_own(monkeypatch):
  monkeypatch.setenv('STAR_JAX_CPU_TUNING', '1')
  monkeypatch.setattr(cpu_tuning, '_jaxlib_version', lambda: '0.10.2')
  ours = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot'
  # A flag of the user's that we do not set: ours is appended after it, once.
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  cpu_tuning.apply_xla_flags()
  assert os.environ['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=4', ours]
  cpu_tuning.apply_xla_flags()
  assert os.environ['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=4', ours]
  # The user's own choice of the flag we set wins: nothing is added.
  users = '--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type=eltwise'
  monkeypatch.setenv('XLA_FLAGS', users)
  cpu_tuning.apply_xla_flags()
  assert os.environ['XLA_FLAGS'] == users


def test_xla_flags_only_for_tested_jaxlib_and_when_enabled(monkeypatch):
  monkeypatch.setattr(cpu_tuning, '_jaxlib_version', lambda: '0.11.0')
  assert cpu_tuning.xla_flags() == ()
  monkeypatch.setattr(cpu_tuning, '_jaxlib_version', lambda: '0.10.2')
  monkeypatch.setenv('STAR_JAX_CPU_TUNING', '0')
  assert cpu_tuning.xla_flags() == ()
  monkeypatch.setenv('STAR_JAX_CPU_TUNING', '1')
  assert cpu_tuning.xla_flags() == ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,'
                                    '-individual_dot',)


def test_reexec_sets_huge_pages_once_and_keeps_arguments():
  out = _run(_PRINT_TUNABLES, {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'a b', '--x=1')
  if not cpu_tuning._glibc_supports_hugetlb():  # pylint: disable=protected-access
    assert out == "'glibc.malloc.arena_max=2' None ['a b', '--x=1']"
    return
  assert out == "'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1' 'glibc.malloc.arena_max=2' ['a b', '--x=1']"


def test_reexec_off():
  assert _run(_PRINT_TUNABLES, {'STAR_JAX_CPU_TUNING': '0'}) == 'None None []'


def test_untuned_environment_restores_the_callers(monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  monkeypatch.setenv(cpu_tuning.ORIGINAL_TUNABLES_ENV, '')
  env = cpu_tuning.untuned_environment()
  assert 'GLIBC_TUNABLES' not in env and cpu_tuning.ORIGINAL_TUNABLES_ENV not in env
  monkeypatch.setenv(cpu_tuning.ORIGINAL_TUNABLES_ENV, 'glibc.malloc.arena_max=2')
  assert cpu_tuning.untuned_environment()['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2'


def test_status_reports_what_is_on(monkeypatch):
  monkeypatch.setattr(cpu_tuning, '_jaxlib_version', lambda: '0.10.2')
  monkeypatch.setenv('STAR_JAX_CPU_TUNING', '1')
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  assert cpu_tuning.status() == 'on'
  monkeypatch.delenv('GLIBC_TUNABLES')
  assert cpu_tuning.status() == 'partly on'
  monkeypatch.setenv('STAR_JAX_CPU_TUNING', '0')
  assert cpu_tuning.status() == 'off'


def test_bad_switch_value_names_the_variable(monkeypatch):
  monkeypatch.setenv('STAR_JAX_CPU_TUNING', 'false')
  with pytest.raises(ValueError, match="STAR_JAX_CPU_TUNING must be 0 or 1, got 'false'"):
    cpu_tuning.enabled()
