"""What trains and what is frozen: `model.lora` adapters, the `train.freeze` regex, the frozen weights' dtype.

The model is split into `params` (what trains: gradients, Adam moments, checkpoints) and `extra` (everything else).
Frozen weights go to `extra`, so they get no gradient and no optimizer state by construction (the step
differentiates `params` only) and need no optax masking. A LoRA run trains only the `nnx.LoRAParam` adapters; its
base is frozen and may be stored in bfloat16 (`model.frozen_param_dtype`) while adapters and their moments stay
float32. Frozen weights are rebuilt from `model.hf_path` (or the seed) on resume and export, so checkpoints hold only
what trains.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tregjax import errors, parallel
from tregjax.models import adapters

DTYPES = ("", "float32", "bfloat16", "float16")
_ADAPTER_KEY_SALT = 0x10AA  # the adapters' init key: fold_in(key(seed), salt), apart from the base's random init


def lora_enabled(config: ml_collections.ConfigDict) -> bool:
  return config.model.lora.rank > 0


def validate(config: ml_collections.ConfigDict) -> None:
  """ConfigError (naming the key) for LoRA / freeze settings that cannot run."""
  lo = config.model.lora
  err = errors.ConfigError
  if lo.rank < 0:
    raise err(f"config.model.lora.rank={lo.rank}: must be >= 0 (0 disables LoRA)")
  if config.model.frozen_param_dtype not in DTYPES:
    raise err(f"config.model.frozen_param_dtype={config.model.frozen_param_dtype!r}: must be one of {DTYPES}")
  if config.train.freeze:
    try:
      re.compile(config.train.freeze)
    except re.error as e:
      raise err(f"config.train.freeze={config.train.freeze!r} is not a regex: {e}") from e
  if not lora_enabled(config):
    if lo.init_from:
      raise err("config.model.lora.init_from needs config.model.lora.rank > 0 (the adapter's r)")
    return
  if lo.alpha <= 0:
    raise err(f"config.model.lora.alpha={lo.alpha}: must be > 0")
  if not 0.0 <= lo.dropout < 1.0:
    raise err(f"config.model.lora.dropout={lo.dropout}: must be in [0, 1)")
  if config.objective == "reward_model":
    raise err("config.model.lora: LoRA trains causal LMs (objective=preference or sft); the reward model's fresh "
              "head would stay frozen")
  try:
    targets = adapters.resolve_targets(lo.targets)
  except ValueError as e:
    raise err(str(e)) from e
  if lo.init_from:
    try:
      conf = adapters.read_adapter_config(lo.init_from)
      theirs = adapters.adapter_targets(conf, os.path.join(lo.init_from, adapters.CONFIG_NAME))
    except (ValueError, FileNotFoundError) as e:
      raise err(f"config.model.lora.init_from: {e}") from e
    for key, mine, other in (("rank", lo.rank, conf["r"]), ("alpha", float(lo.alpha), float(conf["lora_alpha"])),
                             ("targets", targets, theirs)):
      if mine != other:
        raise err(f"config.model.lora.{key}={mine!r} but the adapter in config.model.lora.init_from has {other!r}")
  if config.model.hf_path and adapters.is_adapter_dir(config.model.hf_path):
    raise err("config.model.hf_path is a PEFT adapter directory: set hf_path to its base and "
              "config.model.lora.init_from to the adapter")


def frozen_rows(config: ml_collections.ConfigDict, path: str, shape: tuple[int, ...]) -> list[bool]:
  """Per layer of a stacked parameter (one entry otherwise): does `train.freeze` match it? Layer i of
  "model/layers/attn/q_proj" is matched as "model/layers/i/attn/q_proj" (or the stacked path as a whole)."""
  if not config.train.freeze:
    return [False]
  regex = re.compile(config.train.freeze)
  whole = bool(regex.search(path))
  if not path.startswith("model/layers/") or not shape:
    return [whole]
  rest = path[len("model/layers/"):]
  return [whole or bool(regex.search(f"model/layers/{i}/{rest}")) for i in range(shape[0])]


def trainable_filter(config: ml_collections.ConfigDict):
  """nnx filter of the trained variables: the adapters (LoRA) or every Param, minus those `train.freeze` matches in
  every layer (a parameter frozen in some layers only trains, its frozen layers masked: `update_mask`)."""
  kind = nnx.LoRAParam if lora_enabled(config) else nnx.Param
  if not config.train.freeze:
    return kind
  return lambda path, x: isinstance(x, kind) and not all(frozen_rows(config, parallel.path_str(path), np.shape(x.get_value())))


def update_mask(config: ml_collections.ConfigDict, params: nnx.State) -> nnx.State | None:
  """Per trained parameter, 0/1 float32 over its layer axis ([L, 1, ...]; 1.0 where nothing is frozen), or None when
  no parameter is frozen in only some layers. The step multiplies gradients and updates by it, so those layers get
  no gradient, no moments and no weight decay (their Adam moments still take memory: the array is stacked)."""
  flat, partial = [], False
  for p, v in nnx.to_flat_state(params):
    shape = tuple(np.shape(v.get_value()))
    rows = frozen_rows(config, parallel.path_str(p), shape)
    if len(rows) > 1 and any(rows):
      partial = True
      keep = np.asarray([0.0 if r else 1.0 for r in rows], np.float32).reshape((-1,) + (1,) * (len(shape) - 1))
      flat.append((p, v.replace(jnp.asarray(keep))))
    else:
      flat.append((p, v.replace(jnp.ones((), jnp.float32))))
  return nnx.from_flat_state(flat) if partial else None


def split(model: nnx.Module, config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trained params, extra incl. frozen params); an empty trained set is a ConfigError."""
  graphdef, params, extra = nnx.split(model, trainable_filter(config), ...)
  if not jax.tree.leaves(params):
    raise errors.ConfigError(f"config.train.freeze={config.train.freeze!r} freezes every parameter")
  if config.train.freeze and not has_frozen(extra) and update_mask(config, params) is None:
    raise errors.ConfigError(f"config.train.freeze={config.train.freeze!r} matches no parameter path (paths look "
                                 "like model/embed_tokens, lm_head, model/layers/attn/q_proj; one layer's: "
                                 "model/layers/3/attn/q_proj)")
  return graphdef, params, extra


def frozen_dtype(config: ml_collections.ConfigDict) -> Any:
  return jnp.dtype(config.model.frozen_param_dtype or config.model.param_dtype)


def cast_frozen(extra: nnx.State, dtype: Any) -> nnx.State:
  """Frozen Params (concrete or ShapeDtypeStruct) in `dtype`; other variables unchanged."""

  def one(var):
    if not isinstance(var, nnx.Param):
      return var
    v = var.get_value()
    if isinstance(v, jax.ShapeDtypeStruct):
      return var.replace(jax.ShapeDtypeStruct(v.shape, dtype, sharding=v.sharding))
    return var.replace(v.astype(dtype))

  return nnx.from_flat_state([(p, one(v)) for p, v in nnx.to_flat_state(extra)])


def has_frozen(extra: nnx.State) -> bool:
  return any(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(extra))


def saved(state):
  """The part of a TrainState that checkpoints hold: all but the frozen Params in `extra`."""
  _, rest = nnx.split_state(state.extra, nnx.Param, ...)
  return state.replace(extra=rest)


def with_frozen(restored, extra: nnx.State):
  """A restored (saved) TrainState with the frozen Params of `extra` put back."""
  frozen, _ = nnx.split_state(extra, nnx.Param, ...)
  return restored.replace(extra=nnx.merge_state(frozen, restored.extra))


def adapter_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), _ADAPTER_KEY_SALT)


__all__ = ["validate", "trainable_filter", "split", "cast_frozen", "saved",
           "with_frozen", "has_frozen", "update_mask", "frozen_rows", "frozen_dtype", "adapter_key", "lora_enabled"]
