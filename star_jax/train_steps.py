"""The functional training and evaluation steps: pure functions of a TrainState pytree.

The model is an NNX module; the steps work on its split state (`nnx.split`) so that `jax.jit` sees
plain pytrees, the state can be donated, and Orbax saves it as it is. BatchNorm statistics are
computed over the *global* batch: under `jit` on a mesh the batch mean is a cross-device reduction
(the official multi-GPU run uses SyncBatchNorm, which is the same thing).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from flax import struct

from star_jax import losses
from star_jax import models


@struct.dataclass
class TrainState:
  """Everything that changes during training. Shapes follow the model's nnx state."""
  step: jax.Array            # () int32, optimizer steps taken
  params: Any                # nnx.State of nnx.Param
  batch_stats: Any           # nnx.State of nnx.BatchStat (running mean / var)
  opt_state: Any             # optax state
  ema_params: Any            # EMA of params (None when config.ema is off)
  ema_batch_stats: Any       # EMA of the BatchNorm statistics, as the official accumulate_net does


@dataclasses.dataclass(frozen=True)
class Graphs:
  """Static halves of the model: one graph in train mode (batch statistics), one in eval mode."""
  train: Any
  eval: Any


def ema_decay(config: ml_collections.ConfigDict) -> float:
  """The official EMA decay 0.5 ** (global_batch / 10000), unless config.ema_decay >= 0."""
  if config.ema_decay >= 0:
    return float(config.ema_decay)
  return 0.5 ** (config.batch_size / 10000.0)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Step decay: lr x gamma at each milestone epoch (PyTorch MultiStepLR, stepped once per epoch)."""
  boundaries = {int(m) * steps_per_epoch: config.gamma for m in config.milestones}
  return optax.piecewise_constant_schedule(config.lr, boundaries)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam as the official code builds it (no weight decay reaches the optimizer there, see configs/base.py)."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = optax.adam(schedule, b1=config.b1, b2=config.b2)
  if config.weight_decay > 0:
    # PyTorch Adam's weight_decay is an L2 term added to the gradient (not AdamW's decoupled decay).
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  return tx


def create_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                       rng_seed: int) -> tuple[Graphs, TrainState]:
  """Builds the model and its TrainState (on the default device; the caller places it)."""
  model = models.create_model(config, nnx.Rngs(rng_seed))
  model.train()
  train_graph, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_graph, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if config.ema else None,
      ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if config.ema else None,
  )
  return Graphs(train=train_graph, eval=eval_graph), state


def forward(graph, params, batch_stats, images_uint8: jax.Array):
  """Runs the model given by (graph, params, batch_stats) on uint8 RGB images (B, S, S, 3).

  Returns (per-stack outputs, the batch statistics after the call): in train mode BatchNorm
  updates its running statistics as a side effect, which the functional step hands back.
  """
  model = nnx.merge(graph, params, batch_stats)
  outputs = model(models.preprocess(images_uint8))
  return outputs, nnx.state(model, nnx.BatchStat)


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
      outputs, new_batch_stats = forward(graphs.train, params, batch_stats, batch['image'])
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


def make_predict_step(graphs: Graphs):
  """Returns `predict(params, batch_stats, images_uint8) -> landmarks (B, N, 2) in [-1, 1]` (last stack)."""

  def predict(params, batch_stats, images):
    outputs, _ = forward(graphs.eval, params, batch_stats, images)
    return outputs[-1]['landmarks']

  return predict
