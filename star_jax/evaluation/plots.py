"""Plots of an evaluation: the cumulative error distribution (CED)."""

from __future__ import annotations

from typing import Mapping

from matplotlib.figure import Figure
import numpy as np


def ced_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], threshold: float, path: str,
               title: str = 'Cumulative error distribution') -> None:
  """Writes a CED plot (PNG) of one or more curves.

  curves: label -> (xs, ys): NME thresholds (fractions of the normalising distance) and the fraction
    of images with NME at or below each (`metrics.ced`). Plotted in percent, up to `threshold`; the
    first curve (the whole split) is drawn in black.
  """
  # A bare Figure (no pyplot): no global backend or figure state is touched.
  fig = Figure(figsize=(6, 4.5), dpi=100)
  ax = fig.subplots()
  for k, (label, (xs, ys)) in enumerate(curves.items()):
    # The first curve (the whole split) in black and bolder, the subsets in colour.
    style = {'color': 'black', 'linewidth': 2.2} if k == 0 else {'linewidth': 1.3}
    ax.plot(np.asarray(xs) * 100.0, np.asarray(ys) * 100.0, label=label, **style)
  ax.set_xlim(0, threshold * 100.0)
  ax.set_ylim(0, 100)
  ax.set_xlabel('NME (%)')
  ax.set_ylabel('images (%)')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(loc='lower right', fontsize='small')
  fig.tight_layout()
  fig.savefig(path)
