"""The study's grid: its variants (landmark losses and STAR ablations), the cells (variant, level,
seed) in the order they run, and the training config of each cell.

Variants: a landmark loss of `losses.LANDMARK_LOSSES` ('star' is STARLoss_v2, 'star_v1' the older
one, 'smoothl1' / 'l2' the coordinate baselines), or '<star|star_v1>_w<w>' for STAR with another
eigenvalue-restriction weight (the ablation 'star_w0'). The main grid is `losses` x `levels` x
`seeds`; the ablation variants run at `ablation_level` for every seed.
"""

from __future__ import annotations

import hashlib
import json
import re

from star_jax import losses as losses_lib
from star_jax.data import synthetic

LOSS_LABELS = {
    'star': 'STAR (v2) + AWing',
    'star_v1': 'STAR v1 + AWing',
    'smoothl1': 'smooth-L1 coords + AWing',
    'l2': 'L2 coords + AWing',
    'l1': 'L1 coords + AWing',
    'none': 'AWing alone, point maps decoded',
}
_VARIANT = re.compile(r'^(?P<loss>star|star_v1)_w(?P<w>\d+(?:\.\d+)?)$')


def level_name(level: float) -> str:
  return f'{level:g}'


def cell_name(variant: str, level: float, seed: int) -> str:
  return f'{variant}_amb{level_name(level)}_seed{seed}'


def variant_loss(variant: str) -> tuple[str, float | None]:
  """(loss kind, STAR weight w or None for the config's) of a variant name; ValueError if unknown."""
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
