"""STAR on your own annotated photos (the own_faces dataset): no code to write.

Put the photos in a folder with a .pts file beside each (or one CSV / TSV file; see
datasets/own_faces/README.md), choose the layout (a built-in name, or a layout file for other points,
star_jax/layouts.py), and run:
  python -m star_jax.train --config configs/own.py --workdir runs/mine \
      --config.data.manual_dir=faces/ --config.layout=300W
The dataset is built on first use into <data_dir>/own_faces/<data.config>/ ('default' unless you name
it: --config.data.config=mine). Options of the build (config.data.own): `annotations` (a CSV / TSV file;
'' = .pts files), `train` / `test` (folders or list files of image paths; else the folders train/ and
test/ when both exist; else a random `test_fraction` of the images drawn with `split_seed`).
Evaluate and predict as with any dataset:
  python -m star_jax.evaluate --config configs/own.py --checkpoint runs/mine \
      --config.data.manual_dir=faces/ --config.layout=300W
  python -m star_jax.predict --checkpoint runs/mine photo.jpg --output out/

`configs/own.py:finetune` is for starting from a trained model (--config.init_from=CHECKPOINT: an
official .pkl or one of our checkpoints; of the same points it loads whole, e.g. the official 300W
model for 68 points; of other points add --config.init_from_strict=False to load all but the heads,
e.g. from the WFLW model): a tenth of the learning rate and 60 epochs. Our choice, not measured: the
official recipe trains from scratch only.

Expected: no published numbers exist for your data; the report gives NME, FR and AUC at the layout's
threshold. The defaults are the official recipe (configs/base.py): 256x256 input, 4 stacks, 500 epochs.
"""

import ml_collections

from star_jax import config_lib

base = config_lib.import_sibling(__file__, 'base')


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False, finetune=False)
  c = base.get_base_config(layout='300W', dataset='own_faces')
  c.data.config = 'default'          # the build's name: its folder under <data_dir>/own_faces/
  c.data.own = ml_collections.ConfigDict({
      'annotations': '',             # '' = a .pts file beside each image; else a CSV / TSV file
      'train': '',                   # '' or a folder / list file of the training images
      'test': '',                    # '' or a folder / list file of the test images
      'test_fraction': 0.1,          # random split when no folders or lists say otherwise
      'split_seed': 0,
  })
  if args['finetune']:
    c.lr = 1e-4
    c.num_epochs = 60
    c.milestones = (40,)
  if args['tiny']:
    c = base.shrink_for_smoke_test(c)
  return c
