"""Meshes and the logical-axis -> mesh-axis rules: the one place that knows mesh axis names.

Layers annotate parameters with logical axis names (`nnx.Param(value, axes=("embed", "mlp"))`) and activations with
`constrain(x, ("batch", "length", "embed"))`. Which physical mesh axis each logical name lands on is decided here, so
data parallelism, FSDP and tensor parallelism are configuration, not code.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tregjax import errors

log = logging.getLogger("tregjax.parallel")

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes (a tuple shards over several mesh axes; None replicates). Styled after maxtext's
# `logical_axis_rules`. Parameters are sharded over `fsdp` (ZeRO-3 style) and `tensor` (Megatron-style splits of
# heads and MLP); activations shard their batch over every data-like axis.
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,
    "classes": None,
    "lora_rank": None,  # LoRA adapters: the small rank axis replicates; their other axes are the weight's
    # KV cache
    "cache_batch": ("data", "fsdp"),
    "cache_length": None,
}


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with the one -1 axis filled by the devices the others leave: the one place this rule lives
  (meshes, the trainer's config check and the per-process meshes of score and generate all resolve sizes here)."""
  shape = [data, fsdp, tensor]
  named = f"data={data} x fsdp={fsdp} x tensor={tensor}"
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh {named}: sizes must be positive, with at most one -1")
  fixed = math.prod(s for s in shape if s != -1)
  if num_devices % fixed or (-1 not in shape and fixed != num_devices):
    raise ValueError(f"mesh {named} needs {fixed} devices{' (times the -1 axis)' if -1 in shape else ''}, but "
                     f"{num_devices} are available")
  if -1 in shape:
    shape[shape.index(-1)] = num_devices // fixed
  return shape[0], shape[1], shape[2]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh; one axis may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  device_array = np.asarray(devices).reshape(mesh_shape(data, fsdp, tensor, len(devices)))
  return Mesh(device_array, MESH_AXES)


def mesh_from_config(config: Any, *, per_process: bool = False, devices: Sequence[Any] | None = None) -> Mesh:
  """The mesh `config.mesh` names (absent keys: data=-1, fsdp=1, tensor=1); a size that does not fit the devices is a
  ConfigError naming the config keys. The one mesh constructor of every command.

  per_process=False (train): every device of every process. per_process=True (score, generate): this process's own
  devices, the model over mesh.fsdp x mesh.tensor and the rows over the rest (fsdp=-1 or tensor=-1: that axis takes
  every local device the other leaves); those commands split their work by process first (shard n to process
  n % count), so no collective ever crosses hosts and `mesh.data`, sized for the trainer's global mesh, does not
  apply. `devices` replaces jax's (`tregjax.compile`: a TPU topology's devices, or one host's of them).
  """
  given = config.get("mesh", None) or {}
  data, fsdp, tensor = (given.get(k, d) for k, d in (("data", -1), ("fsdp", 1), ("tensor", 1)))
  if not per_process:
    try:
      return make_mesh(data, fsdp, tensor, devices=devices)
    except ValueError as e:
      raise errors.ConfigError(f"config.mesh: {e}") from e
  devices = jax.local_devices() if devices is None else list(devices)
  try:
    return make_mesh(1 if -1 in (fsdp, tensor) else -1, fsdp, tensor, devices=devices)
  except ValueError as e:
    raise errors.ConfigError(f"config.mesh.tensor={tensor} x config.mesh.fsdp={fsdp} does not divide the "
                             f"{len(devices)} local device(s) of this process (score and generate shard the model over "
                             f"fsdp x tensor and the rows over the rest); set config.mesh.tensor and config.mesh.fsdp "
                             f"to divisors of {len(devices)} ({e})") from e


def logical_to_spec(axes: Sequence[str | None] | None, rules: dict | None = None) -> PartitionSpec:
  """Map logical axis names to a PartitionSpec; unknown names are an error (a typo must not silently replicate)."""
  if axes is None:
    return PartitionSpec()
  rules = LOGICAL_RULES if rules is None else rules
  out, used = [], set()
  for name in axes:
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ValueError(f"unknown logical axis {name!r}; known: {sorted(rules)}")
    target = rules[name]
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used)  # a mesh axis may appear once per spec
    used.update(targets)
    out.append(targets if len(targets) > 1 else (targets[0] if targets else None))
  return PartitionSpec(*out)


class IndivisibleShardingError(ValueError):
  """Under `strict_sharding()`: a tensor dimension that a mesh axis does not divide (it would be replicated)."""


_STRICT: list[bool] = []
_REPLICATED_LOGGED: set[str] = set()


@contextlib.contextmanager
def strict_sharding(enabled: bool = True) -> Iterator[None]:
  """Inside this block, a tensor that would replicate over a mesh axis because its dimension does not divide the
  axis (`fit_spec`) is an IndivisibleShardingError instead of a logged warning (MaxText's sufficiency check)."""
  _STRICT.append(enabled)
  try:
    yield
  finally:
    _STRICT.pop()


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, name: str = "") -> PartitionSpec:
  """Drop mesh axes that do not divide a dimension (e.g. 3 kv heads over tensor=2), so they replicate instead.

  Replicating costs memory the config asked to save, so it is logged once per tensor `name` (its parameter path; the
  logical axes when unnamed), and refused under `strict_sharding()`.
  """
  fitted = []
  for i, (dim, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    keep, size = [], 1
    for n in names:
      if dim % (size * mesh.shape[n]) == 0:
        keep.append(n)
        size *= mesh.shape[n]
      else:
        _replicated(name or f"tensor {tuple(shape)} with spec {spec}", i, dim, n, mesh.shape[n])
    fitted.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
  return PartitionSpec(*fitted)


def _replicated(name: str, dim_index: int, dim: int, axis: str, axis_size: int) -> None:
  what = f"{name}: dimension {dim_index} (size {dim}) is not divisible by mesh axis {axis!r} (size {axis_size})"
  if _STRICT and _STRICT[-1]:
    raise IndivisibleShardingError(f"{what}; refused under parallel.strict_sharding() (choose mesh sizes that divide "
                                   f"it, or leave strict mode to replicate it)")
  if name not in _REPLICATED_LOGGED:
    _REPLICATED_LOGGED.add(name)
    log.warning("%s; replicated over %r instead", what, axis)


def sharding_for(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                 name: str = "") -> NamedSharding:
  """NamedSharding of an array with these logical axes on `mesh` (axes that do not divide the shape replicate, logged
  once per `name`)."""
  return NamedSharding(mesh, fit_spec(logical_to_spec(axes), shape, mesh, name))


def path_str(path: Sequence[Any]) -> str:
  """A pytree or nnx path as "model/layers/attn/q_proj": dict keys, attribute names and indices alike (jax key
  objects or nnx's plain names), without the Variable's trailing "value" (the same name for a TrainState, an nnx
  State and orbax's saved-metadata dicts)."""
  names = []
  for k in path:
    attr = next((a for a in ("key", "name", "idx") if hasattr(k, a)), None)
    names.append(str(getattr(k, attr)) if attr else str(k))
  return "/".join(n for n in names if n != "value")


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedShardings for an nnx State (or abstract state) from each Variable's `axes` metadata.

  Variables without `axes` (RNG counters, step counts, scalars) are replicated.
  """

  def one(path, leaf):
    if isinstance(leaf, nnx.Variable):
      value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
      axes = leaf.get_metadata().get("axes")
      return leaf.replace(sharding_for(axes, np.shape(value), mesh, path_str(path)))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays are split over every data-like axis on their leading dimension."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


_ACTIVE_MESH: list[Mesh] = []


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
  """Make `mesh` the target of `constrain` inside this block (explicit, not a hidden import-time global)."""
  if mesh is None:
    yield None
    return
  _ACTIVE_MESH.append(mesh)
  try:
    yield mesh
  finally:
    _ACTIVE_MESH.pop()


def active_mesh() -> Mesh | None:
  return _ACTIVE_MESH[-1] if _ACTIVE_MESH else None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names under the active mesh; a no-op without one (single device)."""
  mesh = active_mesh()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, sharding_for(axes, x.shape, mesh, f"activation {tuple(axes)}"))
