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
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')   # (on a GPU machine the tuning is 'off' whatever is set)
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


# ---- Per backend: nothing of the CPU tuning where JAX will run on an accelerator ---------------------

@pytest.mark.parametrize('platforms, expected', [
    ('cuda', True), ('gpu', True), ('cuda,cpu', True), (' CUDA ', True), ('rocm', True), ('tpu', True),
    ('cpu', False), ('cpu,cuda', False)])
def test_accelerator_expected_from_jax_platforms(monkeypatch, platforms, expected):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  monkeypatch.setattr(cpu_tuning, '_installed', lambda distribution: True)   # JAX_PLATFORMS decides
  assert cpu_tuning.accelerator_expected() is expected


def test_accelerator_expected_from_an_installed_plugin(monkeypatch):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  for plugin in ('jax-cuda12-plugin', 'jax-cuda13-plugin', 'jax-rocm7-plugin', 'libtpu'):
    monkeypatch.setattr(cpu_tuning, '_installed', lambda distribution, p=plugin: distribution == p)
    assert cpu_tuning.accelerator_expected(), plugin
  monkeypatch.setattr(cpu_tuning, '_installed', lambda distribution: False)
  assert not cpu_tuning.accelerator_expected()


def test_setup_process_does_nothing_for_an_accelerator(monkeypatch):
  """On a GPU machine (JAX_PLATFORMS naming it, or a CUDA plugin installed) neither the XLA:CPU flag nor
  the huge-page re-exec is applied, and the benchmarks report the tuning 'off'; the same process bound
  for the CPU is tuned."""
  monkeypatch.setenv('STAR_JAX_CPU_TUNING', '1')
  monkeypatch.setattr(cpu_tuning, '_jaxlib_version', lambda: '0.10.2')   # a version the flag is added for
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  reexecs = []
  monkeypatch.setattr(cpu_tuning, 'reexec_with_malloc_tuning', lambda: reexecs.append(1))
  for accelerator in ({'JAX_PLATFORMS': 'cuda'}, {'JAX_PLATFORMS': None, 'plugin': True}):
    if accelerator['JAX_PLATFORMS']:
      monkeypatch.setenv('JAX_PLATFORMS', accelerator['JAX_PLATFORMS'])
    else:
      monkeypatch.delenv('JAX_PLATFORMS', raising=False)
    monkeypatch.setattr(cpu_tuning, '_installed', lambda distribution: distribution == 'jax-cuda13-plugin')
    cpu_tuning.setup_process()
    assert reexecs == [] and 'XLA_FLAGS' not in os.environ
    assert cpu_tuning.status() == 'off'
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  cpu_tuning.setup_process()
  assert reexecs == [1] and 'xla_cpu' in os.environ['XLA_FLAGS']
  assert cpu_tuning.status() == 'on'
