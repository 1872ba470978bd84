"""LoRA adapters (Hu et al. 2021) on the decoder's projections, with PEFT's math: y = W x + (α/r)·B A x.

The layer pieces only: an `Adapter`, `attach` (give a projection one) and `apply` (add its output). Whole-model
rewrites (fresh adapters, merging, PEFT directories) live in `tregjax.models.adapters`.

An adapted projection keeps its frozen weight and gains `lora_a` [L, *in, r] and `lora_b` [L, r, *out], stacked
over layers like the weight and named with the weight's own logical axes plus `lora_rank`, so FSDP and tensor
parallelism shard them through the one rules table in `parallel.py`. The shapes and axes are read from the weight
the adapter wraps, so the layout is declared once, in `layers.py`. They are `nnx.LoRAParam` variables: the trainer
selects what trains with that type as an nnx filter. flax's `nnx.LoRA` module does not fit here (2-D weights only,
no stacked layers, no α/r scale, He-uniform A), so the projection adds `B(A x)` itself in `apply`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Adapter(nnx.Module):
  """`lora_a` [L, *in, r] and `lora_b` [L, r, *out] of one (stacked) projection weight [L, *in, *out]; both start
  at zero.

  A zero A would be a saddle point (no gradient reaches either factor): `adapters.init_adapters` gives A PEFT's
  Kaiming-uniform draw from its own key, so attaching adapters never shifts the base model's random stream.
  """

  def __init__(self, weight_shape: Sequence[int], weight_axes: Sequence[str], *, in_ndim: int, rank: int,
               alpha: float, dropout: float, salt: int, param_dtype):
    shape, axes = tuple(weight_shape), tuple(weight_axes)
    lead = 1 if axes[:1] == ("layers",) else 0  # a stacked weight's leading layer axis
    stack, stack_axes = shape[:lead], axes[:lead]
    cut = lead + in_ndim
    self.lora_a = nnx.LoRAParam(jnp.zeros(stack + shape[lead:cut] + (rank,), param_dtype),
                                axes=stack_axes + axes[lead:cut] + ("lora_rank",))
    self.lora_b = nnx.LoRAParam(jnp.zeros(stack + (rank,) + shape[cut:], param_dtype),
                                axes=stack_axes + ("lora_rank",) + axes[cut:])
    self.scale = alpha / rank
    self.dropout = dropout
    self.salt = salt  # this projection's index in config.LORA_TARGETS: its own dropout mask under a layer's key

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """x [..., *in] -> (α/r)·B(A drop(x)) [..., *out], in x's dtype (the compute dtype, as the base projection).

    drop is PEFT's `lora_dropout` (inverted dropout on the adapter's input only; the base projection sees x
    whole); it applies only when a key is given, i.e. in training steps, never in evaluation, scoring or decoding.
    """
    if dropout_key is not None and self.dropout > 0.0:
      keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, self.salt), 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros((), x.dtype))
    a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
    h = jnp.tensordot(x, a, axes=a.ndim - 1)
    return jnp.tensordot(h, b, axes=1) * jnp.asarray(self.scale, x.dtype)


def attach(module: nnx.Module, name: str, *, in_ndim: int, rank: int, alpha: float, dropout: float, salt: int
           ) -> None:
  """Give `module` an `<name>_lora` Adapter shaped after its weight `name` ([L, *in, *out], the first `in_ndim`
  dims after the layer axis being the input), in the weight's dtype and logical axes."""
  weight = getattr(module, name)
  value = weight.get_value()
  setattr(module, name + "_lora", Adapter(value.shape, weight.get_metadata()["axes"], in_ndim=in_ndim, rank=rank,
                                          alpha=alpha, dropout=dropout, salt=salt, param_dtype=value.dtype))


def apply(module: nnx.Module, name: str, x: jax.Array, y: jax.Array, dropout_key: jax.Array | None = None
          ) -> jax.Array:
  """y + the adapter of projection `name` on its input x (y unchanged when it has none); `dropout_key` is the
  layer's key in a training step (None: no dropout)."""
  adapter = getattr(module, name + "_lora", None)
  return y if adapter is None else y + adapter(x, dropout_key)


__all__ = ["Adapter", "attach", "apply"]
