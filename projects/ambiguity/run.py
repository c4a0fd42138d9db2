"""Does STAR reduce the harm of ambiguous annotation? A controlled test on the synthetic faces.

  python -m projects.study_lib.run [--config projects/ambiguity/config.py[:quick|short|full] | --quick]
      [--output DIR] [--config.levels='(0, 2, 4, 8)'] [--config.run.total_steps=800] [--replot | --partial]

(from the repository's root: the project is not part of the installed package)

Trains the same small network at several levels of tangential label noise on the synthetic training
faces (exact test labels), with the STAR loss and with matched baselines (smooth-L1 / L2 on the
soft-argmax coordinates plus the same AWing map terms), same seeds, batches and steps, plus STAR
without its eigenvalue restriction (w = 0) and STAR v1 at one level; scores every run on the test split
(NME overall, on the contour and brows, on the others; the predicted covariance's principal axis
against the true tangent of each point's curve) and writes tables (results.md), every run with its
timings (results.json) and plots (nme_vs_study_lib.png, axis_angles.png, covariance_vs_study_lib.png)
into --output. Each run is an ordinary training run in <output>/runs/<variant>_amb<level>_seed<seed>;
a finished run is not trained again, so an interrupted study resumes. `--quick` is the smoke setting
(`projects/ambiguity/config.py:quick`, a few minutes). `--replot` rewrites the tables and plots of a
study from its results.json; `--partial` writes them from the cells finished so far (the study
running or stopped). See config.py, study.py and README.md in projects/ambiguity/.
"""

import pathlib

from absl import flags

from projects.ambiguity import study as study_lib
from star_jax import cli

_CONFIG = str(pathlib.Path(__file__).resolve().with_name('config.py'))
_QUICK = f'{_CONFIG}:quick'


def _quick_argv(argv: list[str]) -> list[str]:
  """`--quick` stands for `--config projects/ambiguity/config.py:quick` (with --config.x overrides kept)."""
  if '--quick' not in argv[1:]:
    return argv
  if any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    raise flags.Error('--quick picks the config: give it or --config, not both')
  rest = [a for a in argv[1:] if a != '--quick']
  return [argv[0], '--config', _QUICK, *rest]   # before any --config.x override, as absl needs


def _study(argv: list[str]) -> int:
  command = cli.Command(__doc__, _quick_argv(list(argv)), config=_CONFIG)
  fv = command.fv
  flags.DEFINE_string('output', 'runs/ambiguity_study', 'where the runs, tables and plots go', flag_values=fv)
  flags.DEFINE_bool('replot', False, "only rewrite results.md and the plots from --output's results.json "
                    '(no training)', flag_values=fv)
  flags.DEFINE_bool('partial', False, 'only write the tables and plots of the cells finished so far in --output '
                    '(no training; while the study runs, or after it stopped)', flag_values=fv)
  flags.DEFINE_bool('error_split', False, "only score the finished cells' test error along and across the true "
                    'tangent again from their checkpoints (error_split.md in --output; no training)', flag_values=fv)
  command.parse()
  log = lambda line: print(line, flush=True)
  output = pathlib.Path(fv.output)
  try:
    if fv.replot and fv.partial:
      raise ValueError('--replot and --partial: give one of them')
    if fv.replot:
      study_lib.replot(output, log=log)
      return 0
    if fv.partial:
      study_lib.partial_outputs(command.config, output, log=log)
      return 0
    if fv.error_split:
      log(study_lib.rescore_error_split(command.config, output, log=log))
      return 0
    study_lib.check_study(command.config)
  except (FileNotFoundError, ValueError) as e:
    raise cli.UserError(str(e)) from None
  cli.setup_logging('warning')   # the study prints its own progress; the trainer's INFO lines are noise
  try:
    study_lib.run_study(command.config, output, log=log)
  except (study_lib.StaleCellError, study_lib.CellInterruptedError) as e:
    raise cli.UserError(str(e)) from None
  return 0


def main(argv=None) -> int:
  return cli.guarded(_study, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
