"""LoRA adapters (Hu et al. 2021) on the decoder's projections, with PEFT's math: y = W x + (α/r)·B A x.

An adapted projection keeps its frozen weight and gains `lora_a` [L, *in, r] and `lora_b` [L, r, *out], stacked
over layers like the weight and named with the weight's own logical axes plus `lora_rank`, so FSDP and tensor
parallelism shard them through the one rules table in `parallel.py`. They are `nnx.LoRAParam` variables: the trainer
selects what trains with that type as an nnx filter. flax's `nnx.LoRA` module does not fit here (2-D weights only,
no stacked layers, no α/r scale, He-uniform A), so the projection adds `B(A x)` itself in `apply`.

Which projections carry adapters is a `ModelConfig` field (`lora_targets`), so `abstract_model`, the sharding plan
and the checkpoint layout follow from the config, as they do for every other parameter.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tregjax import parallel

# Every projection an adapter can attach to, as "<module>/<weight>" under model/layers (PEFT's module names are
# the last component). The LM head and embeddings are not targets (PEFT's "all-linear" leaves the output layer out).
TARGETS = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
           "mlp/down_proj")
PRESETS = {"attention": r"attn/[qkvo]_proj$", "all_linear": r"(attn|mlp)/\w+_proj$"}


def resolve_targets(pattern: str, *, key: str = "model.lora.targets") -> tuple[str, ...]:
  """A preset name or a regex searched over the parameter paths "model/layers/attn/q_proj", ... -> target names."""
  regex = PRESETS.get(pattern, pattern)
  try:
    compiled = re.compile(regex)
  except re.error as e:
    raise ValueError(f"config.{key}={pattern!r} is not a regex: {e}") from e
  found = tuple(t for t in TARGETS if compiled.search("model/layers/" + t))
  if not found:
    raise ValueError(f"config.{key}={pattern!r} matches no projection; presets {sorted(PRESETS)}, paths "
                     f"model/layers/{{{','.join(TARGETS)}}}")
  return found


@dataclasses.dataclass(frozen=True)
class Shape:
  """A projection's input and output dims with their logical axes (weight = [*in, *out])."""
  in_shape: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_shape: tuple[int, ...]
  out_axes: tuple[str, ...]


def projection_shapes(cfg) -> dict[str, Shape]:
  """Per target: the shapes `layers.Attention` / `layers.MLP` give the weight."""
  d, n, k, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  return {
      "attn/q_proj": Shape((d,), ("embed",), (n, h), ("heads", "head_dim")),
      "attn/k_proj": Shape((d,), ("embed",), (k, h), ("kv_heads", "head_dim")),
      "attn/v_proj": Shape((d,), ("embed",), (k, h), ("kv_heads", "head_dim")),
      "attn/o_proj": Shape((n, h), ("heads", "head_dim"), (d,), ("embed",)),
      "mlp/gate_proj": Shape((d,), ("embed",), (f,), ("mlp",)),
      "mlp/up_proj": Shape((d,), ("embed",), (f,), ("mlp",)),
      "mlp/down_proj": Shape((f,), ("mlp",), (d,), ("embed",)),
  }


class Adapter(nnx.Module):
  """`lora_a` [L, *in, r] and `lora_b` [L, r, *out] of one stacked projection; both start at zero.

  A zero A would be a saddle point (no gradient reaches either factor): `init_adapters` gives A PEFT's
  Kaiming-uniform draw from its own key, so attaching adapters never shifts the base model's random stream.
  """

  def __init__(self, shape: Shape, *, rank: int, alpha: float, dropout: float, salt: int, num_stacked: int | None,
               param_dtype):
    stack, stack_axes = ((num_stacked,), ("layers",)) if num_stacked is not None else ((), ())
    self.lora_a = nnx.LoRAParam(jnp.zeros(stack + shape.in_shape + (rank,), param_dtype),
                                axes=stack_axes + shape.in_axes + ("lora_rank",))
    self.lora_b = nnx.LoRAParam(jnp.zeros(stack + (rank,) + shape.out_shape, param_dtype),
                                axes=stack_axes + ("lora_rank",) + shape.out_axes)
    self.scale = alpha / rank
    self.dropout = dropout
    self.salt = salt  # this projection's index in TARGETS: its own dropout mask under a layer's key

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


def attach(module: nnx.Module, cfg, group: str, *, num_stacked: int | None, param_dtype) -> None:
  """Give `module` (the layers' `attn` or `mlp`) an `<name>_lora` Adapter for each of its targets in cfg."""
  shapes = projection_shapes(cfg)
  for target in cfg.lora_targets:
    g, name = target.split("/")
    if g == group:
      setattr(module, name + "_lora", Adapter(shapes[target], rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                              dropout=cfg.lora_dropout, salt=TARGETS.index(target),
                                              num_stacked=num_stacked, param_dtype=param_dtype))


def apply(module: nnx.Module, name: str, x: jax.Array, y: jax.Array, dropout_key: jax.Array | None = None
          ) -> jax.Array:
  """y + the adapter of projection `name` on its input x (y unchanged when it has none); `dropout_key` is the
  layer's key in a training step (None: no dropout)."""
  adapter = getattr(module, name + "_lora", None)
  return y if adapter is None else y + adapter(x, dropout_key)


# ------------------------------------------------------------------ states


def is_adapter(path: str) -> bool:
  return path.endswith("_lora/lora_a") or path.endswith("_lora/lora_b")


def init_adapters(abstract_state: nnx.State, key: jax.Array) -> dict[str, jax.Array]:
  """Fresh adapter values by path: A ~ U(±1/sqrt(fan_in)) (PEFT: kaiming_uniform(a=√5)), B = 0, so the adapted
  model starts exactly at the base. Each A has its own key (fold_in of its index in path order)."""
  out = {}
  named = ((parallel.path_str(p), v) for p, v in nnx.to_flat_state(abstract_state))
  flat = sorted((path, v) for path, v in named if is_adapter(path))
  for i, (path, var) in enumerate(flat):
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if path.endswith("lora_b"):
      out[path] = jnp.zeros(shape, dtype)
      continue
    stacked = path.startswith("model/layers/")
    fan_in = math.prod(shape[1 if stacked else 0:-1])
    bound = 1.0 / math.sqrt(fan_in)
    out[path] = jax.random.uniform(jax.random.fold_in(key, i), shape, dtype, -bound, bound)
  return out


def fill(abstract_state: nnx.State, values: dict[str, jax.Array]) -> nnx.State:
  """The abstract state with every variable's value taken from `values` (by "a/b/c" path); a missing one is an error."""
  flat = []
  for p, var in nnx.to_flat_state(abstract_state):
    name = parallel.path_str(p)
    if name not in values:
      raise KeyError(f"no value for parameter {name}")
    flat.append((p, var.replace(values[name])))
  return nnx.from_flat_state(flat)


def flat_values(state: nnx.State) -> dict[str, jax.Array]:
  """{"a/b/c": array} of an nnx State."""
  return {parallel.path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def delta(a: jax.Array, b: jax.Array, scale: float, weight_shape: Sequence[int], stacked: bool) -> jax.Array:
  """(α/r)·A B in the weight's layout [L, *in, *out] (float32)."""
  lead = 1 if stacked else 0
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  a2 = a32.reshape(a32.shape[:lead] + (-1, a32.shape[-1]))
  b2 = b32.reshape(b32.shape[:lead + 1] + (-1,))
  return (jnp.matmul(a2, b2) * scale).reshape(tuple(weight_shape))


def merge(model: nnx.Module) -> nnx.Module:
  """The model with every adapter folded into its weight (W + (α/r)·A B, in the weight's dtype) and no adapters:
  what a merged Hugging Face export holds and what generation can use without the adapter matmuls."""
  from tregjax.models import transformer  # pylint: disable=import-outside-toplevel
  cfg = model.config
  if not cfg.lora_targets:
    return model
  values = flat_values(nnx.state(model))
  base_cfg = cfg.replace(lora_rank=0, lora_alpha=0.0, lora_targets=())
  dtype = model.model.dtype
  param_dtype = values["model/embed_tokens"].dtype
  abstract = transformer.abstract_model(base_cfg, dtype=dtype, param_dtype=param_dtype)
  graphdef, abstract_state = nnx.split(abstract)
  scale = cfg.lora_alpha / cfg.lora_rank
  for target in cfg.lora_targets:
    w = f"model/layers/{target}"
    a, b = values.pop(w + "_lora/lora_a"), values.pop(w + "_lora/lora_b")
    dt = jnp.promote_types(values[w].dtype, a.dtype)  # a bfloat16 frozen base merges into float32 weights
    values[w] = (values[w].astype(jnp.float32) + delta(a, b, scale, values[w].shape, True)).astype(dt)
  return nnx.merge(graphdef, fill(abstract_state, values))


def add_adapters(model: nnx.Module, *, rank: int, alpha: float, targets: str | Sequence[str], seed: int = 0,
                 dropout: float = 0.0, param_dtype: Any = jnp.float32) -> nnx.Module:
  """A copy of `model` (same base arrays) with fresh adapters (B = 0: same logits) on `targets` (a preset, a
  regex, or target names)."""
  from tregjax.models import transformer  # pylint: disable=import-outside-toplevel
  names = resolve_targets(targets) if isinstance(targets, str) else tuple(targets)
  cfg = model.config.replace(lora_rank=rank, lora_alpha=float(alpha), lora_targets=names, lora_dropout=dropout)
  graphdef, abstract_state = nnx.split(transformer.abstract_model(cfg, dtype=model.model.dtype,
                                                                  param_dtype=param_dtype))
  values = flat_values(nnx.state(model)) | init_adapters(abstract_state, jax.random.key(seed))
  return nnx.merge(graphdef, fill(abstract_state, values))


__all__ = ["TARGETS", "PRESETS", "resolve_targets", "Adapter", "init_adapters", "merge", "add_adapters", "fill",
           "flat_values", "delta", "is_adapter"]
