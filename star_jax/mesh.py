"""The device mesh, and moving batches between this process and global arrays.

One 1-D mesh ('data') spans every device of every process: the batch is sharded over it and the
state replicated. Works the same on one CPU, several devices and several hosts.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax._src import distributed  # the coordination service's client: its barrier has no public API
from jax.experimental import multihost_utils

# How long a process waits for the others to compile the training step (a large network on a slow host).
COMPILE_BARRIER_TIMEOUT_S = 3600


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over all devices of all processes."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """The sharding of arrays every device holds whole (the training state)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def to_global(batch: Mapping[str, Any], mesh_or_sharding) -> dict[str, jax.Array]:
  """Local numpy batch -> global jax.Arrays, split along the leading (batch) axis over the mesh's
  'data' axis (a Mesh) or laid out by the given sharding. Every process passes its own share, in
  process order (as the input pipeline produces them)."""
  if isinstance(mesh_or_sharding, jax.sharding.Mesh):
    sharding = jax.sharding.NamedSharding(mesh_or_sharding, jax.sharding.PartitionSpec('data'))
  else:
    sharding = mesh_or_sharding
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), dict(batch))


def gather(x: jax.Array) -> np.ndarray:
  """The full global array on every host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def compile_on_every_process(jitted, *args) -> None:
  """Compiles `jitted` for `args` and, in a multi-process run, waits until every process has, so that
  all reach its first collective together. CPU collectives (gloo) give a process 30 s to meet the
  others there, less than compile times can differ between hosts or busy processes. JAX keeps the
  program: the call that follows does not compile again. Does nothing in a single process."""
  if jax.process_count() == 1:
    return
  jitted.lower(*args).compile()
  client = distributed.global_state.client
  if client is not None:     # jax.distributed.initialize ran (always, for several processes)
    client.wait_at_barrier('star_jax_step_compiled', COMPILE_BARRIER_TIMEOUT_S * 1000)
