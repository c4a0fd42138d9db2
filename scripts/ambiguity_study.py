"""Does STAR reduce the harm of ambiguous annotation? A controlled test on the synthetic faces.

  python scripts/ambiguity_study.py [--config configs/ambiguity_study.py[:tiny|full]] [--output DIR]
      [--config.levels='(0, 2, 4)'] [--config.run.total_steps=800] [--replot]

Trains the same small network at several levels of tangential label noise on the synthetic training
faces (exact test labels), with the STAR loss and with baselines (smooth-L1 / L2 on the soft-argmax
coordinates plus the same AWing map terms; AWing alone), same seeds, batches and steps, and writes
the test NMEs as a table (results.md, results.json) and a plot (nme_vs_ambiguity.png) into --output.
Each run is an ordinary training run in <output>/runs/<loss>_amb<level>_seed<seed>; a finished run
is not trained again, so an interrupted study resumes. `--replot` rewrites the table and plot of a
finished study from its results.json. See configs/ambiguity_study.py and
star_jax/experiments/ambiguity.py.
"""

import pathlib

from absl import flags

from star_jax import cli


def _study(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv, config='configs/ambiguity_study.py')
  fv = command.fv
  flags.DEFINE_string('output', 'runs/ambiguity_study', 'where the runs, table and plot go', flag_values=fv)
  flags.DEFINE_bool('replot', False, "only rewrite results.md and the plot from --output's results.json "
                    '(no training)', flag_values=fv)
  command.parse()
  from star_jax.experiments import ambiguity  # pylint: disable=import-outside-toplevel

  log = lambda line: print(line, flush=True)
  output = pathlib.Path(fv.output)
  try:
    if fv.replot:
      ambiguity.replot(output, log=log)
      return 0
    ambiguity.check_study(command.config)
  except (FileNotFoundError, ValueError) as e:
    raise cli.UserError(str(e)) from None
  cli.setup_logging('warning')   # the study prints its own progress; the trainer's INFO lines are noise
  ambiguity.run_study(command.config, output, log=log)
  return 0


def main(argv=None) -> int:
  return cli.guarded(_study, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
