"""A model's variables by "a/b/c" path: read them out, put them back into an abstract state, bring them to the host.

The one place that turns an nnx State into {path: array} and back, so whole-model rewrites (adapters, merging,
checkpoint assembly) and the exporters agree on parameter paths.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from tregjax import parallel


def flat_values(state: nnx.State) -> dict[str, jax.Array]:
  """{"a/b/c": array} of an nnx State."""
  return {parallel.path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def fill(abstract_state: nnx.State, values: dict[str, jax.Array]) -> nnx.State:
  """The abstract state with every variable's value taken from `values` (by "a/b/c" path); a missing one is an error."""
  flat = []
  for p, var in nnx.to_flat_state(abstract_state):
    name = parallel.path_str(p)
    if name not in values:
      raise KeyError(f"no value for parameter {name}")
    flat.append((p, var.replace(values[name])))
  return nnx.from_flat_state(flat)


def to_host(x: jax.Array) -> np.ndarray:
  """A whole array on this host's memory (gathered from every process when it is sharded across hosts)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


__all__ = ["flat_values", "fill", "to_host"]
