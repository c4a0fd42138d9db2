"""STAR on 300W (68 points): the official recipe.

Run (build the dataset first, see README "Datasets"):
  python -m star_jax.train --config configs/300w.py --workdir runs/300w

Expected (official PyTorch model, paper Table 2): inter-ocular NME full 2.87, common 2.52,
challenge 4.32. Our own full run has not been measured yet.
"""

from star_jax import config_lib

base = config_lib.import_sibling(__file__, 'base')


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False)
  c = base.get_base_config(layout='300W', dataset='the300w')
  if args['tiny']:
    c = base.shrink_for_smoke_test(c)
  return c
