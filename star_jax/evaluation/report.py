"""What an evaluation writes: the table beside the published numbers, the markdown report, per-image
predictions, and the CED curves. Pure functions of the scores; no model, no data loading.

Units: inside star_jax NME / FR are fractions; the tables print NME and FR in percent and AUC as a
fraction, as the paper does.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from star_jax import metrics
from star_jax.layouts import Layout
from star_jax.layouts import get_layout

ALL = 'all'  # the name of the whole split in the tables (300W calls it 'full')

# Published numbers of the official PyTorch STAR models (CVPR 2023 paper; the official README's results
# table gives WFLW NME / FR@10% / AUC@10%, COFW inter-pupil NME and 300W inter-ocular NME; the 300W
# inter-pupil and COFW inter-ocular NMEs are the paper's other rows), for side-by-side reports.
# NME and FR in %, AUC as a fraction, rounded as published.
PUBLISHED = {
    'WFLW': {'ocular': {'nme': 4.02, 'fr': 2.32, 'auc': 0.605}},
    '300W': {'ocular': {'full': 2.87, 'common': 2.52, 'challenge': 4.32},
             'pupil': {'full': 4.03, 'common': 3.50, 'challenge': 6.22}},
    'COFW': {'pupil': {'nme': 4.62}, 'ocular': {'nme': 3.21}},
}
# The published numbers are tied to the real datasets, not to a layout (synthetic faces use layouts too).
REAL_DATASETS = {'wflw': 'WFLW', 'the300w': '300W', 'the300vw': '300VW', 'cofw': 'COFW'}


def published_numbers(config, norm: str) -> dict[str, dict[str, float]]:
  """subset -> {'nme', 'fr', 'auc'} (paper units: NME and FR in %) of the official models, for the
  real dataset of `config` (config.data.name, in config.layout) and the normalisation `norm`; {} for
  other datasets."""
  name = REAL_DATASETS.get(str(config.data.name))
  if name is None or name != get_layout(config.layout).name:
    return {}
  out: dict[str, dict[str, float]] = {}
  for key, value in PUBLISHED.get(name, {}).get(norm, {}).items():
    if key in ('nme', 'fr', 'auc'):
      out.setdefault(ALL, {})[key] = value
    elif key == 'full':
      out.setdefault(ALL, {})['nme'] = value
    else:  # a subset's NME (300W common / challenge)
      out.setdefault(key, {})['nme'] = value
  return out


def subset_rows(summary: dict, layout: Layout) -> list[dict]:
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


def temporal_tables(summary: list[dict], videos: list[dict]) -> str:
  """The temporal-stability section: means per subset, then one row per video (temporal.py)."""
  def cells(r):
    return [str(r['frames']), _fmt(100 * r['nme'], 3), _fmt(100 * r['nme_change'], 3), _fmt(100 * r['jitter'], 3)]
  head = ['frames', 'NME %', 'NME change %', 'jitter %']
  lines = ['## Temporal stability', '',
           'Per video, over consecutive annotated frames: NME change = mean |NME(t) - NME(t-1)|; jitter = mean '
           'point distance between the error vectors (prediction - ground truth) of frames t-1 and t, over the '
           'normalising distance. Lower is steadier. NME here is in frame pixels, the mean over a video\'s '
           'frames; subsets average their videos.', '',
           '| subset | videos | ' + ' | '.join(head) + ' |', '|' + '---|' * (len(head) + 2)]
  lines += ['| ' + ' | '.join([r['subset'], str(r['videos']), *cells(r)]) + ' |' for r in summary]
  lines += ['', '| video | subset | ' + ' | '.join(head) + ' |', '|' + '---|' * (len(head) + 2)]
  lines += ['| ' + ' | '.join([r['video'], r['subset'], *cells(r)]) + ' |' for r in videos]
  return '\n'.join(lines)


def selection_note(info: dict) -> str:
  """'; <how the step and weights were chosen>, <whether they are the best by the official protocol>'
  for a report line ('' when `info` does not say)."""
  parts = [info['chosen_by']] if info.get('chosen_by') else []
  best = info.get('best')
  if info.get('best_by_protocol') is True and not info.get('chosen_by', '').startswith('the best checkpoint'):
    parts.append('the best by the official protocol')
  elif info.get('best_by_protocol') is False and best:
    parts.append(f'not the best by the official protocol, which is step {best["step"]} with the '
                 f'{best["weights"]} weights')
  return '; ' + '; '.join(parts) if parts else ''


def markdown_report(info: dict, rows: list[dict], published: dict, nme_image: float | None,
                    temporal: dict | None = None) -> str:
  """The report: what was evaluated, the table, how to read it; with `temporal` ({'summary',
  'videos'}, for video datasets) the temporal-stability tables."""
  norm = 'inter-ocular' if info['norm'] == 'ocular' else 'inter-pupil'
  notes = [f'NME: mean point error / {norm} distance, in the normalised crop frame as the official tester '
           'computes it' + (f'; in original image pixels it is {100 * nme_image:.3f} %' if nme_image is not None
                            else '') + '.',
           f'FR and AUC at NME threshold {info["threshold"]:g} (AUC: Simpson\'s rule on a 1e-4 grid).',
           f'Speed: {info["images_per_second_model"]:.1f} images/s for the model alone, '
           f'{info["images_per_second_total"]:.1f} images/s with data loading, on {info["device"]}.']
  if published:
    notes.append('paper: the official PyTorch models (STAR, CVPR 2023, Tables 1-3).')
  notes += info.get('notes', [])
  split = f'{info["dataset"]}/{info["dataset_config"] or "default"} split {info["split"]!r}'
  return '\n'.join([
      f'# Evaluation of {info["pytorch"] or info["checkpoint"]}',
      '',
      f'- weights: {info["weights"]} (step {info["step"]}){selection_note(info)}',
      f'- data: {split}, {info["num_images"]} images, layout {info["layout"]} ({info["num_points"]} points)',
      f'- date: {info["date"]}',
      '',
      markdown_table(rows, published, info['threshold']),
      '',
      *[f'- {n}' for n in notes],
      '',
      *([temporal_tables(temporal['summary'], temporal['videos']), ''] if temporal else []),
  ])


def record_fields(source, indices: np.ndarray, keys: tuple[str, ...]) -> dict[str, list | None]:
  """key -> [the field of each record at `indices`] (text decoded to str; None for a key the records
  lack), without decoding the images when the source is a TFDS data source (its image decoder is
  swapped for SkipDecoding)."""
  reader = source
  if dataclasses.is_dataclass(source) and hasattr(source, 'decoders'):
    try:
      reader = dataclasses.replace(source, decoders={'image': tfds.decode.SkipDecoding()})
    except (TypeError, ValueError):
      reader = source
  out: dict[str, list] = {k: [] for k in keys}
  for i in indices:
    record = reader[int(i)]
    for k in keys:
      value = record.get(k)
      out[k].append(value.decode('utf-8') if isinstance(value, bytes) else value)
  return {k: (None if any(v is None for v in values) else values) for k, values in out.items()}


def image_names(source, indices: np.ndarray) -> list[str]:
  """The 'image_name' of each record at `indices` (its position when it has none), without decoding
  the images (record_fields)."""
  names = record_fields(source, indices, ('image_name',))['image_name']
  return [str(n) for n in names] if names is not None else [str(int(i)) for i in indices]


def write_predictions(path: pathlib.Path, names: list[str], results: dict, nmes: np.ndarray,
                      extra: dict[str, list] | None = None,
                      coordinates: str = '0-based original image pixels (x, y)') -> None:
  """predictions.json: per image its name, position, NME, the `extra` fields (e.g. video and frame),
  and predicted and ground-truth landmarks in `coordinates` (0-based original image pixels)."""
  extra = extra or {}
  records = [{'image_name': name, 'index': int(i), **{k: jsonable(v[n]) for k, v in extra.items()},
              'nme': float(nme), 'landmarks': np.round(pred.astype(np.float64), 3).tolist(),
              'ground_truth': np.round(gt.astype(np.float64), 3).tolist()}
             for n, (name, i, nme, pred, gt) in enumerate(zip(names, results['index'], nmes, results['pred_px'],
                                                              results['gt_px']))]
  path.write_text(json.dumps({'coordinates': coordinates, 'images': records}))


def ced_curves(nmes: np.ndarray, attributes: np.ndarray | None, layout: Layout, threshold: float) -> dict:
  """label -> (xs, ys) CED curves: the whole split, then each non-empty attribute subset."""
  curves = {f'{ALL} ({len(nmes)})': metrics.ced(nmes, threshold)}
  if attributes is not None and np.size(attributes):
    for k, name in enumerate(layout.attributes[:attributes.shape[1]]):
      members = attributes[:, k] == 1
      if members.any():
        curves[f'{name} ({int(members.sum())})'] = metrics.ced(nmes[members], threshold)
  return curves


def jsonable(tree):
  """Nested dicts / lists of numpy values -> plain JSON values (NaN -> None: JSON has no NaN)."""
  if isinstance(tree, dict):
    return {str(k): jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [jsonable(v) for v in tree]
  if isinstance(tree, np.ndarray):
    return tree.tolist()
  if isinstance(tree, (np.floating, np.integer)):
    tree = tree.item()
  if isinstance(tree, float) and not np.isfinite(tree):
    return None  # an empty subset
  return tree
