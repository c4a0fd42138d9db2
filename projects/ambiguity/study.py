"""The ambiguity study: does STAR reduce the harm of ambiguous annotation? (`python -m projects.ambiguity.run`)

The same network is trained on the synthetic faces at several levels of tangential label noise
(star_jax.data.synthetic: the *train* labels slide along their curve, most on the contour and brows;
the test labels are exact), once per landmark loss and seed; each run is scored on the exact-label
test split: NME overall, on the ambiguous points (contour and brows) and on the others, and the
predicted covariance of every point against the true tangent of its curve (the paper's premise:
ambiguity shows up as an anisotropic distribution whose main axis follows the ambiguous direction).

Every cell (variant, level, seed) is an ordinary training run: the study's config
(projects/ambiguity/config.py) holds the run's config (`run`), and a cell sets its loss, seed and label
level and calls the trainer (`star_jax.training.loop.train_and_evaluate`) in `<output>/runs/<cell>/`.
So:
  * one dataset build: the images and exact points of the synthetic faces do not depend on the noise
    level (separate random streams), so each level re-draws the training labels of the exact build
    (`data.relabel_ambiguity`, with the noise model `data.relabel_model`: 'independent' per label,
    or 'annotators', a pool of simulated annotators with consistent habits, one per face);
  * the same seed gives every variant the same initial weights and the same augmented batches, so
    differences between cells of one seed are paired;
  * each loss's train step compiles once: later cells take it from JAX's persistent compilation
    cache (`<output>/jax_cache`);
  * a finished cell is not run again (its `cell.json`, which records the cell's config: a cell made
    with another config is an error, not silently reused), and an interrupted one resumes from its
    checkpoint, so the whole study resumes where it stopped.

The variants and the grid: `cells`. Scoring: `scoring`. Statistics and tables: `tables`. Figures:
`plots`.

Fairness of the baselines: every run keeps STAR's recipe weights (1, 10, 10) for (landmark term,
AWing point maps, AWing edge maps), as the official trainer does when its `loss_func` is switched, so a
coordinate-loss baseline ('smoothl1', 'l2') differs from STAR only in the landmark term; 'none' drops
the landmark term and is read from its AWing-trained point maps (`model.decode = 'pointmaps'`).
"""


from __future__ import annotations

import json
import os
import pathlib
import platform
import time
from typing import Any, Mapping

import jax
import numpy as np

from projects.ambiguity import plots
from projects.ambiguity import scoring
from projects.ambiguity import tables
from projects.ambiguity.cells import cell_name, cells, check_study, config_digest, level_name, run_config
from projects.ambiguity.cells import variant_loss
from star_jax.data import build
from star_jax.training import loop


class StaleCellError(ValueError):
  """A finished cell in the output folder was trained with another config than the study's."""


class CellInterruptedError(RuntimeError):
  """A cell's training was stopped before its last step (SIGTERM); the study stops, resumable."""


def _latest_step(workdir: pathlib.Path) -> int:
  """The last saved training step of a cell's workdir (0 if none)."""
  return max((int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.name.isdigit()), default=0)


def rescore_error_split(study, output: pathlib.Path, log=print) -> str:
  """Scores the tangential and normal test error (`error_split`) of every finished cell of the study
  in `output` again from its checkpoint; writes error_split.json and error_split.md there and returns
  the markdown (mean ± spread over seeds, % of IOD)."""
  output = pathlib.Path(output)
  rows = {}
  for variant, level, seed in cells(study):
    workdir = output / 'runs' / cell_name(variant, level, seed)
    if not (workdir / 'cell.json').exists():
      continue
    split = scoring.score_checkpoint(workdir, run_config(study, variant, level, seed))['error_split']
    rows.setdefault((variant, float(level)), {})[int(seed)] = split
    log(f'  {cell_name(variant, level, seed)}: ' + ', '.join(
        f"{g} {100 * v['tangential']:.2f}/{100 * v['normal']:.2f}" for g, v in split.items()))
  if not rows:
    raise FileNotFoundError(f'no finished cell in {output / "runs"}')
  table_rows = []
  for (variant, level), by_seed in rows.items():
    cols = []
    for group in scoring.GROUPS:
      for key in ('tangential', 'normal'):
        mean, spread = tables.mean_spread(np.array([100 * s[group][key] for s in by_seed.values() if group in s]))
        cols.append(f'{mean:.2f} ± {spread:.2f}')
    table_rows.append([variant, level_name(level), *cols])
  lines = tables.table('Test error along / across the true tangent', [
      'variant', 'level', *(f'{g} {way}' for g in scoring.GROUPS for way in ('along', 'across'))], table_rows,
      subtitle='(% of IOD, mean ± spread over seeds; mean |error · tangent| and |error · normal| over faces and '
      'points)')
  text = '\n'.join(lines[:-1]) + '\n'
  (output / 'error_split.md').write_text(text)
  (output / 'error_split.json').write_text(json.dumps(
      [{'variant': v, 'level': lv, 'seeds': {str(k): x for k, x in d.items()}} for (v, lv), d in rows.items()],
      indent=1))
  return text


def _final_train_loss(workdir: pathlib.Path, window: int) -> float | None:
  """Mean of the last `window` logged training losses (metrics.jsonl)."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return None
  values = [json.loads(line)['train/loss'] for line in path.read_text().splitlines()
            if line.strip() and 'train/loss' in line]
  return scoring.finite(np.mean(values[-window:])) if values else None


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------


def _fmt_time(seconds: float) -> str:
  seconds = max(0.0, seconds)
  if seconds >= 5400:
    return f'{seconds / 3600:.1f} h'
  return f'{seconds / 60:.1f} min' if seconds >= 90 else f'{seconds:.0f} s'


def _load() -> float | None:
  try:
    return float(os.getloadavg()[0])
  except OSError:
    return None


_SCORE_KEYS = ('nme', 'nme_ambiguous', 'nme_other', *(f'nme_{p}' for p in scoring.PARTS), 'fr', 'auc', 'nme_image')


def _read_record(record_path: pathlib.Path, digest: str, name: str) -> dict:
  """A finished cell's record; StaleCellError if it was made with another config (digest)."""
  record = json.loads(record_path.read_text())
  if record.get('config_digest') != digest:
    raise StaleCellError(f'{record_path} was made with another config than this study\'s cell {name} '
                         f'(digest {record.get("config_digest")} != {digest}); use another --output, or delete '
                         f'{record_path.parent} to run it again')
  return record


def run_cell(study, variant: str, level: float, seed: int, output: pathlib.Path, log=print) -> dict:
  """Trains and scores one cell (or reads its record when it is finished); returns the record.

  Raises StaleCellError when the cell's record was made with another config (a changed study in an old
  output folder): its results would not be this study's.
  """
  name = cell_name(variant, level, seed)
  workdir = output / 'runs' / name
  record_path = workdir / 'cell.json'
  config = run_config(study, variant, level, seed)
  digest = config_digest(config)
  if record_path.exists():
    record = _read_record(record_path, digest, name)
    log(f'  {name}: done earlier ({record_path})')
    return record
  t0 = time.perf_counter()
  load_start = _load()
  diverged = False
  final: dict = {}
  try:
    final = loop.train_and_evaluate(config, str(workdir))
  except loop.NonFiniteLossError as e:
    log(f'  {name}: diverged ({e})')
    diverged = True
  # The trainer returns no evaluation when SIGTERM stopped it early (it saved the step it reached) or
  # when it found the run already at its last step (stopped after training, while scoring).
  if not diverged and not final:
    reached = _latest_step(workdir)
    if reached < int(config.total_steps):
      raise CellInterruptedError(f'{name} stopped at step {reached} of {config.total_steps} (SIGTERM); its '
                                 'checkpoint is kept: run the same command again to resume the study')
  train_wall = time.perf_counter() - t0
  t1 = time.perf_counter()
  scores = ({k: None for k in _SCORE_KEYS} | {'covariance': None, 'error_split': None} if diverged
            else scoring.score_checkpoint(workdir, config))
  kind, _ = variant_loss(variant)
  record = {
      'variant': variant, 'loss': kind, 'star_w': float(config.loss.star_w), 'level': float(level),
      'seed': int(seed), 'noise_model': config.data.relabel_model, 'decoded_from': config.model.decode,
      **scores,
      'final_train_loss': _final_train_loss(workdir, int(config.log_every_steps)),
      'diverged': diverged,
      'compile_seconds': final.get('seconds/first_step'),
      'train_seconds': (final.get('seconds/loop', train_wall) - final.get('seconds/first_step', 0.0)
                        - final.get('seconds/eval', 0.0)),
      'trainer_seconds': train_wall,       # the whole trainer call: data, model, compile, train, evaluate
      'score_seconds': time.perf_counter() - t1,
      'wall_seconds': time.perf_counter() - t0,
      'load_start': load_start, 'load_end': _load(),
      'finished': time.strftime('%Y-%m-%d %H:%M:%S'),
      'config_digest': digest,
  }
  tmp = record_path.with_suffix('.tmp')
  tmp.write_text(json.dumps(record, indent=1))
  os.replace(tmp, record_path)
  nme = 'n/a' if record['nme'] is None else f"{100 * record['nme']:.2f}%"
  amb = 'n/a' if record['nme_ambiguous'] is None else f"{100 * record['nme_ambiguous']:.2f}%"
  log(f'  {variant:9s} level {level_name(level)} seed {seed}: NME {nme} (contour+brows {amb}); '
      f'trained in {_fmt_time(record["train_seconds"])}, cell {_fmt_time(record["wall_seconds"])} '
      f'(load {record["load_start"] or 0:.1f})')
  return record


def run_study(study, output: pathlib.Path, log=print) -> dict:
  """Runs every cell (`cells`), writes results.json, results.md and the plots into `output`; returns
  the JSON document."""
  check_study(study)
  t_start = time.perf_counter()
  output.mkdir(parents=True, exist_ok=True)
  # Each loss's train step is the same program at every level and seed: compile it once (in the
  # study's own cache, unless the caller configured one, e.g. JAX_COMPILATION_CACHE_DIR).
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', str(output / 'jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  todo = cells(study)
  data = study.run.data
  log(f'ambiguity study ({data.relabel_model} noise): levels {[level_name(v) for v in study.levels]}, '
      f'losses {list(study.losses)}, seeds {list(study.seeds)}, ablation {list(study.ablations)} at level '
      f'{level_name(study.ablation_level)}: {len(todo)} runs of {study.run.total_steps} steps x '
      f'{study.run.batch_size} on {jax.device_count()} {jax.devices()[0].platform} device(s)')

  # ---- Data: the one exact-label build (a no-op when it exists) ------------------------------------
  t0 = time.perf_counter()
  builder = build.get_builder(data.name, config=data.config, data_dir=data.data_dir)
  if not builder.is_prepared():
    log(f'building {data.name}/{data.config} in {builder.data_dir} ...')
    builder.download_and_prepare()
  build_seconds = time.perf_counter() - t0
  splits = builder.info.splits
  log(f'data: {splits["train"].num_examples} train / {splits["test"].num_examples} test faces '
      f'({data.config} in {builder.data_dir}), ready in {_fmt_time(build_seconds)}')

  records = []
  for k, (variant, level, seed) in enumerate(todo):
    log(f'[{k + 1}/{len(todo)}] {cell_name(variant, level, seed)}')
    records.append(run_cell(study, variant, level, seed, output, log))

  variants = list(dict.fromkeys([*study.losses, *study.ablations]))
  doc = {
      'study': json.loads(study.to_json_best_effort()),
      'levels': list(study.levels), 'losses': list(study.losses), 'seeds': list(study.seeds),
      'ablations': list(study.ablations), 'ablation_level': float(study.ablation_level),
      'noise': {'model': data.relabel_model, 'annotators': int(data.annotators),
                'annotator_bias': float(data.annotator_bias)},
      'dataset': {'builder_config': data.config, 'data_dir': str(builder.data_dir),
                  'num_train': splits['train'].num_examples, 'num_test': splits['test'].num_examples,
                  'seconds': build_seconds},
      'device': f'{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.machine()}, '
                f'{jax.default_backend()}, {os.cpu_count()} CPUs)',
      'loss_weights': list(study.run.loss.weights),
      'compile_seconds': {v: max((r['compile_seconds'] or 0.0) for r in records if r['variant'] == v)
                          for v in variants},
      # This invocation only; a resumed study's cells carry their own times ('wall_seconds').
      'total_seconds': time.perf_counter() - t_start,
      'cells_seconds': float(sum(r['wall_seconds'] for r in records)),
      'runs': records,
      # {variant: {level: [mean, spread over seeds]}}; null where a run diverged.
      'nme': tables.json_table(tables.aggregate(records, variants, study.levels, 'nme')),
      'nme_ambiguous': tables.json_table(tables.aggregate(records, variants, study.levels, 'nme_ambiguous')),
      'nme_other': tables.json_table(tables.aggregate(records, variants, study.levels, 'nme_other')),
  }
  write_outputs(doc, output, log)
  return doc


def _plot_title(doc: Mapping[str, Any]) -> str:
  run = doc.get('study', {}).get('run', {})
  seeds = doc['seeds']
  which = f'mean of {len(seeds)} seeds' if len(seeds) > 1 else f'seed {seeds[0]}'
  noise = doc.get('noise', {}).get('model', 'independent')
  noise = (f"{doc['noise']['annotators']} annotators" if noise == 'annotators' else 'independent') + ' noise'
  if not run:
    return f'Synthetic faces, {noise}, {which}'
  return (f"Synthetic faces, {noise}: {run['total_steps']} steps x {run['batch_size']}, "
          f"{run['data']['image_size']} px, nstack {run['model']['nstack']}, {run['model']['channels']} ch, {which}")


def write_outputs(doc: Mapping[str, Any], output: pathlib.Path, log=print) -> None:
  """results.json, results.md and the plots (`plots.PLOTS`) of a study document, into `output`."""
  md = tables.markdown_tables(doc['runs'], doc)
  runs = doc['runs']
  partial = doc.get('partial')
  if partial:
    md = (f"**Partial results: {partial['finished']} of {partial['cells']} cells finished.** Shown: the levels "
          f"whose cells are all finished ({', '.join(level_name(v) for v in partial['levels_complete'])})"
          + (f" and the ablations {', '.join(partial['ablations_complete'])}" if partial['ablations_complete'] else '')
          + f"; not finished: {', '.join(partial['missing']) or 'none'}.\n\n" + md)
  loads = [r[k] for r in runs for k in ('load_start', 'load_end') if r.get(k) is not None]
  load = f', load average {np.mean(loads):.1f} (1-min, sampled per cell)' if loads else ''
  md += (f"\nCells: {_fmt_time(sum(r.get('wall_seconds', 0.0) or 0.0 for r in runs))} of training and scoring "
         f"on {doc['device']}{load}")
  md += (f"; this invocation {_fmt_time(doc['total_seconds'])} (dataset {_fmt_time(doc['dataset']['seconds'])}, "
         f"compilation {_fmt_time(sum(doc['compile_seconds'].values()))}).\n" if not partial else
         f" (the cells shown; compilation, in each variant's first cell: "
         f"{_fmt_time(sum(doc['compile_seconds'].values()))}).\n")
  (output / 'results.json').write_text(json.dumps(doc, indent=1, allow_nan=False))
  (output / 'results.md').write_text(md)
  title = _plot_title(doc)
  has_cov = any(r.get('covariance') for r in runs)
  written = [output / 'results.md', output / 'results.json']
  for name, fn in plots.PLOTS.items():
    if fn is not plots.plot and not has_cov:
      continue
    fn(runs, doc, output / name, title)
    written.append(output / name)
  log('\n' + md)
  log('wrote ' + ', '.join(str(p) for p in written))


def replot(output: pathlib.Path, log=print) -> dict:
  """Rewrites the tables and plots of a finished study from its results.json (no training)."""
  path = output / 'results.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: run the study first (without --replot)')
  doc = json.loads(path.read_text())
  write_outputs(doc, output, log)
  return doc


def finished_cells(study, output: pathlib.Path) -> tuple[list[dict], list[str]]:
  """(records of the study's finished cells in `output`, names of the others), in `cells` order.
  Raises StaleCellError for a finished cell made with another config."""
  records, missing = [], []
  for variant, level, seed in cells(study):
    name = cell_name(variant, level, seed)
    path = output / 'runs' / name / 'cell.json'
    if path.exists():
      records.append(_read_record(path, config_digest(run_config(study, variant, level, seed)), name))
    else:
      missing.append(name)
  return records, missing


def partial_outputs(study, output: pathlib.Path, log=print) -> dict:
  """The tables and plots of the cells finished so far (while the study runs, or after it stopped;
  no training), over the levels whose cells are all finished, with the ablations if theirs are; the
  document says which cells are missing. Returns the document (also written as results.json)."""
  check_study(study)
  records, missing = finished_cells(study, output)
  seeds = [int(s) for s in study.seeds]

  def complete(variants, level):
    return all(tables.find(records, v, float(level), s) is not None for v in variants for s in seeds)

  levels = [float(v) for v in sorted(study.levels) if complete(study.losses, v)]
  if not levels:
    raise FileNotFoundError(f'no level of the study has all its cells finished in {output / "runs"} yet '
                            f'({len(records)} of {len(records) + len(missing)} cells)')
  ablations = [v for v in study.ablations if complete([v], study.ablation_level)]
  data = study.run.data
  variants = list(dict.fromkeys([*study.losses, *ablations]))
  shown = [r for r in records if r['level'] in levels and r.get('variant', r['loss']) in variants]
  doc = {
      'study': json.loads(study.to_json_best_effort()),
      'levels': levels, 'losses': list(study.losses), 'seeds': seeds,
      'ablations': ablations, 'ablation_level': float(study.ablation_level),
      'noise': {'model': data.relabel_model, 'annotators': int(data.annotators),
                'annotator_bias': float(data.annotator_bias)},
      'dataset': {'builder_config': data.config, 'seconds': 0.0},
      'device': f'{platform.machine()}, {os.cpu_count()} CPUs',
      'loss_weights': list(study.run.loss.weights),
      'compile_seconds': {v: max((r['compile_seconds'] or 0.0) for r in shown if r['variant'] == v)
                          for v in variants},
      'total_seconds': 0.0,
      'cells_seconds': float(sum(r['wall_seconds'] for r in records)),
      'partial': {'finished': len(records), 'cells': len(records) + len(missing), 'missing': missing,
                  'levels_complete': levels, 'ablations_complete': ablations},
      'runs': shown,
      'nme': tables.json_table(tables.aggregate(shown, variants, levels, 'nme')),
      'nme_ambiguous': tables.json_table(tables.aggregate(shown, variants, levels, 'nme_ambiguous')),
      'nme_other': tables.json_table(tables.aggregate(shown, variants, levels, 'nme_other')),
  }
  write_outputs(doc, output, log)
  return doc
