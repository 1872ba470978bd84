"""Trace-time argument checks shared by the loss functions (shapes and dtypes are static under jit)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def as_float(x: jax.Array) -> jax.Array:
  """Promote to at least float32 (bfloat16/float16 inputs are upcast; float64 stays float64 under x64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_rank(name: str, x: jax.Array, rank: int, what: str) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must be {what} (rank {rank}), got shape {jnp.shape(x)}")


def check_same_shape(**arrays: jax.Array | None) -> None:
  """All given (non-None) arrays must share one shape; the error names each argument and its shape."""
  present = {k: jnp.shape(v) for k, v in arrays.items() if v is not None}
  if len(set(present.values())) > 1:
    listing = ", ".join(f"{k}{list(s)}" for k, s in present.items())
    raise ValueError(f"shape mismatch: {listing}")


def check_integer(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array of token ids, got dtype {jnp.asarray(x).dtype}")


def check_positive(name: str, value: float) -> None:
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")
