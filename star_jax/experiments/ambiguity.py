"""The ambiguity study: does STAR reduce the harm of ambiguous annotation? (scripts/ambiguity_study.py)

The same network is trained on the synthetic faces at several levels of tangential label noise
(star_jax.data.synthetic: the *train* labels slide along their curve, most on the contour and brows;
the test labels are exact), once per landmark loss and seed; each run is scored on the exact-label
test split: NME overall, on the ambiguous points (contour and brows) and on the others, and the
predicted covariance of every point against the true tangent of its curve (the paper's premise:
ambiguity shows up as an anisotropic distribution whose main axis follows the ambiguous direction).

Every cell (variant, level, seed) is an ordinary training run: the study's config (configs/
ambiguity_study.py) holds the run's config (`run`), and a cell sets its loss, seed and label level and
calls the trainer (`star_jax.training.loop.train_and_evaluate`) in `<output>/runs/<cell>/`. So:
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

Variants: a landmark loss of `losses.LANDMARK_LOSSES` ('star' is STARLoss_v2, 'star_v1' the older
one, 'smoothl1' / 'l2' the coordinate baselines), or '<star|star_v1>_w<w>' for STAR with another
eigenvalue-restriction weight (the ablation 'star_w0'). The main grid is `losses` x `levels` x
`seeds`; the ablation variants run at `ablation_level` for every seed.

Fairness of the baselines: every run keeps STAR's recipe weights (1, 10, 10) for (landmark term,
AWing point maps, AWing edge maps), as the official trainer does when its `loss_func` is switched, so a
coordinate-loss baseline ('smoothl1', 'l2') differs from STAR only in the landmark term; 'none' drops
the landmark term and is read from its AWing-trained point maps (`model.decode = 'pointmaps'`).

Statistics: over seeds, a cell's mean and spread (the population standard deviation; with two seeds,
half their difference). Differences between cells are taken per seed (paired) and a difference is
called only when its mean exceeds its spread (with two seeds: both seeds agree on its sign).

NMEs are fractions of the inter-ocular distance (outer eye corners), in the official crop frame.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import platform
import re
import time
import warnings
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
    'l1': 'L1 coords + AWing',
    'none': 'AWing alone, point maps decoded',
}
# Point groups of the covariance and part tables (WFLW indices); 'others' is every point outside the
# contour and brows. Points without a tangent (the pupils) have no axis to compare.
GROUPS = {'contour': range(0, 33), 'brows': range(33, 51), 'others': range(51, 98)}
PARTS = {'contour': range(0, 33), 'brows': range(33, 51), 'nose': range(51, 60),
         'eyes': [*range(60, 76), 96, 97], 'mouth': range(76, 96)}
ANGLE_BINS = np.linspace(0.0, 90.0, 10)   # 10-degree bins of the axis-to-tangent angle
ALIGNED_DEGREES = 30.0                    # an axis within this of the tangent "follows" it
_VARIANT = re.compile(r'^(?P<loss>star|star_v1)_w(?P<w>\d+(?:\.\d+)?)$')


class StaleCellError(ValueError):
  """A finished cell in the output folder was trained with another config than the study's."""


class CellInterruptedError(RuntimeError):
  """A cell's training was stopped before its last step (SIGTERM); the study stops, resumable."""


def _latest_step(workdir: pathlib.Path) -> int:
  """The last saved training step of a cell's workdir (0 if none)."""
  return max((int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.name.isdigit()), default=0)


def level_name(level: float) -> str:
  return f'{level:g}'


def cell_name(variant: str, level: float, seed: int) -> str:
  return f'{variant}_amb{level_name(level)}_seed{seed}'


def variant_loss(variant: str) -> tuple[str, float | None]:
  """(loss kind, STAR weight w or None for the config's) of a variant name; ValueError if unknown."""
  from star_jax import losses as losses_lib  # pylint: disable=import-outside-toplevel
  if variant in losses_lib.LANDMARK_LOSSES:
    return variant, None
  match = _VARIANT.match(variant)
  if match is None:
    raise ValueError(f'unknown loss {variant!r}; choose from {losses_lib.LANDMARK_LOSSES} or '
                     "'star_w<w>' / 'star_v1_w<w>' (STAR with eigenvalue weight w, e.g. star_w0)")
  return match['loss'], float(match['w'])


def variant_label(variant: str) -> str:
  kind, w = variant_loss(variant)
  return LOSS_LABELS[kind] if w is None else f'{LOSS_LABELS[kind]}, w = {w:g}'


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------

def check_study(study) -> None:
  """ValueError for a study config that cannot run (unknown loss, empty grid, bad levels)."""
  for variant in (*study.losses, *study.ablations):
    variant_loss(variant)
  if not study.levels or not study.losses or not study.seeds:
    raise ValueError('need at least one level, one loss and one seed')
  if any(level < 0 for level in study.levels):
    raise ValueError(f'ambiguity levels must be >= 0, got {tuple(study.levels)}')
  if len(set(study.seeds)) != len(study.seeds) or len(set(study.levels)) != len(study.levels):
    raise ValueError('levels and seeds must not repeat')
  if study.ablations and study.ablation_level not in study.levels:
    raise ValueError(f'ablation_level {study.ablation_level:g} must be one of the levels {tuple(study.levels)} '
                     '(the ablation is compared with the main grid at that level)')
  if study.run.data.name != 'synthetic_faces' or study.run.layout != 'WFLW':
    raise ValueError('the study runs on the 98-point synthetic faces (run.data.name synthetic_faces, '
                     'run.layout WFLW)')
  if study.run.data.relabel_model not in synthetic.RELABEL_MODELS:
    raise ValueError(f'run.data.relabel_model must be one of {synthetic.RELABEL_MODELS}, '
                     f'got {study.run.data.relabel_model!r}')


def cells(study) -> list[tuple[str, float, int]]:
  """Every (variant, level, seed) of the study, most informative first: the lowest level, then the
  ablation level with the ablation variants, then the other levels in order; every seed of a level
  before the next level. The main grid is `losses` x `levels` x `seeds`, the ablation variants run at
  `ablation_level` for every seed."""
  # An interrupted study then has paired seeds at the levels it reached: the harm from the lowest
  # level to the ablation level, and the ablations, are measured with a spread before anything else.
  levels = sorted(float(v) for v in study.levels)
  first = [levels[0]] + ([float(study.ablation_level)] if float(study.ablation_level) != levels[0] else [])
  order = first + [v for v in levels if v not in first]
  out = []
  for level in order:
    for seed in study.seeds:
      out += [(loss, level, int(seed)) for loss in study.losses]
    if level == float(study.ablation_level):
      for seed in study.seeds:
        out += [(v, level, int(seed)) for v in study.ablations if v not in study.losses]
  return out


def run_config(study, variant: str, level: float, seed: int):
  """The training config of one cell: the study's `run` with its loss, seed and label level."""
  kind, w = variant_loss(variant)
  c = study.run.copy_and_resolve_references()
  c.loss.kind = kind
  if w is not None:
    c.loss.star_w = w
  c.seed = int(seed)
  c.data.relabel_ambiguity = float(level)
  # Without a landmark term only the point maps are trained: read the landmarks from them.
  c.model.decode = 'pointmaps' if kind == 'none' else 'landmarks'
  return c


def config_digest(config) -> str:
  """A short hash of a run config (its JSON): what a finished cell was trained with."""
  text = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------

def ambiguous_points() -> np.ndarray:
  """(98,) bool: the points with the largest label noise (contour and brows)."""
  return synthetic.ambiguity_fractions() >= AMBIGUOUS_FRACTION


def _point_errors(pred: np.ndarray, gt: np.ndarray, layout: layouts.Layout) -> np.ndarray:
  left, right = layout.norm_indices('ocular')
  iod = np.linalg.norm(gt[:, left] - gt[:, right], axis=-1)                 # (M,)
  return np.linalg.norm(pred - gt, axis=-1) / iod[:, None]                  # (M, N)


def part_nmes(pred: np.ndarray, gt: np.ndarray, layout: layouts.Layout) -> dict[str, float]:
  """Mean error of the ambiguous points (contour, brows) and of the others, over images, / IOD; and
  of each part (`PARTS`, as 'nme_<part>').

  pred, gt: (M, 98, 2) in one frame (the normalised crop here); the IOD is the ground truth's.
  """
  err = _point_errors(pred, gt, layout)
  mask = ambiguous_points()
  out = {'nme_ambiguous': float(err[:, mask].mean()), 'nme_other': float(err[:, ~mask].mean())}
  out.update({f'nme_{part}': float(err[:, list(idx)].mean()) for part, idx in PARTS.items()})
  return out


def _tangents(gt_px: np.ndarray, layout: layouts.Layout) -> tuple[np.ndarray, np.ndarray]:
  """(M, N, 2) unit tangents of the exact points `gt_px` (M, N, 2) along their curves, and (M, N) bool:
  which points have one (the pupils have none)."""
  tangents = np.stack([synthetic.curve_tangents(p, layout) for p in np.asarray(gt_px, np.float64)])
  return tangents, np.linalg.norm(tangents, axis=-1) > 0.5


def axis_statistics(cov: np.ndarray, gt: np.ndarray, gt_px: np.ndarray, layout: layouts.Layout) -> dict:
  """How each point's predicted covariance lines up with the true tangent of its curve.

  Args:
    cov: (M, 98, 2, 2) predicted covariances in the normalised crop frame (x right, y down).
    gt: (M, 98, 2) exact points in that frame (for the IOD).
    gt_px: (M, 98, 2) exact points in image pixels (for the tangents: the eval crop is a scale and a
      translation, no rotation, so directions, and angles, are the same in both frames).
  Returns:
    {'groups': {group: stats}, 'points': {'angle_median', 'anisotropy_median': (98,) lists (None
    where a point has no tangent)}}. stats: 'angle_median', 'angle_mean' (degrees in [0, 90] between
    the principal axis, the eigenvector of the larger eigenvalue, and the tangent; an axis has no
    direction), 'aligned' (fraction within ALIGNED_DEGREES), 'angle_hist' (fractions in the 10-degree
    `ANGLE_BINS`), 'anisotropy_median' (larger / smaller eigenvalue), 'std_major' / 'std_minor'
    (medians of the square-rooted eigenvalues, / IOD), 'count'.
  """
  cov = np.asarray(cov, np.float64)
  cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
  evalues, evectors = np.linalg.eigh(cov)                                   # ascending
  major = evectors[..., :, 1]                                               # (M, N, 2)
  tangents, valid = _tangents(gt_px, layout)
  cosine = np.clip(np.abs((major * tangents).sum(-1)), 0.0, 1.0)
  angle = np.degrees(np.arccos(cosine))
  small = np.maximum(evalues[..., 0], 1e-12)
  anisotropy = np.maximum(evalues[..., 1], 1e-12) / small
  left, right = layout.norm_indices('ocular')
  iod = np.linalg.norm(gt[:, left] - gt[:, right], axis=-1)[:, None]
  std_major = np.sqrt(np.maximum(evalues[..., 1], 0.0)) / iod
  std_minor = np.sqrt(np.maximum(evalues[..., 0], 0.0)) / iod

  groups = {}
  for name, idx in GROUPS.items():
    idx = list(idx)
    ok = valid[:, idx]
    if not ok.any():
      continue
    a = angle[:, idx][ok]
    hist, _ = np.histogram(a, bins=ANGLE_BINS)
    groups[name] = {
        'angle_median': float(np.median(a)), 'angle_mean': float(a.mean()),
        'aligned': float((a <= ALIGNED_DEGREES).mean()), 'angle_hist': (hist / hist.sum()).tolist(),
        'anisotropy_median': float(np.median(anisotropy[:, idx][ok])),
        'std_major': float(np.median(std_major[:, idx][ok])), 'std_minor': float(np.median(std_minor[:, idx][ok])),
        'count': int(ok.sum())}
  with warnings.catch_warnings():   # a point without a tangent (the pupils) has no angle: NaN -> None
    warnings.simplefilter('ignore', RuntimeWarning)
    point_angle = np.nanmedian(np.where(valid, angle, np.nan), axis=0)
    point_aniso = np.nanmedian(np.where(valid, anisotropy, np.nan), axis=0)
  points = {'angle_median': [_finite(v) for v in point_angle],
            'anisotropy_median': [_finite(v) for v in point_aniso]}
  return {'groups': groups, 'points': points}


def error_split(pred: np.ndarray, gt: np.ndarray, gt_px: np.ndarray, layout: layouts.Layout) -> dict:
  """The test error of each point split along and across the true tangent of its curve.

  Args:
    pred, gt: (M, 98, 2) predicted and exact points in one frame (the normalised crop); the IOD is gt's.
    gt_px: (M, 98, 2) exact points in image pixels, for the tangents (the crop is a scale and a
      translation, so directions are the same in both frames).
  Returns:
    {group: {'tangential', 'normal'}}: per `GROUPS` group, the mean over faces and points with a tangent
    of |error . tangent| and |error . normal|, / IOD (as NME fractions); 'count' points.
  """
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  tangents, valid = _tangents(gt_px, layout)
  normals = np.stack([-tangents[..., 1], tangents[..., 0]], axis=-1)
  left, right = layout.norm_indices('ocular')
  iod = np.linalg.norm(gt[:, left] - gt[:, right], axis=-1)[:, None]
  err = pred - gt
  along = np.abs((err * tangents).sum(-1)) / iod
  across = np.abs((err * normals).sum(-1)) / iod
  out = {}
  for name, idx in GROUPS.items():
    ok = valid[:, list(idx)]
    if ok.any():
      out[name] = {'tangential': float(along[:, list(idx)][ok].mean()),
                   'normal': float(across[:, list(idx)][ok].mean()), 'count': int(ok.sum())}
  return out


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
    split = score_checkpoint(workdir, run_config(study, variant, level, seed))['error_split']
    rows.setdefault((variant, float(level)), {})[int(seed)] = split
    log(f'  {cell_name(variant, level, seed)}: ' + ', '.join(
        f"{g} {100 * v['tangential']:.2f}/{100 * v['normal']:.2f}" for g, v in split.items()))
  if not rows:
    raise FileNotFoundError(f'no finished cell in {output / "runs"}')
  lines = ['**Test error along / across the true tangent** (% of IOD, mean ± spread over seeds; '
           'mean |error · tangent| and |error · normal| over faces and points)', '',
           '| variant | level | contour along | contour across | brows along | brows across | others along | '
           'others across |', '|---|---|---|---|---|---|---|---|']
  for (variant, level), by_seed in rows.items():
    cols = []
    for group in GROUPS:
      for key in ('tangential', 'normal'):
        values = np.array([100 * s[group][key] for s in by_seed.values() if group in s])
        mean, spread = mean_spread(values)
        cols.append(f'{mean:.2f} ± {spread:.2f}')
    lines.append(f'| {variant} | {level_name(level)} | ' + ' | '.join(cols) + ' |')
  text = '\n'.join(lines) + '\n'
  (output / 'error_split.md').write_text(text)
  (output / 'error_split.json').write_text(json.dumps(
      [{'variant': v, 'level': lv, 'seeds': {str(k): x for k, x in d.items()}} for (v, lv), d in rows.items()],
      indent=1))
  return text


def _finite(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def score_checkpoint(workdir: pathlib.Path, config) -> dict:
  """NME, FR, AUC, the image-frame NME, the part NMEs and the covariance statistics
  (`axis_statistics`) of a cell's final weights on the test split."""
  import jax  # pylint: disable=import-outside-toplevel

  from star_jax import models  # pylint: disable=import-outside-toplevel
  from star_jax.data import build  # pylint: disable=import-outside-toplevel
  from star_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from star_jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
  from star_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from star_jax import mesh as mesh_lib  # pylint: disable=import-outside-toplevel

  layout = layouts.get_layout(config.layout)
  loaded = checkpoints.load_model(workdir, weights='model')
  graph, params, batch_stats = models.split(loaded.model)
  predict = jax.jit(models.make_predict_fn(graph, decode=config.model.decode, covariances=True))
  mesh = mesh_lib.make_mesh()
  source = build.load_source(config.data, config.data.test_split, layout=config.layout)
  covariances = []

  def predict_fn(images):
    out = predict(params, batch_stats, images)
    covariances.append(mesh_lib.gather(out['covariances']))
    return out

  with jax.set_mesh(mesh):
    results = scoring.predict_split(predict_fn, pipeline.eval_batches(config, source), mesh,
                                    int(config.data.image_size))
  # Evaluation batches hold the split in order with the padding at the end (predict_split keeps the
  # valid rows in index order), so the first M covariances are the M test faces'.
  cov = np.concatenate(covariances)[:len(results['pred'])]
  if not np.array_equal(results['index'], np.arange(len(cov))):
    raise RuntimeError('the evaluation batches are not in split order; cannot match covariances to faces')
  summary = scoring.score(results, layout)
  parts = part_nmes(results['pred'], results['gt'], layout)
  return {'nme': _finite(summary['nme']), **{k: _finite(v) for k, v in parts.items()},
          'fr': _finite(summary['fr']), 'auc': _finite(summary['auc']), 'nme_image': _finite(summary['nme_image']),
          'covariance': axis_statistics(cov, results['gt'], results['gt_px'], layout),
          'error_split': error_split(results['pred'], results['gt'], results['gt_px'], layout)}


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
  if seconds >= 5400:
    return f'{seconds / 3600:.1f} h'
  return f'{seconds / 60:.1f} min' if seconds >= 90 else f'{seconds:.0f} s'


def _load() -> float | None:
  try:
    return float(os.getloadavg()[0])
  except OSError:
    return None


_SCORE_KEYS = ('nme', 'nme_ambiguous', 'nme_other', *(f'nme_{p}' for p in PARTS), 'fr', 'auc', 'nme_image')


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
  from star_jax.training import loop  # pylint: disable=import-outside-toplevel

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
            else score_checkpoint(workdir, config))
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
  import jax  # pylint: disable=import-outside-toplevel

  from star_jax.data import build  # pylint: disable=import-outside-toplevel

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
      'nme': _json_table(aggregate(records, variants, study.levels, 'nme')),
      'nme_ambiguous': _json_table(aggregate(records, variants, study.levels, 'nme_ambiguous')),
      'nme_other': _json_table(aggregate(records, variants, study.levels, 'nme_other')),
  }
  write_outputs(doc, output, log)
  return doc


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------

def _get(grid, key):
  return grid[key] if isinstance(grid, Mapping) else getattr(grid, key)


def _value(record: Mapping[str, Any], key: str) -> float:
  """record[key], where key may be a path 'covariance/groups/contour/angle_median'; NaN if absent."""
  value: Any = record
  for part in key.split('/'):
    if not isinstance(value, Mapping) or value.get(part) is None:
      return math.nan
    value = value[part]
  return float(value)


def _find(records, variant: str, level: float, seed: int):
  for r in records:
    if r.get('variant', r['loss']) == variant and r['level'] == level and r['seed'] == seed:
      return r
  return None


def seed_values(records, variant: str, level: float, key: str, seeds: Sequence[int]) -> np.ndarray:
  """(len(seeds),) the cell's `key` per seed (NaN where missing or diverged)."""
  out = []
  for seed in seeds:
    r = _find(records, variant, level, seed)
    out.append(math.nan if r is None else _value(r, key))
  return np.array(out, np.float64)


def mean_spread(values: np.ndarray) -> tuple[float, float]:
  """(mean, spread) over seeds: spread is the population standard deviation (two seeds: half their
  difference); NaN if any value is NaN (a diverged or missing run)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return math.nan, math.nan
  return float(values.mean()), float(values.std())


def paired_difference(records, a: tuple[str, float], b: tuple[str, float], key: str,
                      seeds: Sequence[int]) -> tuple[float, float, bool]:
  """Cell a minus cell b (each (variant, level)) per seed: (mean, spread, called). Called: more than
  one seed and |mean| > spread (two seeds: both differences have the same sign)."""
  diff = seed_values(records, *a, key, seeds) - seed_values(records, *b, key, seeds)
  mean, spread = mean_spread(diff)
  called = len(diff) > 1 and math.isfinite(mean) and abs(mean) > spread
  return mean, spread, called


def aggregate(records: Sequence[Mapping[str, Any]], variants: Sequence[str], levels: Sequence[float],
              key: str, seeds: Sequence[int] | None = None) -> dict:
  """{variant: {level name: (mean, spread over seeds)}} of `key` (NaN where a run diverged), for the
  (variant, level) cells that have any record."""
  out = {}
  for variant in variants:
    out[variant] = {}
    for level in levels:
      found = [r for r in records if r.get('variant', r['loss']) == variant and r['level'] == level]
      if seeds is not None:
        found = [r for r in found if r['seed'] in seeds]
      if found:
        out[variant][level_name(level)] = mean_spread(np.array([_value(r, key) for r in found]))
  return out


def _json_table(table: dict) -> dict:
  return {v: {level: [_finite(x) for x in stat] for level, stat in row.items()} for v, row in table.items()}


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def _pct(mean: float, spread: float, several: bool, signed: bool = False, called: bool = False) -> str:
  if not math.isfinite(mean):
    return 'diverged'
  text = f'{100 * mean:+.2f}' if signed else f'{100 * mean:.2f}'
  if several:
    text += f' ± {100 * spread:.2f}'
  return f'**{text}**' if called else text


def _diff(records, a, b, key: str, seeds) -> str:
  """A table entry: `paired_difference` in points of %, bold when called."""
  mean, spread, called = paired_difference(records, a, b, key, seeds)
  return _pct(mean, spread, len(seeds) > 1, signed=True, called=called)


def _grid_tables(records, doc) -> list[str]:
  levels, losses, seeds = doc['levels'], doc['losses'], doc['seeds']
  several = len(seeds) > 1
  lines = []
  for key, title in (('nme', 'NME (%), all 98 points'),
                     ('nme_ambiguous', 'NME (%), contour and brows (the most ambiguous points)'),
                     ('nme_other', 'NME (%), the other points')):
    head = ['loss'] + [f'level {level_name(v)}' for v in levels]
    lines += [f'**{title}**' + (' (mean ± spread over seeds)' if several else ''), '',
              '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for loss in losses:
      row = [f'{loss} ({variant_label(loss)})']
      row += [_pct(*mean_spread(seed_values(records, loss, v, key, seeds)), several) for v in levels]
      lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
  return lines


def _harm_tables(records, doc) -> list[str]:
  levels, losses, seeds = doc['levels'], doc['losses'], doc['seeds']
  several = len(seeds) > 1
  if len(levels) < 2:
    return []
  base = levels[0]
  lines = [f'**Harm: NME at the level minus NME at level {level_name(base)} (points of NME %, paired by '
           'seed' + ('; bold: larger than its spread' if several else '') + ')**', '']
  head = ['loss', 'points'] + [f'level {level_name(v)}' for v in levels[1:]]
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for loss in losses:
    for key, what in (('nme', 'all'), ('nme_ambiguous', 'contour + brows'), ('nme_other', 'others')):
      row = [loss, what] + [_diff(records, (loss, v), (loss, base), key, seeds) for v in levels[1:]]
      lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('')
  return lines


def _star_vs_baselines(records, doc) -> list[str]:
  levels, losses, seeds = doc['levels'], doc['losses'], doc['seeds']
  several = len(seeds) > 1
  baselines = [v for v in losses if variant_loss(v)[0] not in ('star', 'star_v1')]
  if 'star' not in losses or not baselines:
    return []
  base = levels[0]
  lines = ['**STAR minus baseline (points of NME %, paired by seed; negative: STAR better' +
           ('; bold: larger than its spread' if several else '') + ')**', '']
  head = ['difference', 'points'] + [f'level {level_name(v)}' for v in levels]
  if len(levels) > 1:
    head += [f'harm difference at level {level_name(levels[-1])}']
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for b in baselines:
    for key, what in (('nme', 'all'), ('nme_ambiguous', 'contour + brows'), ('nme_other', 'others')):
      row = [f'star − {b}', what]
      row += [_diff(records, ('star', v), (b, v), key, seeds) for v in levels]
      if len(levels) > 1:
        top = levels[-1]
        diff = ((seed_values(records, 'star', top, key, seeds) - seed_values(records, 'star', base, key, seeds))
                - (seed_values(records, b, top, key, seeds) - seed_values(records, b, base, key, seeds)))
        m, s = mean_spread(diff)
        row.append(_pct(m, s, several, signed=True, called=len(seeds) > 1 and math.isfinite(m) and abs(m) > s))
      lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('')
  if len(levels) > 1:
    lines += [f'(harm difference: STAR\'s harm minus the baseline\'s, level {level_name(base)} → '
              f'{level_name(levels[-1])}; negative: STAR loses less to the noise.)', '']
  return lines


def _ablation_table(records, doc) -> list[str]:
  ablations, seeds = doc.get('ablations', []), doc['seeds']
  if not ablations or 'star' not in doc['losses']:
    return []
  several = len(seeds) > 1
  level = doc['ablation_level']
  lines = [f'**Eigenvalue restriction and STAR version at level {level_name(level)}** (NME %; Δ: minus '
           'STAR v2 with w = 1, paired by seed' + ('; bold: larger than its spread' if several else '') + ')', '']
  head = ['variant', 'all', 'contour + brows', 'others', 'Δ all', 'Δ contour + brows', 'Δ others']
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for v in ['star', *ablations]:
    row = [f'{v} ({variant_label(v)})']
    keys = ('nme', 'nme_ambiguous', 'nme_other')
    row += [_pct(*mean_spread(seed_values(records, v, level, k, seeds)), several) for k in keys]
    for k in keys:
      if v == 'star':
        row.append('')
      else:
        row.append(_diff(records, (v, level), ('star', level), k, seeds))
    lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('')
  return lines


def _covariance_tables(records, doc) -> list[str]:
  levels, seeds = doc['levels'], doc['seeds']
  variants = list(dict.fromkeys([*doc['losses'], *doc.get('ablations', [])]))
  several = len(seeds) > 1
  lines = ['**Predicted covariance against the true tangent** (test split; per cell the median over '
           'faces and points of the group, then mean' + (' ± spread' if several else '') + ' over seeds). '
           f'Angle: principal axis to tangent, degrees (0 = along the curve, 45 = no relation, 90 = '
           f'across); aligned: share within {ALIGNED_DEGREES:g}° (a random axis: '
           f'{ALIGNED_DEGREES / 90:.2f}); anisotropy: larger / smaller eigenvalue.', '']
  head = ['loss', 'level'] + [f'{g} {what}' for g in GROUPS for what in ('angle', 'aligned', 'anisotropy')]
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for v in variants:
    for level in levels:
      if _find(records, v, level, seeds[0]) is None and not any(_find(records, v, level, s) for s in seeds):
        continue
      row = [v, level_name(level)]
      for g in GROUPS:
        for what, fmt in (('angle_median', '{:.0f}'), ('aligned', '{:.2f}'), ('anisotropy_median', '{:.1f}')):
          m, s = mean_spread(seed_values(records, v, level, f'covariance/groups/{g}/{what}', seeds))
          if not math.isfinite(m):
            row.append('n/a')
          else:
            row.append(fmt.format(m) + (f' ± {fmt.format(s)}' if several else ''))
      lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('')
  return lines


def markdown_tables(records, grid) -> str:
  """The result tables (NME in % of the IOD; mean ± spread over seeds when there are several)."""
  doc = {'levels': list(_get(grid, 'levels')), 'losses': list(_get(grid, 'losses')),
         'seeds': list(_get(grid, 'seeds')),
         'ablations': list(grid.get('ablations', []) if isinstance(grid, Mapping) else getattr(grid, 'ablations', [])),
         'ablation_level': (grid.get('ablation_level', 0.0) if isinstance(grid, Mapping)
                            else getattr(grid, 'ablation_level', 0.0))}
  lines = _grid_tables(records, doc) + _harm_tables(records, doc) + _star_vs_baselines(records, doc)
  lines += _ablation_table(records, doc)
  if any(r.get('covariance') for r in records):
    lines += _covariance_tables(records, doc)
  variants = list(dict.fromkeys([*doc['losses'], *doc['ablations']]))
  seconds = {v: np.mean([r['train_seconds'] for r in records if r.get('variant', r['loss']) == v] or [math.nan])
             for v in variants}
  lines.append('Training time per run (s, excluding compilation): ' +
               ', '.join(f'{v} {seconds[v]:.0f}' for v in variants) + '.')
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def plot(records, grid, path: pathlib.Path, title: str = '') -> None:
  """Three panels against the noise level, one line per loss (mean ± spread over seeds): the test
  NME of all points, and the harm (NME minus NME at the first level, paired by seed) on the contour
  and brows and on the other points. The ablation variants are single points at their level.

  In the first panel a loss far worse than the others (best NME over twice the overall best) would
  squash their differences: the axis is fitted to the others and its legend entry gives its range;
  the harm panels, meaningless for a model that does not localise, leave it out.
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  xs = list(_get(grid, 'levels'))
  losses = list(_get(grid, 'losses'))
  seeds = list(_get(grid, 'seeds'))
  ablations = list(grid.get('ablations', []) if isinstance(grid, Mapping) else getattr(grid, 'ablations', []))
  ablation_level = grid.get('ablation_level') if isinstance(grid, Mapping) else getattr(grid, 'ablation_level', None)

  def absolute(key, variant, levels):
    stats = [mean_spread(seed_values(records, variant, v, key, seeds)) for v in levels]
    return 100 * np.array([s[0] for s in stats]), 100 * np.array([s[1] for s in stats])

  def harm(key, variant):
    stats = [mean_spread(seed_values(records, variant, v, key, seeds) - seed_values(records, variant, xs[0], key, seeds))
             for v in xs]
    return 100 * np.array([s[0] for s in stats]), 100 * np.array([s[1] for s in stats])

  curves = {loss: absolute('nme', loss, xs)[0] for loss in losses}
  floor = np.nanmin([np.nanmin(m) if np.isfinite(m).any() else np.inf for m in curves.values()])
  off_scale = {loss for loss, m in curves.items() if np.isfinite(m).any() and np.nanmin(m) > 2 * floor}
  fig = Figure(figsize=(15, 4.6), layout='constrained')
  axes = fig.subplots(1, 3)
  panels = ((axes[0], 'nme', False, 'test NME, all 98 points', 'NME (% of inter-ocular distance)'),
            (axes[1], 'nme_ambiguous', True, 'harm of the ambiguity: contour and brows',
             f'NME - NME at level {level_name(xs[0])} (points of %)'),
            (axes[2], 'nme_other', True, 'harm of the ambiguity: the other points',
             f'NME - NME at level {level_name(xs[0])} (points of %)'))
  width = 0.012 * (max(xs) - min(xs) or 1.0)   # a small offset per loss, so error bars do not overlap
  for ax, key, relative, panel_title, ylabel in panels:
    if not relative and off_scale:
      shown = np.concatenate([m for loss, m in curves.items() if loss not in off_scale])
      if np.isfinite(shown).any():
        lo, hi = np.nanmin(shown), np.nanmax(shown)
        pad = max(0.5, 0.15 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    for i, loss in enumerate(losses):
      if relative and loss in off_scale:
        continue
      mean, spread = harm(key, loss) if relative else absolute(key, loss, xs)
      label = variant_label(loss)
      if loss in off_scale:
        label += f' (off scale: {np.nanmin(mean):.0f}-{np.nanmax(mean):.0f}%; not in the other panels)'
      offset = (i - (len(losses) - 1) / 2) * width
      ax.errorbar(np.array(xs) + offset, mean, yerr=spread if len(seeds) > 1 else None, marker='o', capsize=3,
                  label=label, color=f'C{i}')
    if not relative and ablation_level is not None:
      for j, v in enumerate(ablations):
        mean, spread = absolute(key, v, [ablation_level])
        if np.isfinite(mean).all():
          ax.errorbar([ablation_level + (len(losses) / 2 + j) * width], mean,
                      yerr=spread if len(seeds) > 1 else None, marker='X', ms=8, capsize=3, ls='none',
                      label=variant_label(v), color=f'C{len(losses) + j}')
    if relative:
      ax.axhline(0.0, color='grey', lw=0.8)
    ax.set_xlabel('label ambiguity level (train labels; test labels exact)')
    ax.set_ylabel(ylabel)
    ax.set_title(panel_title)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
  fig.legend(*axes[0].get_legend_handles_labels(), loc='outside lower center',
             ncol=min(len(losses) + len(ablations), 5), fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=80)


def plot_axis_angles(records, grid, path: pathlib.Path, title: str = '') -> None:
  """Histograms of the angle between each test point's predicted principal axis and the true tangent
  of its curve: one panel per (point group, loss), one line per noise level (summed over seeds); the
  dashed line is a random axis."""
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  levels, losses = list(_get(grid, 'levels')), list(_get(grid, 'losses'))
  groups = list(GROUPS)
  fig = Figure(figsize=(4 * len(losses), 2.8 * len(groups)), layout='constrained')
  axes = np.asarray(fig.subplots(len(groups), len(losses), sharex=True, sharey='row', squeeze=False))
  centres = 0.5 * (ANGLE_BINS[:-1] + ANGLE_BINS[1:])
  cmap = colormaps['viridis']
  for col, loss in enumerate(losses):
    for row, group in enumerate(groups):
      ax = axes[row, col]
      for k, level in enumerate(levels):
        hists = [r['covariance']['groups'][group]['angle_hist'] for r in records
                 if r.get('variant', r['loss']) == loss and r['level'] == level and r.get('covariance')
                 and group in r['covariance']['groups']]
        if hists:
          ax.plot(centres, np.mean(hists, axis=0), marker='.', color=cmap(k / max(len(levels) - 1, 1)),
                  label=f'level {level_name(level)}')
      ax.axhline(1 / (len(ANGLE_BINS) - 1), color='grey', ls='--', lw=0.8)
      ax.set_title(f'{group}: {variant_label(loss)}', fontsize=9)
      ax.set_xticks(ANGLE_BINS[::3])
      ax.grid(alpha=0.3)
      if row == len(groups) - 1:
        ax.set_xlabel('principal axis to true tangent (degrees)')
      if col == 0:
        ax.set_ylabel('share of test points')
  fig.legend(*axes[0, 0].get_legend_handles_labels(), loc='outside lower center', ncol=len(levels), fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=70)


def plot_covariance(records, grid, path: pathlib.Path, title: str = '') -> None:
  """The median axis-to-tangent angle (top) and the median anisotropy (bottom) against the noise
  level, per point group (columns) and loss (lines), mean ± spread over seeds."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  levels, losses, seeds = list(_get(grid, 'levels')), list(_get(grid, 'losses')), list(_get(grid, 'seeds'))
  groups = list(GROUPS)
  fig = Figure(figsize=(4.5 * len(groups), 7), layout='constrained')
  axes = np.asarray(fig.subplots(2, len(groups), sharex=True, squeeze=False))
  for col, group in enumerate(groups):
    for row, (what, ylabel) in enumerate((('angle_median', 'median angle, axis to tangent (deg)'),
                                          ('anisotropy_median', 'median anisotropy (eigenvalue ratio)'))):
      ax = axes[row, col]
      for i, loss in enumerate(losses):
        stats = [mean_spread(seed_values(records, loss, v, f'covariance/groups/{group}/{what}', seeds))
                 for v in levels]
        ax.errorbar(levels, [s[0] for s in stats], yerr=[s[1] for s in stats] if len(seeds) > 1 else None,
                    marker='o', capsize=3, color=f'C{i}', label=variant_label(loss))
      if what == 'angle_median':
        ax.axhline(45.0, color='grey', ls='--', lw=0.8)
        ax.set_ylim(0, 90)
        ax.set_title(group)
      else:
        ax.set_yscale('log')
        # Plain numbers on the log axis (ratios of a few units read badly as 3.5 x 10^0).
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter('%g'))
        ax.set_xlabel('label ambiguity level')
      ax.set_xticks(levels)
      ax.grid(alpha=0.3)
      if col == 0:
        ax.set_ylabel(ylabel)
  fig.legend(*axes[0, 0].get_legend_handles_labels(), loc='outside lower center', ncol=len(losses), fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=70)


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


PLOTS = {'nme_vs_ambiguity.png': plot, 'axis_angles.png': plot_axis_angles,
         'covariance_vs_ambiguity.png': plot_covariance}


def write_outputs(doc: Mapping[str, Any], output: pathlib.Path, log=print) -> None:
  """results.json, results.md and the plots (`PLOTS`) of a study document, into `output`."""
  md = markdown_tables(doc['runs'], doc)
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
  for name, fn in PLOTS.items():
    if fn is not plot and not has_cov:
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
    return all(_find(records, v, float(level), s) is not None for v in variants for s in seeds)

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
      'nme': _json_table(aggregate(shown, variants, levels, 'nme')),
      'nme_ambiguous': _json_table(aggregate(shown, variants, levels, 'nme_ambiguous')),
      'nme_other': _json_table(aggregate(shown, variants, levels, 'nme_other')),
  }
  write_outputs(doc, output, log)
  return doc
