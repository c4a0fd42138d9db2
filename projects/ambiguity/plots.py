"""The study's figures: NME and harm against the noise level, the axis-to-tangent angle histograms, and
the covariance's angle and anisotropy against the level."""

from __future__ import annotations

import pathlib
from typing import Mapping

from matplotlib import colormaps
from matplotlib import ticker
from matplotlib.figure import Figure
import numpy as np

from projects.ambiguity.cells import level_name, variant_label
from projects.ambiguity.scoring import ANGLE_BINS, GROUPS
from projects.ambiguity.tables import get, mean_spread, seed_values


def plot(records, grid, path: pathlib.Path, title: str = '') -> None:
  """Three panels against the noise level, one line per loss (mean ± spread over seeds): the test
  NME of all points, and the harm (NME minus NME at the first level, paired by seed) on the contour
  and brows and on the other points. The ablation variants are single points at their level.

  In the first panel a loss far worse than the others (best NME over twice the overall best) would
  squash their differences: the axis is fitted to the others and its legend entry gives its range;
  the harm panels, meaningless for a model that does not localise, leave it out.
  """
  xs = list(get(grid, 'levels'))
  losses = list(get(grid, 'losses'))
  seeds = list(get(grid, 'seeds'))
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

  levels, losses = list(get(grid, 'levels')), list(get(grid, 'losses'))
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

  levels, losses, seeds = list(get(grid, 'levels')), list(get(grid, 'losses')), list(get(grid, 'seeds'))
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


PLOTS = {'nme_vs_ambiguity.png': plot, 'axis_angles.png': plot_axis_angles,
         'covariance_vs_ambiguity.png': plot_covariance}
