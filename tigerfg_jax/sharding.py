"""Device mesh, parameter shardings from logical axis names, and global batches.

The mesh always has the axes ('data', 'model'). Batches are sharded over 'data';
parameters follow the logical-axis rule table named by `config.mesh.param_sharding`
(`models.partitioning.logical_axis_rules`), so data parallel vs FSDP vs tensor
parallel is a config change.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tigerfg_jax.models import factory, partitioning

MESH_AXES = ("data", "model")


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """Resolves `mesh.data` (-1 = the rest) and checks the product is the device count."""
  model = int(mesh_config.model)
  if model < 1 or num_devices % model:
    raise ValueError(
        f"config.mesh.model={model} must be >= 1 and divide the {num_devices} devices")
  data = num_devices // model if mesh_config.data == -1 else int(mesh_config.data)
  if data * model != num_devices:
    raise ValueError(
        f"config.mesh.data={mesh_config.data} x config.mesh.model={model} != "
        f"{num_devices} devices")
  return data, model


def make_mesh(mesh_config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh over all devices, in Auto mode (shardings propagate)."""
  shape = mesh_shape(mesh_config, jax.device_count())
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh(shape, MESH_AXES, axis_types=(auto, auto))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension over 'data', the rest replicated."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(abstract_variables: Any, mesh: jax.sharding.Mesh,
                    param_sharding: str) -> Any:
  """NamedShardings for an (abstract, boxed) variable tree from its logical axis names.

  Args:
    abstract_variables: `jax.eval_shape(model.init, ...)` output whose leaves are
      `nn.LogicallyPartitioned` boxes (unannotated leaves are replicated).
    mesh: the ('data', 'model') mesh.
    param_sharding: 'replicated' | 'fsdp' | 'tensor'.

  Returns:
    The same tree structure as `nn.meta.unbox(abstract_variables)` with NamedShardings.
  """
  rules = partitioning.logical_axis_rules(param_sharding)
  logical_specs = nn.get_partition_spec(abstract_variables)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def abstract_params(model: nn.Module, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh) -> Any:
  """`model`'s unboxed params as `jax.ShapeDtypeStruct`s carrying their NamedShardings.

  From shapes only (`models.factory.abstract_variables`): nothing is allocated.
  """
  boxed = factory.abstract_variables(model, config)
  shardings = param_shardings(boxed, mesh, config.mesh.param_sharding)["params"]
  return with_shardings(nn.meta.unbox(boxed)["params"], shardings)


def with_shardings(tree: Any, shardings: Any) -> Any:
  """`tree`'s leaves as `jax.ShapeDtypeStruct`s with the matching `shardings` leaf."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's slice (one call per process)."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def global_batch_from_host(batch: dict[str, np.ndarray],
                           sharding: NamedSharding) -> dict[str, jax.Array]:
  """Global arrays from a batch every process holds in full (evaluation batches)."""
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
          for k, v in batch.items()}
