"""The published table, reproduced: every published row of a dataset (overall and per subset, each
normalisation the paper reports) next to ours, their difference, and a verdict against a tolerance.

Units as the paper: NME and FR in %, AUC as a fraction. The default tolerances are the paper's
rounding (half a unit of its last digit: 0.005 for NME and FR, 0.0005 for AUC): what a converted
official checkpoint, evaluated with the official protocol on the official metadata, must reach.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from star_jax import metrics
from star_jax.evaluation import report
from star_jax.layouts import Layout

# Half a unit of the published last digit.
ROUNDING = {'nme': 0.005, 'fr': 0.005, 'auc': 0.0005}


@dataclasses.dataclass(frozen=True)
class Row:
  """One published figure and ours. `ours` is None when the split has no images for the subset."""
  norm: str
  subset: str
  metric: str                  # 'nme', 'fr' or 'auc'
  published: float
  ours: float | None
  tolerance: float

  @property
  def difference(self) -> float | None:
    return None if self.ours is None else self.ours - self.published

  @property
  def verdict(self) -> str:
    if self.ours is None:
      return 'no data'
    return 'reproduced' if abs(self.difference) <= self.tolerance + 1e-12 else 'differs'


def rows(results: dict, layout: Layout, config, tolerance: dict | None = None) -> list[Row]:
  """The published rows of `config`'s dataset, scored on `results` (`scoring.predict_split`'s dict).

  tolerance: metric -> allowed |ours - published| (paper units); default ROUNDING.
  """
  tolerance = dict(ROUNDING, **(tolerance or {}))
  out = []
  for norm in ('ocular', 'pupil'):
    published = report.published_numbers(config, norm)
    if not published:
      continue
    summary = metrics.summarize(results['pred'], results['gt'], layout, norm,
                                attributes=results.get('attributes'))
    ours = {row['subset']: row for row in report.subset_rows(summary, layout)}
    for subset, figures in published.items():
      for metric, value in figures.items():
        mine = ours.get(subset, {}).get(metric)
        if mine is not None and not np.isfinite(mine):
          mine = None
        out.append(Row(norm, subset, metric, float(value), None if mine is None else float(mine),
                       float(tolerance[metric])))
  return out


def markdown(table: list[Row]) -> str:
  """The table: one line per published figure, with the verdict."""
  lines = ['| normalisation | subset | metric | published | ours | difference | tolerance | verdict |',
           '|---|---|---|---|---|---|---|---|']
  for r in table:
    digits = 4 if r.metric == 'auc' else 3
    ours = 'n/a' if r.ours is None else f'{r.ours:.{digits}f}'
    diff = 'n/a' if r.difference is None else f'{r.difference:+.{digits}f}'
    unit = '' if r.metric == 'auc' else ' %'
    lines.append(f'| {r.norm} | {r.subset} | {r.metric.upper()}{unit} | {r.published:g} | {ours} | {diff} | '
                 f'{r.tolerance:g} | {r.verdict} |')
  return '\n'.join(lines)


def all_reproduced(table: list[Row]) -> bool:
  return bool(table) and all(r.verdict == 'reproduced' for r in table)
