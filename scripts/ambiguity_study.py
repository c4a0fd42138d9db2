"""Does STAR reduce the harm of ambiguous annotation? A controlled test on the synthetic faces.

  python scripts/ambiguity_study.py [--full] [--output runs/ambiguity_study]

Trains the same small network at several levels of tangential label noise on the synthetic training
faces (exact test labels), with the STAR loss and with baselines (smooth-L1 / L2 on the soft-argmax
coordinates plus the same AWing map terms; AWing alone), same seeds, batches and steps, and writes
the test NMEs as a table (results.md, results.json) and a plot (nme_vs_ambiguity.png) into --output.
`--replot` rewrites the table and plot of a finished study from its results.json.

The default (3 levels x 3 losses, 400 steps each, a 64 px one-stack network) took 25 minutes
on a 2-core CPU, dataset build included; --full is the long version, for a GPU. Any setting can be
changed, e.g. `--levels 0,4 --losses star,l2 --steps 3` for a smoke test. See star_jax/study.py.
"""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
  from star_jax import study  # pylint: disable=g-import-not-at-top  (JAX loads only when the study runs)
  settings, args = study.parse_args(argv, description=__doc__)
  log = lambda line: print(line, flush=True)
  if args.replot:
    study.replot(pathlib.Path(args.output), log=log)
    return 0
  from star_jax import config_lib
  # The study's network and data settings override the synthetic config; the rest (augmentation,
  # Adam, loss options) is the recipe every other run of the project uses.
  base = config_lib.import_sibling(str(REPO / 'configs' / 'synthetic.py'), 'synthetic').get_config('ambiguity=0')
  study.run_study(settings, base, pathlib.Path(args.output), data_dir=args.data_dir, log=log)
  return 0


if __name__ == '__main__':
  sys.exit(main())
