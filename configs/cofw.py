"""STAR on COFW (29 points): the official recipe.

Run (build the dataset first, see README "Datasets"):
  python -m star_jax.train --config configs/cofw.py --workdir runs/cofw

Expected (official PyTorch model, paper Table 3): NME 4.62 inter-pupil, 3.21 inter-ocular.
Our own full run has not been measured yet.
"""

from star_jax import config_lib

base = config_lib.import_sibling(__file__, 'base')


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False)
  c = base.get_base_config(layout='COFW', dataset='cofw')
  if args['tiny']:
    c = base.shrink_for_smoke_test(c)
  return c
