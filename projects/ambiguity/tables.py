"""The study's statistics and its result tables (markdown).

Statistics: over seeds, a cell's mean and spread (the population standard deviation; with two seeds,
half their difference). Differences between cells are taken per seed (paired) and a difference is
called only when its mean exceeds its spread (with two seeds: both seeds agree on its sign).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from projects.ambiguity.cells import level_name, variant_label, variant_loss
from projects.ambiguity.scoring import ALIGNED_DEGREES, GROUPS, finite


def get(grid, key):
  """grid[key] of a dict (a results.json document) or the attribute of a config."""
  return grid[key] if isinstance(grid, Mapping) else getattr(grid, key)


def _value(record: Mapping[str, Any], key: str) -> float:
  """record[key], where key may be a path 'covariance/groups/contour/angle_median'; NaN if absent."""
  value: Any = record
  for part in key.split('/'):
    if not isinstance(value, Mapping) or value.get(part) is None:
      return math.nan
    value = value[part]
  return float(value)


def find(records, variant: str, level: float, seed: int):
  """The record of a cell (None when missing)."""
  for r in records:
    if r.get('variant', r['loss']) == variant and r['level'] == level and r['seed'] == seed:
      return r
  return None


def seed_values(records, variant: str, level: float, key: str, seeds: Sequence[int]) -> np.ndarray:
  """(len(seeds),) the cell's `key` per seed (NaN where missing or diverged)."""
  out = []
  for seed in seeds:
    r = find(records, variant, level, seed)
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


def json_table(aggregated: dict) -> dict:
  """An `aggregate` table for JSON: NaN as null."""
  return {v: {level: [finite(x) for x in stat] for level, stat in row.items()} for v, row in aggregated.items()}


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def table(title: str, head: Sequence[str], rows: Sequence[Sequence[str]], *, subtitle: str = '',
          note: str = '') -> list[str]:
  """The lines of one markdown table: its title (bold, then `subtitle` plain), a blank line, the
  header and its rule, the rows, a blank line, and `note` with a blank line when there is one."""
  lines = [f'**{title}**' + (f' {subtitle}' if subtitle else ''), '', '| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  lines.append('')
  if note:
    lines += [note, '']
  return lines


def _pct(mean: float, spread: float, several: bool, signed: bool = False, called: bool = False) -> str:
  if not math.isfinite(mean):
    return 'diverged'
  text = f'{100 * mean:+.2f}' if signed else f'{100 * mean:.2f}'
  if several:
    text += f' ± {100 * spread:.2f}'
  return f'**{text}**' if called else text


def _cell(records, variant: str, level: float, key: str, seeds) -> str:
  """A table entry: the cell's mean (± spread) in %."""
  return _pct(*mean_spread(seed_values(records, variant, level, key, seeds)), len(seeds) > 1)


def _diff(records, a, b, key: str, seeds) -> str:
  """A table entry: `paired_difference` in points of %, bold when called."""
  mean, spread, called = paired_difference(records, a, b, key, seeds)
  return _pct(mean, spread, len(seeds) > 1, signed=True, called=called)


_POINTS = (('nme', 'all'), ('nme_ambiguous', 'contour + brows'), ('nme_other', 'others'))


def _grid_tables(records, doc) -> list[str]:
  levels, losses, seeds = doc['levels'], doc['losses'], doc['seeds']
  lines = []
  for key, title in (('nme', 'NME (%), all 98 points'),
                     ('nme_ambiguous', 'NME (%), contour and brows (the most ambiguous points)'),
                     ('nme_other', 'NME (%), the other points')):
    rows = [[f'{loss} ({variant_label(loss)})'] + [_cell(records, loss, v, key, seeds) for v in levels]
            for loss in losses]
    lines += table(title, ['loss'] + [f'level {level_name(v)}' for v in levels], rows,
                   subtitle='(mean ± spread over seeds)' if len(seeds) > 1 else '')
  return lines


def _harm_table(records, doc) -> list[str]:
  levels, losses, seeds = doc['levels'], doc['losses'], doc['seeds']
  if len(levels) < 2:
    return []
  base = levels[0]
  rows = [[loss, what] + [_diff(records, (loss, v), (loss, base), key, seeds) for v in levels[1:]]
          for loss in losses for key, what in _POINTS]
  return table(f'Harm: NME at the level minus NME at level {level_name(base)} (points of NME %, paired by seed'
               + ('; bold: larger than its spread' if len(seeds) > 1 else '') + ')',
               ['loss', 'points'] + [f'level {level_name(v)}' for v in levels[1:]], rows)


def _harm_difference(records, baseline: str, key: str, levels, seeds) -> str:
  """STAR's harm minus the baseline's from the first to the last level, paired by seed."""
  base, top = levels[0], levels[-1]
  diff = ((seed_values(records, 'star', top, key, seeds) - seed_values(records, 'star', base, key, seeds))
          - (seed_values(records, baseline, top, key, seeds) - seed_values(records, baseline, base, key, seeds)))
  m, s = mean_spread(diff)
  return _pct(m, s, len(seeds) > 1, signed=True, called=len(seeds) > 1 and math.isfinite(m) and abs(m) > s)


def _star_vs_baselines(records, doc) -> list[str]:
  levels, losses, seeds = doc['levels'], doc['losses'], doc['seeds']
  baselines = [v for v in losses if variant_loss(v)[0] not in ('star', 'star_v1')]
  if 'star' not in losses or not baselines:
    return []
  head = ['difference', 'points'] + [f'level {level_name(v)}' for v in levels]
  if len(levels) > 1:
    head += [f'harm difference at level {level_name(levels[-1])}']
  rows = []
  for b in baselines:
    for key, what in _POINTS:
      row = [f'star − {b}', what] + [_diff(records, ('star', v), (b, v), key, seeds) for v in levels]
      if len(levels) > 1:
        row.append(_harm_difference(records, b, key, levels, seeds))
      rows.append(row)
  note = (f'(harm difference: STAR\'s harm minus the baseline\'s, level {level_name(levels[0])} → '
          f'{level_name(levels[-1])}; negative: STAR loses less to the noise.)' if len(levels) > 1 else '')
  return table('STAR minus baseline (points of NME %, paired by seed; negative: STAR better'
               + ('; bold: larger than its spread' if len(seeds) > 1 else '') + ')', head, rows, note=note)


def _ablation_table(records, doc) -> list[str]:
  ablations, seeds = doc.get('ablations', []), doc['seeds']
  if not ablations or 'star' not in doc['losses']:
    return []
  level = doc['ablation_level']
  keys = [key for key, _ in _POINTS]
  rows = []
  for v in ['star', *ablations]:
    row = [f'{v} ({variant_label(v)})'] + [_cell(records, v, level, k, seeds) for k in keys]
    row += ['' if v == 'star' else _diff(records, (v, level), ('star', level), k, seeds) for k in keys]
    rows.append(row)
  return table(f'Eigenvalue restriction and STAR version at level {level_name(level)}',
               ['variant', 'all', 'contour + brows', 'others', 'Δ all', 'Δ contour + brows', 'Δ others'], rows,
               subtitle='(NME %; Δ: minus STAR v2 with w = 1, paired by seed'
               + ('; bold: larger than its spread' if len(seeds) > 1 else '') + ')')


def _covariance_entry(records, variant: str, level: float, key: str, fmt: str, seeds) -> str:
  m, s = mean_spread(seed_values(records, variant, level, key, seeds))
  if not math.isfinite(m):
    return 'n/a'
  return fmt.format(m) + (f' ± {fmt.format(s)}' if len(seeds) > 1 else '')


def _covariance_table(records, doc) -> list[str]:
  levels, seeds = doc['levels'], doc['seeds']
  variants = list(dict.fromkeys([*doc['losses'], *doc.get('ablations', [])]))
  stats = (('angle_median', '{:.0f}'), ('aligned', '{:.2f}'), ('anisotropy_median', '{:.1f}'))
  rows = []
  for v in variants:
    for level in levels:
      if find(records, v, level, seeds[0]) is None and not any(find(records, v, level, s) for s in seeds):
        continue
      rows.append([v, level_name(level)] + [
          _covariance_entry(records, v, level, f'covariance/groups/{g}/{what}', fmt, seeds)
          for g in GROUPS for what, fmt in stats])
  return table('Predicted covariance against the true tangent',
               ['loss', 'level'] + [f'{g} {what}' for g in GROUPS for what in ('angle', 'aligned', 'anisotropy')],
               rows, subtitle='(test split; per cell the median over faces and points of the group, then mean'
               + (' ± spread' if len(seeds) > 1 else '') + ' over seeds). Angle: principal axis to tangent, degrees '
               f'(0 = along the curve, 45 = no relation, 90 = across); aligned: share within {ALIGNED_DEGREES:g}° '
               f'(a random axis: {ALIGNED_DEGREES / 90:.2f}); anisotropy: larger / smaller eigenvalue.')


def markdown_tables(records, grid) -> str:
  """The result tables (NME in % of the IOD; mean ± spread over seeds when there are several)."""
  doc = {'levels': list(get(grid, 'levels')), 'losses': list(get(grid, 'losses')),
         'seeds': list(get(grid, 'seeds')),
         'ablations': list(grid.get('ablations', []) if isinstance(grid, Mapping) else getattr(grid, 'ablations', [])),
         'ablation_level': (grid.get('ablation_level', 0.0) if isinstance(grid, Mapping)
                            else getattr(grid, 'ablation_level', 0.0))}
  lines = _grid_tables(records, doc) + _harm_table(records, doc) + _star_vs_baselines(records, doc)
  lines += _ablation_table(records, doc)
  if any(r.get('covariance') for r in records):
    lines += _covariance_table(records, doc)
  variants = list(dict.fromkeys([*doc['losses'], *doc['ablations']]))
  seconds = {v: np.mean([r['train_seconds'] for r in records if r.get('variant', r['loss']) == v] or [math.nan])
             for v in variants}
  lines.append('Training time per run (s, excluding compilation): ' +
               ', '.join(f'{v} {seconds[v]:.0f}' for v in variants) + '.')
  return '\n'.join(lines) + '\n'
