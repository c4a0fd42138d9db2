"""Reproduce the published table: build the dataset, convert the checkpoint, evaluate as the official
tester does, and compare every published figure with ours.

  python scripts/reproduce.py --dataset wflw|300w|cofw --manual_dir DIR (--pytorch FILE.pkl | --checkpoint DIR)
      [--data_dir ~/tensorflow_datasets] [--output OUT] [--tolerance nme=0.05,fr=0.1,auc=0.001]
      [--config configs/wflw.py --config.key=value ...]

The dataset is built from the hand-downloaded files in --manual_dir when it is not built yet (with the
ADNet / STAR metadata train.tsv / test.tsv there, as behind the published numbers). --pytorch converts
an official checkpoint (its `net`, what the official tester evaluates); --checkpoint is one of ours:
its best checkpoint by the official protocol, with the weights that won there (--step and --weights
choose others). The table names the step and weights scored and whether they are the best by the
official protocol. Prints and writes OUT/reproduce.md and OUT/reproduce.json: for every published
row (overall and per subset, each normalisation the paper reports) the published value, ours, the
difference, and the verdict against the tolerance (default: the paper's rounding, which a converted
official checkpoint on the official metadata must reach). Exit status 0 when every row is reproduced,
3 when some differ.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

from absl import flags

from star_jax import cli

CONFIGS = {'wflw': 'configs/wflw.py', '300w': 'configs/300w.py', 'cofw': 'configs/cofw.py'}


def _tolerances(text: str) -> dict:
  out = {}
  for item in filter(None, (text or '').split(',')):
    key, _, value = item.partition('=')
    if key not in ('nme', 'fr', 'auc'):
      raise flags.Error(f'--tolerance: unknown metric {key!r} (nme, fr, auc)')
    try:
      out[key] = float(value)
    except ValueError:
      raise flags.Error(f'--tolerance: {item!r} is not metric=number') from None
  return out


def _reproduce(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv, config='optional')
  fv = command.fv
  flags.DEFINE_enum('dataset', None, sorted(CONFIGS), 'the dataset whose published table to reproduce',
                    flag_values=fv)
  flags.DEFINE_string('manual_dir', '', 'folder of the hand-downloaded raw files (to build the dataset)',
                      flag_values=fv)
  flags.DEFINE_string('data_dir', None, "TFDS data dir (default: the config's)", flag_values=fv)
  flags.DEFINE_string('pytorch', None, 'official PyTorch STAR checkpoint (.pkl)', flag_values=fv)
  flags.DEFINE_string('checkpoint', None, 'star_jax checkpoint directory or training workdir', flag_values=fv)
  flags.DEFINE_string('step', None, "--checkpoint: 'best' (the default), 'latest' or a step number", flag_values=fv)
  flags.DEFINE_enum('weights', None, ['model', 'ema'], "--checkpoint: the weights (default: those that won the "
                    "step's evaluation); --pytorch: model is the .pkl's net (the default), ema its net_ema",
                    flag_values=fv)
  flags.DEFINE_string('output', 'reproduce', 'where the table goes', flag_values=fv)
  flags.DEFINE_string('tolerance', '', "metric=allowed difference, paper units (default: the paper's "
                      'rounding, nme=0.005,fr=0.005,auc=0.0005)', flag_values=fv)
  rest = command.parse()
  if rest:
    raise flags.Error(f'unexpected arguments: {" ".join(rest)}')
  command.require('dataset')
  if bool(fv.pytorch) == bool(fv.checkpoint):
    raise cli.UserError('give exactly one of --pytorch FILE.pkl and --checkpoint DIR')
  tolerance = _tolerances(fv.tolerance)

  from star_jax import config_lib  # pylint: disable=import-outside-toplevel
  from star_jax import convert_pytorch  # pylint: disable=import-outside-toplevel
  from star_jax.data import build  # pylint: disable=import-outside-toplevel
  from star_jax.evaluation import report  # pylint: disable=import-outside-toplevel
  from star_jax.evaluation import reproduce  # pylint: disable=import-outside-toplevel
  from star_jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
  from star_jax.layouts import get_layout  # pylint: disable=import-outside-toplevel
  from star_jax import checkpoints  # pylint: disable=import-outside-toplevel

  cli.setup_logging('error')
  config = command.config if command.config is not None else config_lib.load_config(CONFIGS[fv.dataset])
  if fv.data_dir is not None:
    config.data.data_dir = fv.data_dir
  if fv.manual_dir:
    config.data.manual_dir = fv.manual_dir
  layout = get_layout(config.layout)

  # ---- The dataset: built when missing ----
  try:
    source = build.load_source(config.data, config.data.test_split, build_if_missing=True, layout=config.layout)
  except (FileNotFoundError, ImportError, ValueError) as e:
    raise cli.UserError(str(e)) from None

  # ---- The model: converted, or ours ----
  with tempfile.TemporaryDirectory(prefix='star_jax_reproduce_') as tmp:
    directory, step, weights = fv.checkpoint, fv.step or 'best', fv.weights
    if fv.pytorch:
      if fv.step is not None:
        raise cli.UserError('--step is for --checkpoint; an official .pkl holds one network')
      if not os.path.isfile(fv.pytorch):
        raise cli.UserError(f'PyTorch checkpoint {fv.pytorch} does not exist')
      directory = os.path.join(tmp, 'converted')
      official = 'net_ema' if fv.weights == 'ema' else 'net'
      try:
        # The official tester evaluates `net` of best_model.pkl.
        convert_pytorch.convert_checkpoint(fv.pytorch, config, directory, weights=official)
      except (ValueError, OSError, KeyError) as e:
        raise cli.UserError(f'cannot convert {fv.pytorch} for the {config.layout} config: {e}') from None
      step, weights = 'latest', 'model'
    try:
      loaded = checkpoints.load_model(directory, step=checkpoints.parse_step(step), weights=weights)
      checkpoints.check_compatible(loaded.config, config)
    except (FileNotFoundError, ValueError) as e:
      raise cli.UserError(f'cannot use the checkpoint: {e}') from None

  # ---- Evaluate once; score every published row ----
  results = scoring.evaluate_model(loaded.model, config, source)
  table = reproduce.rows(results, layout, config, tolerance)
  if not table:
    raise cli.UserError(f'no published numbers for {config.data.name!r} in the {layout.name} layout')
  markdown = reproduce.markdown(table)
  if fv.pytorch:
    chosen = {'step': None, 'weights': official, 'best_by_protocol': official == 'net',
              'chosen_by': "the .pkl's net, what the official tester evaluates" if official == 'net' else
              "the .pkl's net_ema, as asked", 'best': None}
    what = f'{fv.pytorch} ({official}{report.selection_note(chosen)})'
  else:
    chosen = loaded.describe()
    what = f'{fv.checkpoint} (step {loaded.step}, {loaded.weights} weights{report.selection_note(chosen)})'
  text = (f'# Reproducing the published {layout.name} table\n\n- model: {what}\n- data: {config.data.name} '
          f'{config.data.test_split}, {len(results["pred"])} images\n\n{markdown}\n')
  out = pathlib.Path(fv.output)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'reproduce.md').write_text(text)
  (out / 'reproduce.json').write_text(json.dumps({
      'model': what, **chosen, 'dataset': str(config.data.name),
      'num_images': int(len(results['pred'])),
      'rows': [dict(vars(r), difference=r.difference, verdict=r.verdict) for r in table]}, indent=1))
  print(text)
  ok = reproduce.all_reproduced(table)
  print('every published row reproduced' if ok else 'some rows differ beyond the tolerance')
  return 0 if ok else 3


def main(argv=None) -> int:
  return cli.guarded(_reproduce, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
