"""scripts/check_extras.py (run by CI with the package index): an extra may add packages, never change
an installed one. Here its reading of pip's report, on reports shaped as pip writes them."""

import importlib.util

from conftest import REPO


def _module():
  spec = importlib.util.spec_from_file_location('check_extras', REPO / 'scripts' / 'check_extras.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _report(*packages):
  return {'version': '1', 'install': [{'metadata': {'name': n, 'version': v}, 'requested': False}
                                      for n, v in packages]}


def test_a_changed_installed_package_is_found_and_an_added_one_is_not():
  check = _module()
  installed = {'orbax-checkpoint': '0.12.8', 'jax': '0.10.2', 'star-jax': '0.1.0'}
  # What the export extra with jax2onnx in it resolved to: orbax-checkpoint downgraded, packages added.
  before = _report(('star_jax', '0.1.0'), ('orbax_checkpoint', '0.11.36'), ('dm_pix', '0.4.5'), ('Jax', '0.10.2'))
  assert check.changes(before, installed) == [('orbax-checkpoint', '0.12.8', '0.11.36')]
  after = _report(('star_jax', '0.1.0'), ('onnx-ir', '0.1.10'))
  assert check.changes(after, installed) == []
  assert check.normalise('Typing_Extensions') == check.normalise('typing.extensions') == 'typing-extensions'


def test_every_extra_of_pyproject_is_checked_by_default(monkeypatch, capsys):
  check = _module()
  seen = []
  monkeypatch.setattr(check, 'resolve', lambda extras: seen.append(list(extras)) or _report())
  assert check.main([]) == 0
  assert seen == [['browser-test', 'demo', 'export', 'gpu', 'onnx', 'test']]
  assert 'nothing installed would change' in capsys.readouterr().out
