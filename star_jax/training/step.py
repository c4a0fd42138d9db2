"""The training step: a pure function of a TrainState pytree and a batch, jit-compiled by the loop.

BatchNorm statistics are computed over the *global* batch: under `jit` on a mesh the batch mean is a
cross-device reduction (the official multi-GPU run uses SyncBatchNorm, which is the same thing).
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from star_jax import losses
from star_jax import models
from star_jax.training.state import Graphs
from star_jax.training.state import TrainState
from star_jax.training.state import ema_decay


def make_train_step(graphs: Graphs, tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
  """Returns `train_step(state, batch) -> (state, metrics)`, to be jit-compiled with donated state.

  `batch`: 'image' uint8 (B, S, S, 3) RGB, 'landmarks' (B, N, 2) in [-1, 1], 'pointmaps'
  (B, h, w, N), 'edgemaps' (B, h, w, E) — global arrays sharded over the batch.
  """
  decay = ema_decay(config)

  def train_step(state: TrainState, batch):
    def loss_fn(params, batch_stats):
      # batch_stats is differentiated too (its gradient is zero and unused) so that it lives in the
      # same trace as params: NNX only lets BatchNorm update statistics created in the current trace.
      outputs, new_batch_stats = models.forward(graphs.train, params, batch_stats, batch['image'])
      total, metrics = losses.multistack_loss(outputs, batch, config.loss)
      return total, (metrics, new_batch_stats)

    (total, (metrics, new_batch_stats)), (grads, _) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, batch_stats=new_batch_stats, opt_state=opt_state)
    if config.ema:
      # ema = decay * ema + (1 - decay) * current, for weights and BatchNorm statistics alike
      # (official accumulate_net, applied after every optimizer step).
      mix = lambda e, p: decay * e + (1.0 - decay) * p
      new = new.replace(ema_params=jax.tree.map(mix, state.ema_params, params),
                        ema_batch_stats=jax.tree.map(mix, state.ema_batch_stats, new_batch_stats))
    metrics = dict(metrics, loss=total, grad_norm=optax.global_norm(grads))
    return new, metrics

  return train_step
