"""Evaluate a checkpoint on a dataset's test split: NME, FR and AUC overall and per subset.

  python scripts/evaluate.py --config configs/wflw.py --checkpoint DIR [--norm ocular|pupil]
      [--use_ema|--nouse_ema] [--step N] [--output OUT]
  python scripts/evaluate.py --config configs/wflw.py --pytorch WFLW_STARLoss_NME_4_02_FR_2_32_AUC_0_605.pkl

--checkpoint is a star_jax checkpoint directory (trained here, or written by
`python -m star_jax.convert_pytorch`); --pytorch converts an official PyTorch checkpoint on the fly
(into a temporary folder; PyTorch is not needed). The dataset comes from the config and can be
changed from the command line, e.g. `--config.data.data_dir=~/tensorflow_datasets`,
`--config.data.max_eval_examples=100`, `--config.eval_batch_size=16`.

Scores are the official tester's: the last stack's landmarks against the ground truth in the
normalised crop frame, NME normalised by the inter-ocular (or inter-pupil) distance; FR and AUC at the
layout's threshold (0.1; 0.05 for 300W), AUC by Simpson's rule on a 1e-4 grid. The published numbers
of the official PyTorch models (paper Tables 1-3) are shown beside ours when the dataset is the real
one. NME and FR are printed in percent, AUC as a fraction, as in the paper.

Writes to OUT (default: next to the checkpoint, '<checkpoint>_eval'):
  report.md        the table, with the run's details
  metrics.json     everything in the table, machine-readable, plus images/s
  ced.png          cumulative error distribution, overall and per subset
  predictions.json per image: image_name, landmarks (x, y) in original image pixels (prediction
                   and ground truth) and its NME
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import sys
import tempfile
import time

from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

# The published numbers are tied to the real datasets, not to a layout (synthetic faces use layouts too).
REAL_DATASETS = {'wflw': 'WFLW', 'the300w': '300W', 'cofw': 'COFW'}
ALL = 'all'  # the name of the whole split in the tables (300W calls it 'full')


class EvaluationError(Exception):
  """A problem the user can fix (missing checkpoint, mismatched config, dataset not built)."""


# ---- Command line -------------------------------------------------------------------------------

def parse_flags(argv):
  """Parses `argv` (program name first) into its own FlagValues, so main() can run more than once in
  one process (tests) and importing this file defines no global flags."""
  fv = flags.FlagValues()
  config = config_flags.DEFINE_config_file('config', None, 'experiment config file (configs/*.py[:arg])',
                                           flag_values=fv, sys_argv=list(argv), lock_config=False)
  flags.DEFINE_string('checkpoint', None, 'star_jax checkpoint directory (or a training workdir holding '
                      'checkpoints/)', flag_values=fv)
  flags.DEFINE_string('pytorch', None, 'official PyTorch STAR checkpoint (.pkl), converted on the fly',
                      flag_values=fv)
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)', flag_values=fv)
  flags.DEFINE_enum('norm', None, ['ocular', 'pupil'],
                    "NME normalisation (default: the layout's: ocular for WFLW and 300W, pupil for COFW)",
                    flag_values=fv)
  flags.DEFINE_bool('use_ema', None, 'evaluate the EMA weights when the checkpoint has them (default: yes '
                    "for --checkpoint; for --pytorch the official tester's choice, 'net', i.e. no)",
                    flag_values=fv)
  flags.DEFINE_string('output', None, "where the report goes (default '<checkpoint>_eval')", flag_values=fv)
  flags.DEFINE_bool('progress', True, 'show a progress bar', flag_values=fv)
  if any(a in ('-h', '--help', '--helpfull') for a in argv[1:]):
    print(__doc__)
    print(fv.get_help())
    raise SystemExit(0)
  fv(list(argv))
  if config.value is None:
    raise EvaluationError('--config is required (e.g. --config configs/wflw.py)')
  if bool(fv.checkpoint) == bool(fv.pytorch):
    raise EvaluationError('give exactly one of --checkpoint DIR (a star_jax checkpoint) and --pytorch FILE.pkl '
                          '(an official PyTorch checkpoint)')
  return fv, config.value


# ---- Checkpoint ---------------------------------------------------------------------------------

def _latest_step_dir(directory: pathlib.Path, step: int | None) -> pathlib.Path | None:
  steps = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
  if not steps:
    return None
  return directory / str(step if step is not None else steps[-1])


def load_checkpoint(directory: str, step: int | None, use_ema: bool):
  """(model, stored config, step, which weights: 'ema' or 'model'); EvaluationError when missing."""
  from star_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from star_jax import predict  # pylint: disable=g-import-not-at-top

  if not pathlib.Path(directory).is_dir():
    raise EvaluationError(f'checkpoint directory {directory} does not exist')
  path = predict.resolve_checkpoint_dir(directory)  # a training workdir works too
  try:
    model, stored = checkpointing.load_model(path, step=step, use_ema=use_ema)
  except (FileNotFoundError, ValueError) as e:
    raise EvaluationError(f'cannot load the checkpoint {directory}: {e}') from None
  step_dir = _latest_step_dir(path, step)
  weights = 'ema' if use_ema and step_dir is not None and (step_dir / 'ema').exists() else 'model'
  return model, stored, (int(step_dir.name) if step_dir is not None else step), weights


def check_compatible(stored, config, where: str) -> None:
  """The checkpoint must predict the config's layout, at the config's input size."""
  from star_jax import layouts  # pylint: disable=g-import-not-at-top

  want, have = layouts.get_layout(config.layout), layouts.get_layout(stored.layout)
  if want.name != have.name or want.num_points != have.num_points:
    raise EvaluationError(
        f'{where} predicts the {have.name} layout ({have.num_points} points), but the config evaluates '
        f'{config.data.name!r} in the {want.name} layout ({want.num_points} points): pass the config of the '
        f'dataset the checkpoint was trained on')
  if int(stored.data.image_size) != int(config.data.image_size):
    raise EvaluationError(
        f'{where} was trained on {stored.data.image_size}x{stored.data.image_size} crops, but the config '
        f'crops {config.data.image_size}x{config.data.image_size}: add '
        f'--config.data.image_size={stored.data.image_size}')


def convert_pytorch(pkl: str, config, use_ema: bool, into: str) -> str:
  """Converts an official checkpoint into `into` (net_ema with use_ema, else net); returns the directory."""
  from star_jax import convert_pytorch as converter  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(pkl):
    raise EvaluationError(f'PyTorch checkpoint {pkl} does not exist')
  try:
    converter.convert_checkpoint(pkl, config, into, weights='net_ema' if use_ema else 'net')
  except (ValueError, OSError, KeyError) as e:
    raise EvaluationError(f'cannot convert {pkl} for the {config.layout} config: {e}') from None
  return into


# ---- Scores -------------------------------------------------------------------------------------

def published_numbers(config, norm: str) -> dict[str, dict[str, float]]:
  """subset -> {'nme', 'fr', 'auc'} (paper units: NME and FR in %) of the official models, for the
  real dataset of `config` and the normalisation `norm`; {} for other datasets."""
  from star_jax import layouts  # pylint: disable=g-import-not-at-top

  name = REAL_DATASETS.get(str(config.data.name))
  if name is None or name != layouts.get_layout(config.layout).name:
    return {}
  out: dict[str, dict[str, float]] = {}
  for key, value in layouts.PUBLISHED.get(name, {}).get(norm, {}).items():
    if key in ('nme', 'fr', 'auc'):
      out.setdefault(ALL, {})[key] = value
    elif key == 'full':
      out.setdefault(ALL, {})['nme'] = value
    else:  # a subset's NME (300W common / challenge)
      out.setdefault(key, {})['nme'] = value
  return out


def subset_rows(summary: dict, layout) -> list[dict]:
  """Rows of the table from `metrics.summarize`'s flat dict: the whole split, then each attribute
  subset (images whose flag is 1; 300W: common, challenge). Each row: 'subset', 'num_images', 'nme'
  and 'fr' in %, 'auc' as a fraction (NaN for an empty subset)."""
  def row(name, prefix):
    return {'subset': name, 'num_images': int(summary[f'{prefix}count']), 'nme': 100.0 * summary[f'{prefix}nme'],
            'fr': 100.0 * summary[f'{prefix}fr'], 'auc': float(summary[f'{prefix}auc'])}

  rows = [row(ALL, '')]
  rows += [row(name, f'{name}/') for name in layout.attributes if f'{name}/count' in summary]
  return rows


def _fmt(value, digits: int) -> str:
  if value is None:
    return ''
  if isinstance(value, float) and not np.isfinite(value):
    return 'n/a'
  return f'{value:.{digits}f}'


def markdown_table(rows: list[dict], published: dict, threshold: float) -> str:
  pct = f'{threshold:g}'
  head = ['subset', 'images', 'NME %', f'FR@{pct} %', f'AUC@{pct}']
  if published:
    head += ['paper NME %', f'paper FR@{pct} %', f'paper AUC@{pct}']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['subset'], str(r['num_images']), _fmt(r['nme'], 3), _fmt(r['fr'], 2), _fmt(r['auc'], 4)]
    if published:
      p = published.get(r['subset'], {})
      cells += [_fmt(p.get('nme'), 2), _fmt(p.get('fr'), 2), _fmt(p.get('auc'), 3)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


# ---- Files --------------------------------------------------------------------------------------

def image_names(source, indices: np.ndarray) -> list[str]:
  """The 'image_name' of each record at `indices`, without decoding the images when the source is a
  TFDS data source (its image decoder is swapped for SkipDecoding)."""
  reader = source
  if dataclasses.is_dataclass(source) and hasattr(source, 'decoders'):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      reader = dataclasses.replace(source, decoders={'image': tfds.decode.SkipDecoding()})
    except (TypeError, ValueError, ImportError):
      reader = source
  names = []
  for i in indices:
    name = reader[int(i)].get('image_name', str(int(i)))
    names.append(name.decode('utf-8') if isinstance(name, bytes) else str(name))
  return names


def write_predictions(path: pathlib.Path, names: list[str], results: dict, nmes: np.ndarray) -> None:
  records = [{'image_name': name, 'index': int(i), 'nme': float(nme),
              'landmarks': np.round(pred.astype(np.float64), 3).tolist(),
              'ground_truth': np.round(gt.astype(np.float64), 3).tolist()}
             for name, i, nme, pred, gt in zip(names, results['index'], nmes, results['pred_px'],
                                              results['gt_px'])]
  path.write_text(json.dumps({'coordinates': '0-based original image pixels (x, y)', 'images': records}))


def ced_curves(nmes: np.ndarray, attributes: np.ndarray | None, layout, threshold: float) -> dict:
  from star_jax import metrics  # pylint: disable=g-import-not-at-top

  curves = {f'{ALL} ({len(nmes)})': metrics.ced(nmes, threshold)}
  if attributes is not None and np.size(attributes):
    for k, name in enumerate(layout.attributes[:attributes.shape[1]]):
      members = attributes[:, k] == 1
      if members.any():
        curves[f'{name} ({int(members.sum())})'] = metrics.ced(nmes[members], threshold)
  return curves


# ---- Main ---------------------------------------------------------------------------------------

def evaluate(fv, config) -> dict:
  """Runs the evaluation described by the parsed flags; returns the metrics dict (also written)."""
  import jax  # pylint: disable=g-import-not-at-top  (after flag parsing: --help stays fast)
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from star_jax import evaluation  # pylint: disable=g-import-not-at-top
  from star_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from star_jax import layouts  # pylint: disable=g-import-not-at-top
  from star_jax import metrics  # pylint: disable=g-import-not-at-top
  from star_jax import models  # pylint: disable=g-import-not-at-top
  from star_jax import plots  # pylint: disable=g-import-not-at-top
  from star_jax import trainer  # pylint: disable=g-import-not-at-top
  from star_jax.data import build  # pylint: disable=g-import-not-at-top

  layout = layouts.get_layout(config.layout)
  norm = fv.norm or layout.default_norm
  threshold = layout.threshold

  # ---- The model ----
  with tempfile.TemporaryDirectory(prefix='star_jax_converted_') as tmp:
    if fv.pytorch:
      use_ema = bool(fv.use_ema) if fv.use_ema is not None else False
      where = f'PyTorch checkpoint {fv.pytorch}'
      checkpoint_dir = convert_pytorch(fv.pytorch, config, use_ema, os.path.join(tmp, 'checkpoint'))
    else:
      use_ema = True if fv.use_ema is None else bool(fv.use_ema)
      where = f'checkpoint {fv.checkpoint}'
      checkpoint_dir = fv.checkpoint
    model, stored, step, weights = load_checkpoint(checkpoint_dir, fv.step, use_ema)
  if fv.pytorch:
    weights = 'net_ema' if use_ema else 'net'
  check_compatible(stored, config, where)

  # ---- The data ----
  split = config.data.test_split
  try:
    source = build.load_source(config.data, split)
  except (FileNotFoundError, ImportError, ValueError) as e:
    raise EvaluationError(str(e)) from None
  num_examples = input_pipeline.num_eval_examples(config, source)

  # ---- Predict ----
  mesh = trainer.make_mesh()
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh, P()))

  @jax.jit
  def predict(state, images):
    return nnx.merge(graphdef, state)(models.preprocess(images))[-1]['landmarks']

  logging.info('evaluating %s on %s/%s %s (%d images)', where, config.data.name, config.data.config, split,
               num_examples)
  with jax.set_mesh(mesh):
    # Compile first, on a batch laid out as the real ones, so that images/s measures the evaluation.
    size = int(config.data.image_size)
    local = int(config.eval_batch_size) // jax.process_count()
    dummy = input_pipeline.to_global({'image': np.zeros((local, size, size, 3), np.uint8)}, mesh)['image']
    jax.block_until_ready(predict(state, dummy))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    results = evaluation.predict_split(lambda images: predict(state, images),
                                       input_pipeline.eval_batches(config, source), mesh,
                                       int(config.data.image_size), progress=fv.progress)
  wall = time.perf_counter() - t0
  summary = evaluation.score(results, layout, norm)
  nmes = metrics.nme_per_image(results['pred'], results['gt'], layout, norm)

  # ---- Report ----
  published = published_numbers(config, norm)
  rows = subset_rows(summary, layout)
  out_dir = pathlib.Path(fv.output or (os.path.abspath(fv.checkpoint or os.path.splitext(fv.pytorch)[0])
                                       .rstrip(os.sep) + '_eval'))
  device = f'{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})'
  info = {
      'checkpoint': os.path.abspath(fv.checkpoint) if fv.checkpoint else None,
      'pytorch': os.path.abspath(fv.pytorch) if fv.pytorch else None,
      'step': step, 'weights': weights, 'layout': layout.name, 'num_points': layout.num_points,
      'dataset': str(config.data.name), 'dataset_config': str(config.data.config), 'split': str(split),
      'data_dir': str(config.data.data_dir), 'num_images': int(len(nmes)), 'norm': norm,
      'threshold': threshold, 'image_size': int(config.data.image_size), 'device': device,
      'images_per_second_model': float(results['images_per_second']),
      'images_per_second_total': float(len(nmes) / max(wall, 1e-9)),
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
  }
  metrics_json = _jsonable({'info': info, 'rows': rows, 'published': published, 'summary': summary})
  if jax.process_index() == 0:  # every process has the full results; one writes them
    markdown = markdown_report(info, rows, published, summary.get('nme_image'))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'report.md').write_text(markdown)
    (out_dir / 'metrics.json').write_text(json.dumps(metrics_json, indent=1))
    write_predictions(out_dir / 'predictions.json', image_names(source, results['index']), results, nmes)
    plots.ced_figure(ced_curves(nmes, results.get('attributes'), layout, threshold), threshold,
                     str(out_dir / 'ced.png'),
                     title=f'CED, {config.data.name} {split} ({layout.name}, {norm} NME)')
    print(markdown)
    print(f'written: {out_dir}/report.md, metrics.json, ced.png, predictions.json')
  return metrics_json


def markdown_report(info: dict, rows: list[dict], published: dict, nme_image: float | None) -> str:
  """The report: what was evaluated, the table, how to read it."""
  norm = 'inter-ocular' if info['norm'] == 'ocular' else 'inter-pupil'
  notes = [f'NME: mean point error / {norm} distance, in the normalised crop frame as the official tester '
           'computes it' + (f'; in original image pixels it is {100 * nme_image:.3f} %' if nme_image is not None
                            else '') + '.',
           f'FR and AUC at NME threshold {info["threshold"]:g} (AUC: Simpson\'s rule on a 1e-4 grid).',
           f'Speed: {info["images_per_second_model"]:.1f} images/s for the model alone, '
           f'{info["images_per_second_total"]:.1f} images/s with data loading, on {info["device"]}.']
  if published:
    notes.append('paper: the official PyTorch models (STAR, CVPR 2023, Tables 1-3).')
  split = f'{info["dataset"]}/{info["dataset_config"] or "default"} split {info["split"]!r}'
  return '\n'.join([
      f'# Evaluation of {info["pytorch"] or info["checkpoint"]}',
      '',
      f'- weights: {info["weights"]} (step {info["step"]})',
      f'- data: {split}, {info["num_images"]} images, layout {info["layout"]} ({info["num_points"]} points)',
      f'- date: {info["date"]}',
      '',
      markdown_table(rows, published, info['threshold']),
      '',
      *[f'- {n}' for n in notes],
      '',
  ])


def _jsonable(tree):
  if isinstance(tree, dict):
    return {str(k): _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_jsonable(v) for v in tree]
  if isinstance(tree, np.ndarray):
    return tree.tolist()
  if isinstance(tree, (np.floating, np.integer)):
    tree = tree.item()
  if isinstance(tree, float) and not np.isfinite(tree):
    return None  # JSON has no NaN (an empty subset)
  return tree


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    fv, config = parse_flags(argv)
    # Orbax warns about harmless details of read-only restores; keep the report readable.
    logging.set_verbosity(logging.ERROR)
    evaluate(fv, config)
  except EvaluationError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except flags.Error as e:
    print(f'error: {e}\n\n{__doc__}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  from star_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  cpu_tuning.reexec_with_malloc_tuning()   # huge pages for XLA's buffers (star_jax/cpu_tuning.py)
  sys.exit(main())
