"""Meshes and the logical-axis -> mesh-axis rules: the one place that knows mesh axis names.

Layers annotate parameters with logical axis names (`nnx.Param(value, axes=("embed", "mlp"))`) and activations with
`constrain(x, ("batch", "length", "embed"))`. Which physical mesh axis each logical name lands on is decided here, so
data parallelism, FSDP and tensor parallelism are configuration, not code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh; one axis may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh axis sizes must be positive or -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into a mesh with fixed axes of product {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {math.prod(shape)} devices, "
        f"but {len(devices)} are available")
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


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


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drop mesh axes that do not divide a dimension (e.g. 3 kv heads over tensor=2), so they replicate instead."""
  fitted = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    keep, size = [], 1
    for n in names:
      if dim % (size * mesh.shape[n]) == 0:
        keep.append(n)
        size *= mesh.shape[n]
    fitted.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
  return PartitionSpec(*fitted)


def sharding_for(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  """NamedSharding of an array with these logical axes on `mesh` (axes that do not divide the shape replicate)."""
  return NamedSharding(mesh, _fit_spec(logical_to_spec(axes), shape, mesh))


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedShardings for an nnx State (or abstract state) from each Variable's `axes` metadata.

  Variables without `axes` (RNG counters, step counts, scalars) are replicated.
  """

  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
      axes = leaf.get_metadata().get("axes")
      return leaf.replace(sharding_for(axes, np.shape(value), mesh))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
  return jax.lax.with_sharding_constraint(x, sharding_for(axes, x.shape, mesh))
