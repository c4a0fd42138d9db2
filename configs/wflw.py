"""STAR on WFLW (98 points): the official recipe.

Run (build the dataset first, see README "Datasets"):
  python -m star_jax.train --config configs/wflw.py --workdir runs/wflw
Smoke test on a laptop:
  python -m star_jax.train --config configs/wflw.py:tiny --workdir /tmp/wflw_tiny

Expected (official PyTorch model, paper Table 1): test NME 4.02 (inter-ocular), FR@0.1 2.32%,
AUC@0.1 0.605. Our own full run has not been measured yet.
"""

from star_jax import config_lib

base = config_lib.import_sibling(__file__, 'base')


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False)
  c = base.get_base_config(layout='WFLW', dataset='wflw')
  if args['tiny']:
    c = base.shrink_for_smoke_test(c)
  return c
