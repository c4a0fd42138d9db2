"""The package as a whole: importing it changes nothing, an installed copy (no checkout) trains and
evaluates with the configs it ships, and the import structure holds (read from the code: every
module's imports, those inside functions included)."""

import ast
import collections
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

from conftest import COMPILE_CACHE_ENV, REPO

# Imports every module of star_jax (and the dataset builders) after the third-party libraries they
# use, and reports what changed in the process: environment, absl flags, logging handlers, signal
# handlers, a started JAX backend, files written in the working folder.
_PROBE = textwrap.dedent('''
    import importlib, json, logging, os, pkgutil, signal, sys
    import absl.flags, absl.logging, cv2, flax, grain, jax, matplotlib, ml_collections, numpy, optax, orbax.checkpoint
    import tensorboardX, tensorflow_datasets, tqdm
    from jax._src import xla_bridge
    before = dict(env=dict(os.environ), flags=sorted(absl.flags.FLAGS), handlers=len(logging.getLogger().handlers),
                  absl_handlers=len(logging.getLogger('absl').handlers), verbosity=absl.logging.get_verbosity(),
                  sigterm=repr(signal.getsignal(signal.SIGTERM)), sigint=repr(signal.getsignal(signal.SIGINT)),
                  files=sorted(os.listdir('.')), backend=matplotlib.get_backend())
    import star_jax, star_jax_datasets
    names = []
    for package in (star_jax, star_jax_datasets):
      for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):
        if info.name.endswith('_test') or info.name.endswith('fake_data'):
          continue
        importlib.import_module(info.name)
        names.append(info.name)
    after = dict(env=dict(os.environ), flags=sorted(absl.flags.FLAGS), handlers=len(logging.getLogger().handlers),
                 absl_handlers=len(logging.getLogger('absl').handlers), verbosity=absl.logging.get_verbosity(),
                 sigterm=repr(signal.getsignal(signal.SIGTERM)), sigint=repr(signal.getsignal(signal.SIGINT)),
                 files=sorted(os.listdir('.')), backend=matplotlib.get_backend())
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    print(json.dumps({'modules': names, 'changed': changed, 'backends': sorted(xla_bridge._backends)}))
''')


def test_importing_star_jax_changes_nothing(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'GLIBC_TUNABLES')}
  proc = subprocess.run([sys.executable, '-c', _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  # Every module was imported (the walk found the package's rooms), and none of them did anything.
  for module in ('star_jax.cpu_tuning', 'star_jax.train', 'star_jax.evaluate', 'star_jax.predict',
                 'star_jax.training.loop', 'star_jax.data.synthetic.render', 'star_jax.checkpoints.init_from',
                 'star_jax_datasets.synthetic_faces.synthetic_faces_dataset_builder'):
    assert module in report['modules']
  assert report['changed'] == {}
  assert report['backends'] == []   # no JAX backend started


def test_entry_points_tune_the_cpu_only_when_run(tmp_path):
  # The tuning is an explicit call in the commands' __main__: importing a command does not tune, and
  # an accelerator platform turns it off.
  code = ('import os; from star_jax import cpu_tuning, train; print(os.environ.get("XLA_FLAGS", ""));'
          'os.environ["JAX_PLATFORMS"] = "cuda"; print(cpu_tuning.accelerator_expected(), cpu_tuning.status())')
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS',)}
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split('\n')
  assert out[0] == '' and out[1] == 'True off'


def test_an_installed_copy_trains_and_evaluates_without_the_checkout(tmp_path, tiny_tfds_dir):
  # Installed from a copy of the sources (the build writes build/ and *.egg-info beside them).
  source = tmp_path / 'source'
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns('.git', '.venv', '.ci', 'runs', 'build', 'tests',
                                                              '*.egg-info', '__pycache__'))
  target = tmp_path / 'site'
  proc = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(target),
                         str(source)], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  # Untuned, as the other tests' runs of this config (conftest.command_env): the same programs, compiled once.
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(target), STAR_JAX_CPU_TUNING='0', **COMPILE_CACHE_ENV)
  where = subprocess.run([sys.executable, '-c', 'import star_jax, star_jax_configs; print(star_jax.__file__)'],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
  assert where.stdout.startswith(str(target)), where.stdout + where.stderr
  config = ['--config', 'configs/synthetic.py:tiny', f'--config.data.data_dir={tiny_tfds_dir}']
  train = subprocess.run([sys.executable, '-m', 'star_jax.train', *config, '--workdir', 'run',
                          '--config.total_steps=2', '--config.progress=False'], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  # The run ends with its result and the next commands, which run as printed.
  out = train.stdout
  assert 'result on the synthetic_faces test split' in out and 'EMA' in out and 'does not work on real photos' in out
  assert 'python -m star_jax.predict --pretrained wflw' in out   # the way to real photos
  printed = [shlex.split(line) for line in out.split('next:\n', 1)[1].splitlines() if line.startswith('  python')]
  assert [c[2] for c in printed] == ['star_jax.evaluate', 'star_jax.predict']
  evaluate = subprocess.run([sys.executable, *printed[0][1:], '--output', 'report', '--noprogress'], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=600)
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  predict = subprocess.run([sys.executable, *printed[1][1:], '--norefine'], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=600)
  assert predict.returncode == 0, predict.stderr[-3000:]
  assert len(list((elsewhere / 'run' / 'predictions').glob('synthetic_test_*.json'))) == 4
  rows = json.loads((elsewhere / 'report' / 'metrics.json').read_text())['rows']
  final = json.loads((elsewhere / 'run' / 'final_metrics.json').read_text())
  assert abs(rows[0]['nme'] - 100 * final['nme']) < 1e-3 * rows[0]['nme']   # the best by the official protocol
  # Without --config the trainer takes the installed synthetic default.
  from star_jax import config_lib
  assert config_lib.resolve_config_path('configs/nothing_here.py') == 'configs/nothing_here.py'


# ---- The import structure ---------------------------------------------------------------------------

# The project's code: the library, the dataset builders (installed as star_jax_datasets), the projects.
ROOTS = {'star_jax': REPO / 'star_jax', 'star_jax_datasets': REPO / 'datasets', 'projects': REPO / 'projects'}
# What only reads checkpoints, and must not reach into the trainer.
READERS = ('star_jax.inference', 'star_jax.evaluation', 'star_jax.export', 'star_jax.predict', 'star_jax.demo',
           'star_jax.evaluate')
# The modules that run without JAX (predict --model, FaceLandmarker.from_onnx), and the third-party
# packages they may import at module level: the JAX-free install (README, "Deploy").
JAX_FREE = ('star_jax.predict', 'star_jax.inference.landmarker', 'star_jax.inference.video')
JAX_FREE_PACKAGES = {'numpy', 'cv2', 'absl', 'tqdm', 'star_jax'}
# An import inside a function carries `# lazy: <reason>` on its line, the reason one of these.
LAZY_REASONS = ('JAX-free ONNX path', 'optional extra', 'command start-up')
MAX_LINES = 600


def _is_test(path) -> bool:
  return path.name.startswith('test_') or path.name.endswith('_test.py') or path.name == 'conftest.py'


def _modules() -> dict:
  """Module name -> path of every .py file under ROOTS."""
  out = {}
  for package, root in ROOTS.items():
    for path in sorted(root.rglob('*.py')):
      parts = [package, *path.relative_to(root).with_suffix('').parts]
      out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return out


def _imports(name: str, path, modules: dict) -> list:
  """(imported module, line number, inside a function) of every import statement of a module; `from a
  import b` names a.b when that is a module, else a."""
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  out = []

  def visit(node, in_function: bool):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Import):
        out.extend((alias.name, child.lineno, in_function) for alias in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ''
        if child.level:
          parts = package.split('.')
          base = '.'.join(parts[:len(parts) - child.level + 1] + ([child.module] if child.module else []))
        out.extend((f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base, child.lineno, in_function)
                   for a in child.names)
      visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

  visit(ast.parse(path.read_text()), False)
  return out


def _graph(modules: dict, *, top_level_only: bool = False) -> dict:
  """Module -> the project modules its imports run: the imported module and the packages above it
  (except its own, which run before it)."""
  edges = collections.defaultdict(set)
  for name, path in modules.items():
    own = {name.rsplit('.', k)[0] for k in range(1, name.count('.') + 1)}
    for target, _, in_function in _imports(name, path, modules):
      if in_function and top_level_only:
        continue
      parts = target.split('.')
      edges[name].update(t for t in ('.'.join(parts[:i]) for i in range(1, len(parts) + 1))
                         if t in modules and t not in own and t != name)
  return edges


def _closure(edges: dict, start: str) -> set:
  seen, todo = set(), [start]
  while todo:
    for nxt in edges.get(todo.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def _required_packages() -> set:
  """The top-level import names of star_jax's required dependencies (pyproject's `dependencies`)."""
  required = set()
  for line in (REPO / 'pyproject.toml').read_text().split('dependencies = [', 1)[1].split(']', 1)[0].splitlines():
    match = re.match(r'\s*"([A-Za-z0-9_.-]+)', line)
    if match:
      required.add(re.sub(r'[-_.]+', '-', match.group(1)).lower())
  names = set()
  for module, distributions in importlib.metadata.packages_distributions().items():
    if any(re.sub(r'[-_.]+', '-', d).lower() in required for d in distributions):
      names.add(module)
  return names


def test_the_import_structure():
  modules = _modules()
  edges, top_edges = _graph(modules), _graph(modules, top_level_only=True)
  library = {n: p for n, p in modules.items() if n == 'star_jax' or n.startswith('star_jax.')}
  facts = {'modules': len(modules), 'function-level imports': collections.Counter(),
           'largest star_jax modules': sorted(((len(p.read_text().splitlines()), n) for n, p in library.items()),
                                              reverse=True)[:5]}

  # Readers of checkpoints import nothing of the trainer, at any depth (imports in functions included).
  readers = [n for n in library if n.startswith(READERS)]
  assert len(readers) > 10
  reaching = {n: sorted(m for m in _closure(edges, n) if m.startswith('star_jax.training')) for n in readers}
  assert {n: v for n, v in reaching.items() if v} == {}
  # No import circle among the project's modules; nothing in the library imports the projects.
  assert sorted(n for n in modules if n in _closure(edges, n)) == []
  assert sorted(n for n in library if any(m.startswith('projects') for m in _closure(edges, n))) == []
  # The JAX-free path imports, at module level, only what the JAX-free install has.
  for name in JAX_FREE:
    third_party = {t.split('.')[0] for m in (name, *_closure(top_edges, name))
                   for t, _, in_function in _imports(m, modules[m], modules) if not in_function}
    assert third_party - JAX_FREE_PACKAGES - set(sys.stdlib_module_names) == set(), name

  # Imports sit at the top of each module, except at the deliberate boundaries, each marked with its reason.
  required, commands = _required_packages(), set()
  for name, path in modules.items():
    if _is_test(path):
      continue
    text = path.read_text()
    lines = text.splitlines()
    if re.search(r"^if __name__ == '__main__':\n\s+cli\.run\(main\)", text, re.M):
      commands.add(name)
    for target, lineno, in_function in _imports(name, path, modules):
      if not in_function:
        continue
      match = re.search(r'#\s*lazy:\s*(.+)$', lines[lineno - 1])
      where = f'{path.relative_to(REPO)}:{lineno}'
      assert match and match.group(1).startswith(LAZY_REASONS), f'{where}: an import in a function, without reason'
      reason = next(r for r in LAZY_REASONS if match.group(1).startswith(r))
      facts['function-level imports'][reason] += 1
      facts['function-level imports']['of project modules'] += target.split('.')[0] in ROOTS
      if reason == 'optional extra':
        assert target.split('.')[0] not in required, f'{where}: {target} is a required dependency'
      elif reason == 'JAX-free ONNX path':
        assert name in JAX_FREE or any(name in _closure(top_edges, m) for m in JAX_FREE), where
      else:
        assert name in commands, f'{where}: not a command'

  # No module of the library over MAX_LINES lines.
  assert facts['largest star_jax modules'][0][0] <= MAX_LINES, facts['largest star_jax modules'][0]
  facts['function-level imports']['total'] = sum(v for k, v in facts['function-level imports'].items()
                                                 if k in LAZY_REASONS)
  print(json.dumps({k: dict(v) if isinstance(v, collections.Counter) else v for k, v in facts.items()}, indent=1))


# ---- The tests' layout ---------------------------------------------------------------------------

# Folders of tests/ that are not a subpackage of star_jax: the golden files, the fault injector, and
# the tests of the repository's tools (benchmarks/, scripts/).
TEST_FOLDERS_APART = {'testdata', 'faults', 'tools'}


def test_the_tests_mirror_the_package():
  """tests/<sub>/ holds the tests of star_jax/<sub>/ (tests/ itself those of star_jax's modules and
  commands), and every test module's name is unique: pytest imports them by name."""
  tests = REPO / 'tests'
  subpackages = {p.parent.name for p in (REPO / 'star_jax').glob('*/__init__.py')}
  folders = {p.name for p in tests.iterdir() if p.is_dir() and p.name != '__pycache__'}
  assert folders - TEST_FOLDERS_APART <= subpackages, sorted(folders - TEST_FOLDERS_APART - subpackages)
  names = collections.Counter(p.name for p in tests.rglob('test_*.py') if 'testdata' not in p.parts)
  assert not [n for n, count in names.items() if count > 1], names
  assert not list(tests.rglob('__init__.py')) and not list(tests.rglob('conftest.py'))[1:]
