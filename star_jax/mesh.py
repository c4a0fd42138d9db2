"""The device mesh, and moving batches between this process and global arrays.

One 1-D mesh ('data') spans every device of every process: the batch is sharded over it and the
state replicated. Works the same on one CPU, several devices and several hosts.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils


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
