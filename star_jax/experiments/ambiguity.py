"""The ambiguity study: does STAR reduce the harm of ambiguous annotation? (scripts/ambiguity_study.py)

The same small network is trained on the synthetic faces at several levels of tangential label noise
(star_jax.data.synthetic: the *train* labels slide along their curve, most on the contour and brows;
the test labels are exact), once per landmark loss and seed; each run is scored by NME on the
exact-label test split, overall and on the ambiguous points (contour and brows) against the others.

Every cell (loss, level, seed) is an ordinary training run: the study's config (configs/
ambiguity_study.py) holds the run's config (`run`), and a cell sets its loss, seed and label level and
calls the trainer (`star_jax.training.loop.train_and_evaluate`) in `<output>/runs/<cell>/`. So:
  * one dataset build: the images and exact points of the synthetic faces do not depend on the noise
    level (separate random streams), so each level re-draws the training labels of the exact build
    (`data.relabel_ambiguity`; tests/test_study.py checks this equals a build at that level);
  * the same seed gives every loss the same initial weights and the same augmented batches;
  * each loss's train step compiles once: later cells take it from JAX's persistent compilation
    cache (`<output>/jax_cache`);
  * a finished cell is not run again (its `cell.json`), and an interrupted one resumes from its
    checkpoint, so the whole study resumes where it stopped.

Fairness of the baselines: every run keeps STAR's recipe weights (1, 10, 10) for (landmark term,
AWing point maps, AWing edge maps), as the official trainer does when its `loss_func` is switched, so a
coordinate-loss baseline ('smoothl1', 'l2') differs from STAR only in the landmark term; 'none' drops
the landmark term (AWing heatmap losses alone). Without a landmark term the network's landmark
heatmaps are untrained, so 'none' runs are read from their AWing-trained point maps
(`model.decode = 'pointmaps'`); all other runs from the network's soft-argmax landmarks.

NMEs are fractions of the inter-ocular distance (outer eye corners), in the official crop frame.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import time
from typing import Any, Mapping, Sequence

import numpy as np

from star_jax import layouts
from star_jax.data import synthetic

# Points whose level-1 noise is at least this fraction of the IOD: the face contour (0.04) and the
# brows (0.03), where the synthetic annotators (like real ones) are most ambiguous.
AMBIGUOUS_FRACTION = 0.03
LOSS_LABELS = {
    'star': 'STAR (v2) + AWing',
    'star_v1': 'STAR v1 + AWing',
    'smoothl1': 'smooth-L1 coords + AWing',
    'l2': 'L2 coords + AWing',
    'none': 'AWing alone, point maps decoded',
}


def level_name(level: float) -> str:
  return f'{level:g}'


def cell_name(loss: str, level: float, seed: int) -> str:
  return f'{loss}_amb{level_name(level)}_seed{seed}'


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------

def check_study(study) -> None:
  """ValueError for a study config that cannot run (unknown loss, empty grid, bad levels)."""
  from star_jax import losses as losses_lib  # pylint: disable=import-outside-toplevel
  bad = [k for k in study.losses if k not in losses_lib.LANDMARK_LOSSES]
  if bad:
    raise ValueError(f'unknown loss {bad[0]!r}; choose from {losses_lib.LANDMARK_LOSSES}')
  if not study.levels or not study.losses or not study.seeds:
    raise ValueError('need at least one level, one loss and one seed')
  if any(level < 0 for level in study.levels):
    raise ValueError(f'ambiguity levels must be >= 0, got {tuple(study.levels)}')
  if study.run.data.name != 'synthetic_faces' or study.run.layout != 'WFLW':
    raise ValueError('the study runs on the 98-point synthetic faces (run.data.name synthetic_faces, '
                     'run.layout WFLW)')


def run_config(study, loss: str, level: float, seed: int):
  """The training config of one cell: the study's `run` with its loss, seed and label level."""
  c = study.run.copy_and_resolve_references()
  c.loss.kind = loss
  c.seed = int(seed)
  c.data.relabel_ambiguity = float(level)
  # Without a landmark term only the point maps are trained: read the landmarks from them.
  c.model.decode = 'pointmaps' if loss == 'none' else 'landmarks'
  return c


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------

def ambiguous_points() -> np.ndarray:
  """(98,) bool: the points with the largest label noise (contour and brows)."""
  return synthetic.ambiguity_fractions() >= AMBIGUOUS_FRACTION


def part_nmes(pred: np.ndarray, gt: np.ndarray, layout: layouts.Layout) -> dict[str, float]:
  """Mean error of the ambiguous points (contour, brows) and of the others, over images, / IOD.

  pred, gt: (M, 98, 2) in one frame (the normalised crop here); the IOD is the ground truth's.
  """
  left, right = layout.norm_indices('ocular')
  iod = np.linalg.norm(gt[:, left] - gt[:, right], axis=-1)                 # (M,)
  err = np.linalg.norm(pred - gt, axis=-1) / iod[:, None]                   # (M, N)
  mask = ambiguous_points()
  return {'nme_ambiguous': float(err[:, mask].mean()), 'nme_other': float(err[:, ~mask].mean())}


def _finite(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def score_checkpoint(workdir: pathlib.Path, config) -> dict:
  """NME, FR, AUC, the image-frame NME and the part NMEs of a cell's final weights on the test split."""
  import jax  # pylint: disable=import-outside-toplevel

  from star_jax import models  # pylint: disable=import-outside-toplevel
  from star_jax.data import build  # pylint: disable=import-outside-toplevel
  from star_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from star_jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
  from star_jax.training import checkpoints  # pylint: disable=import-outside-toplevel
  from star_jax.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel

  layout = layouts.get_layout(config.layout)
  loaded = checkpoints.load_model(workdir, weights='model')
  graph, params, batch_stats = models.split(loaded.model)
  predict = jax.jit(models.make_predict_fn(graph, decode=config.model.decode))
  mesh = mesh_lib.make_mesh()
  source = build.load_source(config.data, config.data.test_split, layout=config.layout)
  with jax.set_mesh(mesh):
    results = scoring.predict_split(lambda images: predict(params, batch_stats, images),
                                    pipeline.eval_batches(config, source), mesh, int(config.data.image_size))
  summary = scoring.score(results, layout)
  parts = part_nmes(results['pred'], results['gt'], layout)
  return {'nme': _finite(summary['nme']), 'nme_ambiguous': _finite(parts['nme_ambiguous']),
          'nme_other': _finite(parts['nme_other']), 'fr': _finite(summary['fr']),
          'auc': _finite(summary['auc']), 'nme_image': _finite(summary['nme_image'])}


def _final_train_loss(workdir: pathlib.Path, window: int) -> float | None:
  """Mean of the last `window` logged training losses (metrics.jsonl)."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return None
  values = [json.loads(line)['train/loss'] for line in path.read_text().splitlines()
            if line.strip() and 'train/loss' in line]
  return _finite(np.mean(values[-window:])) if values else None


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------

def _fmt_time(seconds: float) -> str:
  seconds = max(0.0, seconds)
  return f'{seconds / 60:.1f} min' if seconds >= 90 else f'{seconds:.0f} s'


def run_cell(study, loss: str, level: float, seed: int, output: pathlib.Path, log=print) -> dict:
  """Trains and scores one cell (or reads its record when it is finished); returns the record."""
  from star_jax.training import loop  # pylint: disable=import-outside-toplevel

  workdir = output / 'runs' / cell_name(loss, level, seed)
  record_path = workdir / 'cell.json'
  if record_path.exists():
    log(f'  {cell_name(loss, level, seed)}: done earlier ({record_path})')
    return json.loads(record_path.read_text())
  config = run_config(study, loss, level, seed)
  t0 = time.perf_counter()
  diverged = False
  final: dict = {}
  try:
    final = loop.train_and_evaluate(config, str(workdir))
  except loop.NonFiniteLossError as e:
    log(f'  {cell_name(loss, level, seed)}: diverged ({e})')
    diverged = True
  train_wall = time.perf_counter() - t0
  t1 = time.perf_counter()
  scores = ({k: None for k in ('nme', 'nme_ambiguous', 'nme_other', 'fr', 'auc', 'nme_image')} if diverged
            else score_checkpoint(workdir, config))
  record = {
      'loss': loss, 'level': float(level), 'seed': int(seed), 'decoded_from': config.model.decode, **scores,
      'final_train_loss': _final_train_loss(workdir, int(config.log_every_steps)),
      'diverged': diverged,
      'compile_seconds': final.get('seconds/first_step'),
      'train_seconds': (final.get('seconds/loop', train_wall) - final.get('seconds/first_step', 0.0)
                        - final.get('seconds/eval', 0.0)),
      'eval_seconds': time.perf_counter() - t1,
  }
  tmp = record_path.with_suffix('.tmp')
  tmp.write_text(json.dumps(record, indent=1))
  os.replace(tmp, record_path)
  nme = 'n/a' if record['nme'] is None else f"{100 * record['nme']:.2f}%"
  amb = 'n/a' if record['nme_ambiguous'] is None else f"{100 * record['nme_ambiguous']:.2f}%"
  log(f'  {loss:9s} level {level_name(level)} seed {seed}: NME {nme} (contour+brows {amb}); '
      f'trained in {_fmt_time(record["train_seconds"])}')
  return record


def run_study(study, output: pathlib.Path, log=print) -> dict:
  """Runs every (seed, level, loss) cell, writes results.json, results.md and nme_vs_ambiguity.png
  into `output`; returns the JSON document."""
  check_study(study)
  import jax  # pylint: disable=import-outside-toplevel

  from star_jax.data import build  # pylint: disable=import-outside-toplevel

  t_start = time.perf_counter()
  output.mkdir(parents=True, exist_ok=True)
  # Each loss's train step is the same program at every level and seed: compile it once.
  jax.config.update('jax_compilation_cache_dir', str(output / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  cells = [(seed, level, loss) for seed in study.seeds for level in study.levels for loss in study.losses]
  log(f'ambiguity study: levels {[level_name(v) for v in study.levels]}, losses {list(study.losses)}, '
      f'seeds {list(study.seeds)}: {len(cells)} runs of {study.run.total_steps} steps x {study.run.batch_size} '
      f'on {jax.device_count()} {jax.devices()[0].platform} device(s)')

  # ---- Data: the one exact-label build (a no-op when it exists) ------------------------------------
  t0 = time.perf_counter()
  data = study.run.data
  builder = build.get_builder(data.name, config=data.config, data_dir=data.data_dir)
  if not builder.is_prepared():
    log(f'building {data.name}/{data.config} in {builder.data_dir} ...')
    builder.download_and_prepare()
  build_seconds = time.perf_counter() - t0
  splits = builder.info.splits
  log(f'data: {splits["train"].num_examples} train / {splits["test"].num_examples} test faces '
      f'({data.config} in {builder.data_dir}), ready in {_fmt_time(build_seconds)}')

  records = []
  for k, (seed, level, loss) in enumerate(cells):
    log(f'[{k + 1}/{len(cells)}] {cell_name(loss, level, seed)}')
    records.append(run_cell(study, loss, level, seed, output, log))

  doc = {
      'study': json.loads(study.to_json_best_effort()),
      'levels': list(study.levels), 'losses': list(study.losses), 'seeds': list(study.seeds),
      'dataset': {'builder_config': data.config, 'data_dir': str(builder.data_dir),
                  'num_train': splits['train'].num_examples, 'num_test': splits['test'].num_examples,
                  'seconds': build_seconds},
      'device': f'{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.machine()}, '
                f'{jax.default_backend()}, {os.cpu_count()} CPUs)',
      'loss_weights': list(study.run.loss.weights),
      'compile_seconds': {loss: max((r['compile_seconds'] or 0.0) for r in records if r['loss'] == loss)
                          for loss in study.losses},
      'total_seconds': time.perf_counter() - t_start,
      'runs': records,
      # {loss: {level: [mean, std over seeds]}}; null where a run diverged.
      'nme': _json_table(aggregate(records, study, 'nme')),
      'nme_ambiguous': _json_table(aggregate(records, study, 'nme_ambiguous')),
      'nme_other': _json_table(aggregate(records, study, 'nme_other')),
  }
  write_outputs(doc, output, log)
  return doc


# ------------------------------------------------------------------------------------------------
# Tables and plots
# ------------------------------------------------------------------------------------------------

def aggregate(records: Sequence[Mapping[str, Any]], grid, key: str) -> dict:
  """{loss: {level name: (mean, std over seeds)}} of `key` (NaN / None where a run diverged).
  `grid` has `losses` and `levels` (the study config, or its JSON document)."""
  out = {}
  for loss in _get(grid, 'losses'):
    out[loss] = {}
    for level in _get(grid, 'levels'):
      values = [r[key] for r in records if r['loss'] == loss and r['level'] == level]
      values = np.array([np.nan if v is None else v for v in values], np.float64)
      if values.size == 0:
        continue
      out[loss][level_name(level)] = (float(values.mean()), float(values.std()) if values.size > 1 else 0.0)
  return out


def _get(grid, key):
  return grid[key] if isinstance(grid, Mapping) else getattr(grid, key)


def _json_table(table: dict) -> dict:
  return {loss: {level: [_finite(v) for v in stat] for level, stat in row.items()} for loss, row in table.items()}


def markdown_tables(records, grid) -> str:
  """The result tables (NME in % of the IOD; mean ± std over seeds when there are several)."""
  levels, losses, seeds = _get(grid, 'levels'), _get(grid, 'losses'), _get(grid, 'seeds')
  several = len(seeds) > 1
  first, last = level_name(levels[0]), level_name(levels[-1])

  def cell(stat):
    mean, std = stat
    if not math.isfinite(mean):
      return 'diverged'
    return f'{100 * mean:.2f} ± {100 * std:.2f}' if several else f'{100 * mean:.2f}'

  lines = []
  for key, title in (('nme', 'NME (%), all 98 points'),
                     ('nme_ambiguous', 'NME (%), contour and brows (the most ambiguous points)'),
                     ('nme_other', 'NME (%), the other points')):
    table = aggregate(records, grid, key)
    head = ['loss'] + [f'level {level_name(v)}' for v in levels]
    if len(levels) > 1:
      head.append(f'increase {first} → {last}')
    lines += [f'**{title}**', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for loss in losses:
      row = [f'{loss} ({LOSS_LABELS.get(loss, loss)})']
      row += [cell(table[loss][level_name(v)]) for v in levels]
      if len(levels) > 1:
        delta = table[loss][last][0] - table[loss][first][0]
        row.append(f'{100 * delta:+.2f}' if math.isfinite(delta) else 'n/a')
      lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
  seconds = {loss: np.mean([r['train_seconds'] for r in records if r['loss'] == loss]) for loss in losses}
  lines.append('Training time per run (s, excluding compilation): ' +
               ', '.join(f'{loss} {seconds[loss]:.0f}' for loss in losses) + '.')
  return '\n'.join(lines) + '\n'


def plot(records, grid, path: pathlib.Path, title: str = '') -> None:
  """Three panels against the noise level, one line per loss: the test NME of all points, and its
  increase over the first level (the harm of the ambiguity) for all points and for contour + brows.

  In the first panel a loss far worse than the others (best NME over twice the overall best) would
  squash their differences: the axis is fitted to the others and its legend entry gives its range;
  the harm panels, meaningless for a model that does not localise, leave it out.
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  xs = list(_get(grid, 'levels'))
  losses = list(_get(grid, 'losses'))
  several = len(_get(grid, 'seeds')) > 1

  def curve(key, loss, relative):
    table = aggregate(records, grid, key)[loss]
    mean = np.array([100 * table[level_name(v)][0] for v in xs])
    std = np.array([100 * table[level_name(v)][1] for v in xs])
    return (mean - mean[0] if relative else mean), std

  absolute = {loss: curve('nme', loss, False)[0] for loss in losses}
  floor = np.nanmin([np.nanmin(m) for m in absolute.values()])
  off_scale = {loss for loss, m in absolute.items() if np.nanmin(m) > 2 * floor}
  fig = Figure(figsize=(15, 4.6), layout='constrained')
  axes = fig.subplots(1, 3)
  panels = ((axes[0], 'nme', False, 'test NME, all 98 points', 'NME (% of inter-ocular distance)'),
            (axes[1], 'nme', True, 'harm of the ambiguity, all 98 points', f'NME - NME at level {level_name(xs[0])} (%)'),
            (axes[2], 'nme_ambiguous', True, 'harm of the ambiguity, contour and brows',
             f'NME - NME at level {level_name(xs[0])} (%)'))
  for ax, key, relative, panel_title, ylabel in panels:
    if not relative and off_scale:
      shown = np.concatenate([m for loss, m in absolute.items() if loss not in off_scale])
      if np.isfinite(shown).any():
        lo, hi = np.nanmin(shown), np.nanmax(shown)
        pad = max(0.5, 0.15 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    for i, loss in enumerate(losses):
      if relative and loss in off_scale:
        continue
      mean, std = curve(key, loss, relative)
      label = LOSS_LABELS.get(loss, loss)
      if loss in off_scale:
        label += f' (off scale: {np.nanmin(mean):.0f}-{np.nanmax(mean):.0f}%; not in the other panels)'
      ax.errorbar(xs, mean, yerr=std if several and not relative else None, marker='o', capsize=3, label=label,
                  color=f'C{i}')
    if relative:
      ax.axhline(0.0, color='grey', lw=0.8)
    ax.set_xlabel('label ambiguity level (train labels; test labels exact)')
    ax.set_ylabel(ylabel)
    ax.set_title(panel_title)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
  fig.legend(*axes[0].get_legend_handles_labels(), loc='outside lower center', ncol=len(losses), fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=100)


def _plot_title(doc: Mapping[str, Any]) -> str:
  run = doc.get('study', {}).get('run', {})
  seeds = doc['seeds']
  which = f'mean of {len(seeds)} seeds' if len(seeds) > 1 else f'seed {seeds[0]}'
  if not run:
    return f'Synthetic faces, {which}'
  return (f"Synthetic faces: {run['total_steps']} steps x {run['batch_size']}, {run['data']['image_size']} px, "
          f"nstack {run['model']['nstack']}, {run['model']['channels']} ch, {which}")


def write_outputs(doc: Mapping[str, Any], output: pathlib.Path, log=print) -> None:
  """results.json, results.md and nme_vs_ambiguity.png of a study document, into `output`."""
  md = markdown_tables(doc['runs'], doc)
  md += (f"\nTotal {_fmt_time(doc['total_seconds'])} on {doc['device']} (dataset "
         f"{_fmt_time(doc['dataset']['seconds'])}, compilation {_fmt_time(sum(doc['compile_seconds'].values()))}).\n")
  (output / 'results.json').write_text(json.dumps(doc, indent=1, allow_nan=False))
  (output / 'results.md').write_text(md)
  plot(doc['runs'], doc, output / 'nme_vs_ambiguity.png', _plot_title(doc))
  log('\n' + md)
  log(f'wrote {output / "results.md"}, {output / "results.json"}, {output / "nme_vs_ambiguity.png"}')


def replot(output: pathlib.Path, log=print) -> dict:
  """Rewrites the table and plot of a finished study from its results.json (no training)."""
  path = output / 'results.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: run the study first (without --replot)')
  doc = json.loads(path.read_text())
  write_outputs(doc, output, log)
  return doc
