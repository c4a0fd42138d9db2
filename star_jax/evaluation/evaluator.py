"""The trainer's evaluation pass, as an object (in the way of big_vision's evaluators): built once with
the test split and the model's eval-mode graph, run at each evaluation on the current weights."""

from __future__ import annotations

import functools
import time

from absl import logging
import jax

from star_jax import models
from star_jax.checkpoints import selection
from star_jax.data import pipeline
from star_jax.evaluation import scoring
from star_jax.layouts import Layout


class Evaluator:
  """Scores weights on the test split as the official tester does, and picks the winner by the
  official model selection (`checkpoints.selection.select_weights`).

  config: the run's config (eval batch size, image size, decoding). source: the test split's records.
  mesh: the device mesh the batches are spread over. eval_graph: the model's graph in eval mode.
  `seconds` accumulates the time spent in `run`.
  """

  def __init__(self, config, source, layout: Layout, mesh, eval_graph):
    self.config = config
    self.source = source
    self.layout = layout
    self.mesh = mesh
    self.seconds = 0.0
    self._predict = jax.jit(models.make_predict_fn(eval_graph, decode=config.model.get('decode', 'landmarks')))

  def run(self, step: int, weights: dict[str, tuple]) -> dict:
    """Scores each of `weights` ({'model': (params, batch_stats)[, 'ema': ...]}).

    Returns {'<name>/<metric>': value} for every weights' NME, FR, AUC, ..., plus 'nme' and
    'best_weights' (the evaluation's score and its winner) and 'selection' (the rule).
    """
    t0 = time.perf_counter()
    out = {}
    for name, (params, batch_stats) in weights.items():
      batches = pipeline.eval_batches(self.config, self.source)
      results = scoring.predict_split(functools.partial(self._predict, params, batch_stats), batches, self.mesh,
                                      self.config.data.image_size)
      summary = scoring.score(results, self.layout)
      out.update({f'{name}/{k}': v for k, v in summary.items() if isinstance(v, (int, float))})
    out['nme'], out['best_weights'] = selection.select_weights(out)
    out['selection'] = selection.RULE
    logging.info('step %d eval: %s; scored: %s weights', step,
                 {k: round(v, 5) for k, v in out.items() if 'nme' in k}, out['best_weights'])
    self.seconds += time.perf_counter() - t0
    return out
