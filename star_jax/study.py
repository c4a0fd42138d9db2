"""The ambiguity study: does STAR reduce the harm of ambiguous annotation? (scripts/ambiguity_study.py)

The same small network is trained on the synthetic faces at several levels of tangential label noise
(star_jax.data.synthetic: the *train* labels slide along their curve, most on the contour and brows;
the test labels are exact), once per landmark loss, with the same seeds, batches and steps; each run
is scored by NME on the exact-label test split.

Efficiency, so that the default fits in half an hour on a 2-core CPU:
  * one dataset build: the images and exact points of the synthetic faces do not depend on the noise
    level (separate random streams), so each level's training split is the level-0 build with its
    labels re-drawn exactly as the builder draws them (`RelabelledSource`; tests/test_study.py checks
    that it equals a build at that level);
  * one process; each loss's train step is compiled once and reused across levels and seeds (same
    shapes), and one prediction step per decoding serves every run (the eval network is the same);
  * within a (level, seed) all losses train side by side on the *same* augmented batches, so the
    input pipeline runs once per level and the runs differ only in their loss.

Fairness of the baselines: every run keeps STAR's recipe weights (1, 10, 10) for (landmark term,
AWing point maps, AWing edge maps), as the official trainer does when its `loss_func` is switched, so a
coordinate-loss baseline ('smoothl1', 'l2') differs from STAR only in the landmark term; 'none' drops
the landmark term (AWing heatmap losses alone). Without a landmark term the network's landmark
heatmaps are untrained, so 'none' runs are scored on their AWing-trained point maps, decoded as
heatmap regression is (argmax + local centroid, `decode_pointmaps`); all other runs on the network's
soft-argmax landmarks.

NMEs are fractions of the inter-ocular distance (outer eye corners), in the official crop frame.
"""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Settings:
  """One study: what is trained, how long, on what data.

  The network input is image_size px with S/4 maps; `sigma` is the point-map Gaussian at the input,
  1.5 px as the official (256 px input, 64 px maps): with maps at S/4 this gives the official target
  shape in map pixels whatever S is. data_image_size is the side of the generated images.
  """
  levels: tuple[float, ...] = (0.0, 2.0, 4.0)
  losses: tuple[str, ...] = ('star', 'smoothl1', 'none')
  seeds: tuple[int, ...] = (0,)
  steps: int = 400
  batch_size: int = 16
  image_size: int = 64
  sigma: float = 1.5
  nstack: int = 1
  nlevels: int = 4
  channels: int = 32
  num_train: int = 3000
  num_test: int = 500
  data_image_size: int = 128
  eval_batch_size: int = 50
  log_every: int = 50


# The default: 25 minutes measured on a 2-core CPU shared with other jobs (load ~5), all 9 runs and the
# dataset build included; 400 steps is about what fits in 30 minutes there.
DEFAULT = Settings()
# --full: configs/synthetic.py's network and length (30 epochs of 3000 faces), more levels, losses and
# seeds, on the standard 256 px synthetic build ('wflw98_amb0'): 75 runs, weeks on a 2-core CPU; meant for
# accelerators (or pick fewer levels / losses / seeds).
FULL = Settings(levels=(0.0, 1.0, 2.0, 4.0, 8.0), losses=('star', 'star_v1', 'smoothl1', 'l2', 'none'),
                seeds=(0, 1, 2), steps=5610, image_size=128, nstack=2, channels=64, data_image_size=256,
                log_every=200)


def level_name(level: float) -> str:
  return f'{level:g}'


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def dataset_config_name(settings: Settings) -> str:
  """The synthetic_faces builder config of the level-0 build: the standard one when it fits."""
  if (settings.num_train, settings.num_test, settings.data_image_size) == (3000, 500, 256):
    return 'wflw98_amb0'
  return f'study_amb0_{settings.num_train}x{settings.num_test}_{settings.data_image_size}px'


def build_level0(settings: Settings, data_dir: str = ''):
  """Builds (once; later calls reuse it) the exact-label synthetic dataset; returns its builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from star_jax.data import build  # pylint: disable=g-import-not-at-top
  from star_jax_datasets.synthetic_faces import synthetic_faces_dataset_builder as sfb  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  name = dataset_config_name(settings)
  if name == 'wflw98_amb0':
    return build.build('synthetic_faces', config=name, data_dir=data_dir)
  config = sfb.SyntheticFacesConfig(
      name=name, layout='WFLW', ambiguity=0.0, num_train=settings.num_train, num_test=settings.num_test,
      image_size=settings.data_image_size,
      description='ambiguity study: exact labels (other levels are re-labelled from it)')
  builder = sfb.Builder(config=config, data_dir=data_dir or None)
  builder.download_and_prepare()
  return builder


class RelabelledSource:
  """A level-0 synthetic train split whose 'landmarks' are re-drawn at another ambiguity level.

  Record i gets exactly the labels the synthetic_faces builder gives train sample i at `level`: its
  exact points (the record's 'clean_landmarks', 98 WFLW points in image px) moved along their tangents
  by the sample's own label-noise stream (`synthetic.sample_rngs`). Images and everything else are the
  level-0 record's, which are the same at every level.
  """

  def __init__(self, source: Sequence[Mapping[str, Any]], level: float, *, seed: int, image_size: int):
    if level < 0:
      raise ValueError(f'ambiguity level must be >= 0, got {level}')
    self.source, self.level, self.seed, self.image_size = source, float(level), int(seed), int(image_size)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index):
    index = int(index)
    record = dict(self.source[index])
    clean = np.asarray(record['clean_landmarks'], np.float64)
    if clean.shape != (98, 2):
      raise ValueError(f"record {index}: 'clean_landmarks' must be the (98, 2) WFLW points, got {clean.shape}")
    _, noise_rng = synthetic.sample_rngs(self.seed, 'train', index)
    z = noise_rng.standard_normal(98)  # the builder's first (and only) draw from this stream
    record['landmarks'] = synthetic.tangential_noise(clean, z, self.level, self.image_size).astype(np.float32)
    return record


def train_source_at(level0_source, level: float, builder_config) -> Sequence[Mapping[str, Any]]:
  """The training split at `level`, from the level-0 build (itself at level 0)."""
  if level == 0:
    return level0_source
  return RelabelledSource(level0_source, level, seed=builder_config.seed, image_size=builder_config.image_size)


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------

def run_config(base, settings: Settings, loss: str, seed: int):
  """The config of one run: `base` (configs/synthetic.py) with the study's network, data and loss."""
  c = base.copy_and_resolve_references()
  c.layout = 'WFLW'
  c.seed = int(seed)
  c.data.name = 'synthetic_faces'
  c.data.config = 'study'  # the sources are opened by the study, not from this field
  c.data.num_workers = 0
  c.data.image_size = settings.image_size
  c.data.heatmap_size = settings.image_size // 4
  c.data.sigma = settings.sigma
  c.data.max_eval_examples = 0
  c.model.nstack = settings.nstack
  c.model.nlevels = settings.nlevels
  c.model.channels = settings.channels
  c.loss.kind = loss
  c.loss.weights = (1.0, 10.0, 10.0)  # STAR's recipe for every loss: see the module docstring
  c.batch_size = settings.batch_size
  c.eval_batch_size = settings.eval_batch_size
  c.total_steps = settings.steps
  # Step decay at 2/3 and 9/10 of the run (configs/synthetic.py decays at epochs 20 and 27 of 30).
  # make_optimizer multiplies milestones by steps per epoch, so the study passes 1 and gives steps.
  c.milestones = tuple(sorted({max(1, round(settings.steps * 2 / 3)), max(1, round(settings.steps * 0.9))}))
  # No EMA: its official decay 0.5 ** (16 / 10000) averages over ~900 steps, longer than a default
  # run, so the EMA weights would still be mostly the initial ones. The raw weights are evaluated.
  c.ema = False
  c.progress = False
  return c


def _check_settings(s: Settings):
  from star_jax import losses as losses_lib  # pylint: disable=g-import-not-at-top
  bad = [k for k in s.losses if k not in losses_lib.LANDMARK_LOSSES]
  if bad:
    raise ValueError(f'unknown loss {bad[0]!r}; choose from {losses_lib.LANDMARK_LOSSES}')
  if not s.levels or not s.losses or not s.seeds:
    raise ValueError('need at least one level, one loss and one seed')
  if any(level < 0 for level in s.levels):
    raise ValueError(f'ambiguity levels must be >= 0, got {s.levels}')
  if s.steps < 1 or s.batch_size < 1:
    raise ValueError(f'steps and batch_size must be >= 1, got {s.steps} and {s.batch_size}')
  if s.image_size % 4 or s.image_size // 4 < 2 ** (s.nlevels - 1):
    raise ValueError(f'image_size {s.image_size} must be a multiple of 4 with maps of at least '
                     f'2^(nlevels - 1) = {2 ** (s.nlevels - 1)} px')
  if s.num_train < s.batch_size or s.num_test < 1:
    raise ValueError(f'num_train ({s.num_train}) must be >= batch_size ({s.batch_size}), num_test >= 1')


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------

def decode_pointmaps(maps):
  """Landmarks of heatmap regression: (B, h, w, N) maps -> (B, N, 2) (x, y) in [-1, 1].

  Argmax, then the centroid of the map over the 3 x 3 pixels around it (sub-pixel), on the
  align-corners grid of the network's own soft-argmax. Used for the AWing-alone runs: without a
  landmark term the network's 'landmarks' (soft-argmax of heatmaps x point maps x edge weights) come
  from 'heatmaps' that nothing trains, so those runs are read from the AWing-trained point maps, as a
  heatmap-regression model (AWing's own setting) is.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b, h, w, n = maps.shape
  flat = maps.reshape(b, h * w, n)
  peak = jnp.argmax(flat, axis=1)                                    # (B, N)
  py, px = peak // w, peak % w
  ys, xs = jnp.arange(h), jnp.arange(w)
  near_y = jnp.abs(ys[None, :, None] - py[:, None, :]) <= 1          # (B, h, N)
  near_x = jnp.abs(xs[None, :, None] - px[:, None, :]) <= 1          # (B, w, N)
  weights = maps * (near_y[:, :, None, :] & near_x[:, None, :, :])   # (B, h, w, N)
  total = jnp.maximum(weights.sum(axis=(1, 2)), 1e-12)
  grid_y = jnp.arange(h, dtype=jnp.float32) / (h - 1) * 2 - 1
  grid_x = jnp.arange(w, dtype=jnp.float32) / (w - 1) * 2 - 1
  x = jnp.einsum('bhwn,w->bn', weights, grid_x) / total
  y = jnp.einsum('bhwn,h->bn', weights, grid_y) / total
  return jnp.stack([x, y], axis=-1)


def make_predictors(graphs):
  """(landmarks_fn, pointmaps_fn): `fn(params, batch_stats, images_uint8) -> (B, N, 2)` in [-1, 1],
  from the last stack's soft-argmax landmarks and from its decoded point maps."""
  import jax  # pylint: disable=g-import-not-at-top
  from star_jax import train_steps  # pylint: disable=g-import-not-at-top

  def from_pointmaps(params, batch_stats, images):
    outputs, _ = train_steps.forward(graphs.eval, params, batch_stats, images)
    return decode_pointmaps(outputs[-1]['pointmaps'])

  return jax.jit(train_steps.make_predict_step(graphs)), jax.jit(from_pointmaps)


def decoder_for(loss: str) -> str:
  """Which output a run is scored on: 'pointmaps' for AWing alone, else the network's 'landmarks'."""
  return 'pointmaps' if loss == 'none' else 'landmarks'


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


def aggregate(records: Sequence[Mapping[str, Any]], settings: Settings, key: str) -> dict:
  """{loss: {level name: (mean, std over seeds)}} of `key` (NaN / None where a run diverged)."""
  out = {}
  for loss in settings.losses:
    out[loss] = {}
    for level in settings.levels:
      values = [r[key] for r in records if r['loss'] == loss and r['level'] == level]
      values = np.array([np.nan if v is None else v for v in values], np.float64)
      if values.size == 0:
        continue
      out[loss][level_name(level)] = (float(values.mean()), float(values.std()) if values.size > 1 else 0.0)
  return out


def _json_table(table: dict) -> dict:
  return {loss: {level: [_finite(v) for v in stat] for level, stat in row.items()} for loss, row in table.items()}


def markdown_tables(records, settings: Settings) -> str:
  """The result tables (NME in % of the IOD; mean ± std over seeds when there are several)."""
  several = len(settings.seeds) > 1
  first, last = level_name(settings.levels[0]), level_name(settings.levels[-1])

  def cell(stat):
    mean, std = stat
    if not math.isfinite(mean):
      return 'diverged'
    return f'{100 * mean:.2f} ± {100 * std:.2f}' if several else f'{100 * mean:.2f}'

  lines = []
  for key, title in (('nme', 'NME (%), all 98 points'),
                     ('nme_ambiguous', 'NME (%), contour and brows (the most ambiguous points)'),
                     ('nme_other', 'NME (%), the other points')):
    table = aggregate(records, settings, key)
    head = ['loss'] + [f'level {level_name(l)}' for l in settings.levels]
    if len(settings.levels) > 1:
      head.append(f'increase {first} → {last}')
    lines += [f'**{title}**', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for loss in settings.losses:
      row = [f'{loss} ({LOSS_LABELS.get(loss, loss)})']
      row += [cell(table[loss][level_name(l)]) for l in settings.levels]
      if len(settings.levels) > 1:
        delta = table[loss][last][0] - table[loss][first][0]
        row.append(f'{100 * delta:+.2f}' if math.isfinite(delta) else 'n/a')
      lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
  seconds = {loss: np.mean([r['train_seconds'] for r in records if r['loss'] == loss]) for loss in settings.losses}
  lines.append('Training time per run (s, excluding compilation): ' +
               ', '.join(f'{loss} {seconds[loss]:.0f}' for loss in settings.losses) + '.')
  return '\n'.join(lines) + '\n'


def plot(records, settings: Settings, path: pathlib.Path):
  """Three panels against the noise level, one line per loss: the test NME of all points, and its
  increase over the first level (the harm of the ambiguity) for all points and for contour + brows.

  In the first panel a loss far worse than the others (best NME over twice the overall best) would
  squash their differences: the axis is fitted to the others and its legend entry gives its range.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  xs = list(settings.levels)
  several = len(settings.seeds) > 1

  def curve(key, loss, relative):
    table = aggregate(records, settings, key)[loss]
    mean = np.array([100 * table[level_name(l)][0] for l in xs])
    std = np.array([100 * table[level_name(l)][1] for l in xs])
    return (mean - mean[0] if relative else mean), std

  # A loss whose best NME is over twice the overall best would squash the others' differences: the
  # first panel's axis is fitted to the others (its legend gives the range) and the harm panels,
  # meaningless for a model that does not localise, leave it out.
  absolute = {loss: curve('nme', loss, False)[0] for loss in settings.losses}
  floor = np.nanmin([np.nanmin(m) for m in absolute.values()])
  off_scale = {loss for loss, m in absolute.items() if np.nanmin(m) > 2 * floor}
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout='constrained')
  panels = ((axes[0], 'nme', False, 'test NME, all 98 points', 'NME (% of inter-ocular distance)'),
            (axes[1], 'nme', True, 'harm of the ambiguity, all 98 points', f'NME - NME at level {level_name(xs[0])} (%)'),
            (axes[2], 'nme_ambiguous', True, 'harm of the ambiguity, contour and brows',
             f'NME - NME at level {level_name(xs[0])} (%)'))
  for ax, key, relative, title, ylabel in panels:
    if not relative and off_scale:
      shown = np.concatenate([m for loss, m in absolute.items() if loss not in off_scale])
      if np.isfinite(shown).any():
        lo, hi = np.nanmin(shown), np.nanmax(shown)
        pad = max(0.5, 0.15 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    for i, loss in enumerate(settings.losses):
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
    ax.set_title(title)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
  fig.legend(*axes[0].get_legend_handles_labels(), loc='outside lower center', ncol=len(settings.losses),
             fontsize=9)
  seeds = f'mean of {len(settings.seeds)} seeds' if several else f'seed {settings.seeds[0]}'
  fig.suptitle(f'Synthetic faces: {settings.steps} steps x {settings.batch_size}, {settings.image_size} px, '
               f'nstack {settings.nstack}, {settings.channels} ch, {seeds}', fontsize=10)
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------

def _fmt_time(seconds: float) -> str:
  seconds = max(0.0, seconds)
  return f'{seconds / 60:.1f} min' if seconds >= 90 else f'{seconds:.0f} s'


def run_study(settings: Settings, base_config, output: pathlib.Path, data_dir: str = '',
              log=print) -> dict:
  """Runs every (seed, level, loss), writes results.json, results.md and nme_vs_ambiguity.png into
  `output`; returns the JSON document."""
  _check_settings(settings)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from star_jax import evaluation, input_pipeline, train_steps, trainer  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  output.mkdir(parents=True, exist_ok=True)
  layout = layouts.get_layout('WFLW')
  mesh = trainer.make_mesh()
  replicated = NamedSharding(mesh, P())
  n_runs = len(settings.seeds) * len(settings.levels) * len(settings.losses)
  log(f'ambiguity study: levels {[level_name(l) for l in settings.levels]}, losses {list(settings.losses)}, '
      f'seeds {list(settings.seeds)}: {n_runs} runs of {settings.steps} steps x {settings.batch_size} on '
      f'{jax.device_count()} {jax.devices()[0].platform} device(s)')

  # ---- Data: one build; test batches materialised once -------------------------------------------
  t0 = time.perf_counter()
  builder = build_level0(settings, data_dir)
  level0_train, test = builder.as_data_source('train'), builder.as_data_source('test')
  configs = {loss: run_config(base_config, settings, loss, settings.seeds[0]) for loss in settings.losses}
  any_config = configs[settings.losses[0]]
  eval_batches = list(input_pipeline.eval_batches(any_config, test))
  build_seconds = time.perf_counter() - t0
  log(f'data: {len(level0_train)} train / {len(test)} test faces ({builder.builder_config.name} in '
      f'{builder.data_dir}), ready in {_fmt_time(build_seconds)}')

  # ---- One optimizer (schedule) for all runs; each loss's step compiled once, on its first batch ----
  tx = train_steps.make_optimizer(any_config, steps_per_epoch=1)  # milestones are in steps here
  graphs0, _ = train_steps.create_train_state(any_config, tx, 0)
  predictors = dict(zip(('landmarks', 'pointmaps'), make_predictors(graphs0)))
  compiled: dict[str, Any] = {}
  compile_seconds: dict[str, float] = {}

  records = []
  run_times: list[float] = []   # wall seconds per (seed, level) block, to estimate what is left
  blocks = [(seed, level) for seed in settings.seeds for level in settings.levels]
  for b, (seed, level) in enumerate(blocks):
    t_block = time.perf_counter()
    source = train_source_at(level0_train, level, builder.builder_config)
    seed_cfg = run_config(base_config, settings, settings.losses[0], seed)
    it = iter(input_pipeline.train_dataset(seed_cfg, source, seed=seed))
    states, graphs, train_secs, last_loss, diverged = {}, {}, {}, {}, {}
    compile_in_block = 0.0
    for loss in settings.losses:
      # The same seed gives every loss the same initial weights.
      graphs[loss], state = train_steps.create_train_state(configs[loss], tx, seed)
      states[loss] = jax.device_put(state, replicated)
      train_secs[loss], last_loss[loss], diverged[loss] = 0.0, [], False
    log(f'[{b + 1}/{len(blocks)}] level {level_name(level)}, seed {seed}: training {", ".join(settings.losses)}')
    with jax.set_mesh(mesh):
      for step in range(1, settings.steps + 1):
        batch = input_pipeline.to_global(next(it), mesh)
        for loss in settings.losses:
          if loss not in compiled:
            tc = time.perf_counter()
            fn = jax.jit(train_steps.make_train_step(graphs[loss], tx, configs[loss]), donate_argnums=(0,))
            compiled[loss] = fn.lower(states[loss], batch).compile()
            compile_seconds[loss] = time.perf_counter() - tc
            compile_in_block += compile_seconds[loss]
            log(f'  compiled the {loss} train step in {_fmt_time(compile_seconds[loss])}')
          ts = time.perf_counter()
          states[loss], metrics = compiled[loss](states[loss], batch)
          value = float(metrics['loss'])  # a host sync: the step's time is measured, not dispatched
          train_secs[loss] += time.perf_counter() - ts
          last_loss[loss].append(value)
          diverged[loss] |= not math.isfinite(value)
        if step % settings.log_every == 0 or step == settings.steps:
          window = {k: np.mean(v[-settings.log_every:]) for k, v in last_loss.items()}
          elapsed = time.perf_counter() - t_block - compile_in_block
          per_step = elapsed / step
          remaining = per_step * (settings.steps - step)
          remaining += (len(blocks) - b - 1) * (np.mean(run_times) if run_times else per_step * settings.steps)
          log(f'  step {step}/{settings.steps}  loss ' + '  '.join(f'{k} {v:.4g}' for k, v in window.items())
              + f'  | {per_step:.2f} s/step (all losses), about {_fmt_time(remaining)} left')
    for loss in settings.losses:
      tp = time.perf_counter()
      params, batch_stats = states[loss].params, states[loss].batch_stats
      predict = predictors[decoder_for(loss)]
      results = evaluation.predict_split(lambda im: predict(params, batch_stats, im), eval_batches, mesh,
                                         settings.image_size)
      summary = evaluation.score(results, layout)
      parts = part_nmes(results['pred'], results['gt'], layout)
      records.append({
          'loss': loss, 'level': float(level), 'seed': int(seed), 'decoded_from': decoder_for(loss),
          'nme': _finite(summary['nme']), 'nme_ambiguous': _finite(parts['nme_ambiguous']),
          'nme_other': _finite(parts['nme_other']), 'fr': _finite(summary['fr']),
          'auc': _finite(summary['auc']), 'nme_image': _finite(summary['nme_image']),
          'final_train_loss': _finite(np.mean(last_loss[loss][-settings.log_every:])),
          'diverged': bool(diverged[loss]), 'train_seconds': train_secs[loss],
          'eval_seconds': time.perf_counter() - tp,
      })
      r = records[-1]
      nme = 'n/a' if r['nme'] is None else f"{100 * r['nme']:.2f}%"
      amb = 'n/a' if r['nme_ambiguous'] is None else f"{100 * r['nme_ambiguous']:.2f}%"
      log(f'  {loss:9s} level {level_name(level)} seed {seed}: NME {nme} (contour+brows {amb}); '
          f'trained in {_fmt_time(train_secs[loss])}')
    run_times.append(time.perf_counter() - t_block - compile_in_block)
    del states

  total_seconds = time.perf_counter() - t_start
  doc = {
      'settings': dataclasses.asdict(settings),
      'dataset': {'builder_config': builder.builder_config.name, 'data_dir': str(builder.data_dir),
                  'num_train': len(level0_train), 'num_test': len(test),
                  'seconds': build_seconds},
      'device': f'{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.machine()}, '
                f'{jax.default_backend()}, {os.cpu_count()} CPUs)',
      'loss_weights': [1.0, 10.0, 10.0],
      'compile_seconds': compile_seconds,
      'total_seconds': total_seconds,
      'runs': records,
      # {loss: {level: [mean, std over seeds]}}; null where a run diverged.
      'nme': _json_table(aggregate(records, settings, 'nme')),
      'nme_ambiguous': _json_table(aggregate(records, settings, 'nme_ambiguous')),
      'nme_other': _json_table(aggregate(records, settings, 'nme_other')),
  }
  write_outputs(doc, output, log)
  return doc


def settings_from_json(doc: Mapping[str, Any]) -> Settings:
  """The Settings of a results.json (lists back to tuples)."""
  return Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc['settings'].items()})


def write_outputs(doc: Mapping[str, Any], output: pathlib.Path, log=print):
  """results.json, results.md and nme_vs_ambiguity.png of a study document, into `output`."""
  settings = settings_from_json(doc)
  md = markdown_tables(doc['runs'], settings)
  md += (f"\nTotal {_fmt_time(doc['total_seconds'])} on {doc['device']} (dataset "
         f"{_fmt_time(doc['dataset']['seconds'])}, compilation {_fmt_time(sum(doc['compile_seconds'].values()))}).\n")
  (output / 'results.json').write_text(json.dumps(doc, indent=1, allow_nan=False))
  (output / 'results.md').write_text(md)
  plot(doc['runs'], settings, output / 'nme_vs_ambiguity.png')
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


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(x) for x in text.split(',') if x.strip())
  except ValueError as e:
    raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from e


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(',') if x.strip())
  except ValueError as e:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from e


def _names(text: str) -> tuple[str, ...]:
  return tuple(x.strip() for x in text.split(',') if x.strip())


def parse_args(argv=None, description: str = '') -> tuple[Settings, argparse.Namespace]:
  """Command line -> (Settings, the raw namespace). Unset options take the --full or default value."""
  parser = argparse.ArgumentParser(description=description or __doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--full', action='store_true',
                      help='the long study (configs/synthetic.py network, 30 epochs, 5 levels, 5 losses, '
                           '3 seeds): weeks on a 2-core CPU, meant for a GPU')
  parser.add_argument('--output', default='runs/ambiguity_study', help='where the table and plot go')
  parser.add_argument('--replot', action='store_true',
                      help="only rewrite results.md and the plot from --output's results.json (no training)")
  parser.add_argument('--data_dir', default='',
                      help='TFDS data dir for the synthetic build (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)')
  parser.add_argument('--levels', type=_floats, help='ambiguity levels, e.g. 0,2,4')
  parser.add_argument('--losses', type=_names, help="losses, from 'star', 'star_v1', 'smoothl1', 'l2', 'none'")
  parser.add_argument('--seeds', type=_ints, help='seeds (initialisation, shuffling, augmentation), e.g. 0,1,2')
  for name, kind, what in (('steps', int, 'training steps per run'), ('batch_size', int, 'batch size'),
                           ('image_size', int, 'network input side (px); maps are a quarter of it'),
                           ('sigma', float, 'point-map Gaussian sigma at the input (px)'),
                           ('nstack', int, 'hourglasses'), ('nlevels', int, 'hourglass depth'),
                           ('channels', int, 'feature channels'),
                           ('num_train', int, 'training faces'), ('num_test', int, 'test faces'),
                           ('data_image_size', int, 'side of the generated images (px)'),
                           ('eval_batch_size', int, 'evaluation batch'),
                           ('log_every', int, 'progress line every N steps')):
    parser.add_argument(f'--{name}', type=kind, help=what)
  args = parser.parse_args(argv)
  preset = FULL if args.full else DEFAULT
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
               if getattr(args, f.name, None) is not None}
  return dataclasses.replace(preset, **overrides), args
