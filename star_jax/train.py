"""Train STAR: `python -m star_jax.train --config configs/synthetic.py --workdir runs/synthetic`.

The config file is an ml_collections file (`configs/*.py`, optionally `file.py:arg`), overridable
from the command line: `--config.batch_size=64 --config.model.dtype=bfloat16`. The run resumes from
the latest checkpoint in --workdir. For several processes (hosts), start one per host with
--coordinator, --num_processes and --process_id (or rely on the cluster's auto-detection with
--distributed, see scripts/launch_multihost.sh).

One run writes a workdir at a time (a second one stops at once). A resumed run refuses a config that
changes results (see star_jax/training/workdir.py, FREE_KEYS, for the fields that may change) unless
--allow_config_change is given; the change is then recorded in <workdir>/config_changes.jsonl.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shlex

from absl import flags
import cv2

from star_jax import cli
from star_jax import layouts
from star_jax.data import synthetic

DEFAULT_CONFIG = 'configs/synthetic.py'


def _train(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv, config=DEFAULT_CONFIG)
  fv = command.fv
  flags.DEFINE_string('workdir', 'runs/synthetic', 'where checkpoints, metrics and the config go', flag_values=fv)
  flags.DEFINE_string('coordinator', None, 'host:port of process 0, for multi-process training', flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'number of processes, for multi-process training', flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'this process, for multi-process training', flag_values=fv)
  flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize() with auto-detection '
                    '(SLURM, Open MPI, Kubernetes, Cloud TPU)', flag_values=fv)
  flags.DEFINE_string('cpu_collectives', None, "CPU cross-process collectives ('gloo'), for CPU clusters",
                      flag_values=fv)
  flags.DEFINE_bool('allow_config_change', False, 'resume even when the config differs from the '
                    "checkpoint's in fields that change results (recorded in <workdir>/config_changes.jsonl)",
                    flag_values=fv)
  rest = command.parse()
  if rest:
    raise flags.Error(f'unexpected arguments: {" ".join(rest)}')

  # The libraries load here, after cli.run's process set-up (which may re-execute the process) and the
  # flags: they load once, and --help stays fast.
  import jax  # lazy: command start-up
  from star_jax.checkpoints import selection  # lazy: command start-up
  from star_jax.training import loop  # lazy: command start-up

  if fv.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', fv.cpu_collectives)
  if fv.coordinator:
    jax.distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id)
  elif fv.distributed:
    jax.distributed.initialize()
  cli.setup_logging()
  try:
    final = loop.train_and_evaluate(command.config, fv.workdir, allow_config_change=fv.allow_config_change)
  except loop.USER_ERRORS as e:
    # Problems the user can act on: one message, no traceback (the log above says what happened).
    raise cli.UserError(str(e)) from None
  if jax.process_index() == 0:
    # Evaluations of earlier invocations (a resumed or already complete run) are ranked too.
    best = (final or {}).get('best') or _asdict(selection.best_checkpoint(fv.workdir))
    print(last_word(command.config, fv.workdir, final, best, argv), flush=True)
  return 0


def _config_args(argv: list[str]) -> list[str]:
  """The --config flag as given (default: DEFAULT_CONFIG) and its --config.data.* overrides: what
  evaluation needs to find the same test split."""
  spec, overrides = DEFAULT_CONFIG, []
  args = cli._normalise(argv[1:])  # pylint: disable=protected-access
  for i, arg in enumerate(args):
    if arg.startswith('--config='):
      spec = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(args):
      spec = args[i + 1]
    elif arg.startswith('--config.data.'):
      overrides.append(arg)
  return ['--config', spec] + overrides


def write_samples(config, folder: pathlib.Path, count: int = 4) -> list[pathlib.Path]:
  """A few synthetic test faces as JPEG files (for the printed predict command to run on)."""
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i in range(count):
    sample = synthetic.generate(0, 'test', i, layout=str(config.layout))
    path = folder / f'synthetic_test_{i}.jpg'
    cv2.imwrite(str(path), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    paths.append(path)
  return paths


def _asdict(best) -> dict | None:
  return dataclasses.asdict(best) if best is not None else None


def last_word(config, workdir: str, final: dict, best: dict | None, argv: list[str]) -> str:
  """What the run ends with: its result (NME / FR / AUC of the final and the EMA weights, when it
  evaluated), its best checkpoint (`best`: checkpoints.Best as a dict, or None) and the exact commands
  to evaluate it and to predict with it. For the synthetic faces it also writes a few test faces to
  <workdir>/samples, for the predict command to run on."""
  workdir_path = pathlib.Path(workdir).absolute()
  quote = lambda parts: ' '.join(shlex.quote(str(p)) for p in parts)  # noqa: E731
  layout = layouts.get_layout(config.layout)
  lines = [f'done: checkpoints in {workdir_path / "checkpoints"}']
  if final:
    lines.append(f'result on the {config.data.name} {config.data.test_split} split '
                 f'(NME normalised by the inter-{layout.default_norm} distance; FR and AUC at {layout.threshold}):')
    lines.append(f'  {"weights":8s} {"NME":>8s} {"FR":>8s} {"AUC":>7s}')
    for name, label in (('model', 'final'), ('ema', 'EMA')):
      if f'{name}/nme' in final:
        lines.append(f'  {label:8s} {100 * final[f"{name}/nme"]:7.2f}% {100 * final[f"{name}/fr"]:7.2f}% '
                     f'{final[f"{name}/auc"]:7.3f}')
  else:
    lines.append('(no evaluation in this invocation: it stopped before the end, or the run was already complete)')
  if best:
    rule = 'the official model selection: the lower NME of the weights and their EMA at each evaluation'
    lines.append(f'best checkpoint ({rule}): step {best["step"]}, {best["weights"]} weights, NME '
                 f'{100 * best["nme"]:.2f}%; evaluate and predict use it by default (--step, --weights to choose)')
  lines.append('next:')
  lines.append('  ' + quote(['python', '-m', 'star_jax.evaluate', *_config_args(argv), '--checkpoint', workdir_path]))
  if config.data.name == 'synthetic_faces':
    samples = write_samples(config, workdir_path / 'samples')
    lines.append('  ' + quote(['python', '-m', 'star_jax.predict', '--checkpoint', workdir_path, samples[0].parent,
                               '--output', workdir_path / 'predictions', '--show_ambiguity']))
    lines.append('note: this model has only seen synthetic faces (the test faces are in '
                 f'{samples[0].parent}): it is for trying the pipeline and does not work on real photos. For '
                 'real photos use the released official model, fetched on first use: python -m star_jax.predict '
                 '--pretrained wflw photo.jpg --output out (see README.md).')
  else:
    lines.append('  ' + quote(['python', '-m', 'star_jax.predict', '--checkpoint', workdir_path, 'photo.jpg',
                               '--output', workdir_path / 'predictions', '--show_ambiguity']))
  return '\n'.join(lines)


def main(argv=None) -> int:
  return cli.guarded(_train, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
