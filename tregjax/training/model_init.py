"""The model a run trains: its ModelConfig (read once per run), and its variables as (graphdef, params, extra),
sharded over the mesh from birth (random init) or streamed (pretrained), LoRA adapters fresh or read from a PEFT
directory.

`params` is what trains, `extra` the rest incl. frozen weights (`partition`: LoRA base, `train.freeze`). The trainer
asks this module for a model; it knows nothing of adapters itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tregjax import errors, parallel
from tregjax.models import adapters
from tregjax.models import config as model_config_lib
from tregjax.models import pretrained
from tregjax.models import state as state_lib
from tregjax.models import transformer
from tregjax.training import config as config_lib
from tregjax.training import partition


def model_config(config: ml_collections.ConfigDict) -> model_config_lib.ModelConfig:
  """The ModelConfig this run trains (preset + overrides, or the checkpoint's config.json) with its adapters."""
  if config.model.hf_path:
    cfg = pretrained.load_config(config.model.hf_path)
  else:
    preset = getattr(model_config_lib.ModelConfig, config.model.preset, None)
    if preset is None:
      raise errors.ConfigError(f"config.model.preset={config.model.preset!r} is not a models.ModelConfig preset")
    try:
      cfg = preset(**config_lib.model_overrides(config))
    except TypeError as e:
      raise errors.ConfigError(f"config.model.overrides: {e}") from e
  cfg = cfg.replace(remat=config.model.remat, scan_layers=config.model.scan_layers)
  if config.objective == "reward_model" and not cfg.num_labels:
    cfg = cfg.replace(num_labels=1)
  if config.objective != "reward_model" and cfg.num_labels:
    raise errors.ConfigError(f"objective={config.objective} needs a causal LM, but the model has a "
                             f"{cfg.num_labels}-label classification head")
  if not partition.lora_enabled(config):
    return cfg
  lo = config.model.lora
  return adapters.with_lora(cfg, rank=lo.rank, alpha=lo.alpha, targets=lo.targets, dropout=lo.dropout)


def adapter_values(config: ml_collections.ConfigDict, cfg: model_config_lib.ModelConfig, abstract_state: nnx.State,
                   shardings: dict[str, jax.sharding.Sharding] | None = None) -> dict[str, jax.Array]:
  """The run's adapter arrays by path: read from the PEFT directory `model.lora.init_from`, else fresh (A
  Kaiming-uniform from the run's seed, B = 0). Placed on `shardings` when given; without, plain values for a caller
  that traces them into its own jitted init."""
  if config.model.lora.init_from:
    host = adapters.adapter_values(cfg, config.model.lora.init_from, param_dtype=jnp.dtype(config.model.param_dtype))
    if shardings is None:
      return host
    return {k: jax.make_array_from_callback(x.shape, shardings[k], lambda i, x=x: x[i]) for k, x in host.items()}
  fresh = lambda: adapters.init_adapters(abstract_state, partition.adapter_key(config.seed))  # noqa: E731
  return fresh() if shardings is None else jax.jit(fresh, out_shardings=shardings)()


def build_model_state(config: ml_collections.ConfigDict, cfg: model_config_lib.ModelConfig, mesh, *,
                      abstract: bool = False):
  """(graphdef, params, extra) of the model `cfg` (this run's `model_config`): sharded over `mesh` from birth (random
  init) or streamed (pretrained).

  A LoRA run streams its base once (in `model.frozen_param_dtype`) and adds adapters (`adapter_values`: the policy
  starts at the base, which is the reference, or at `model.lora.init_from`). With `abstract=True` returns
  ShapeDtypeStructs only (the restore target when resuming a random-init run).
  """
  dtype, param_dtype = jnp.dtype(config.model.dtype), jnp.dtype(config.model.param_dtype)
  abstract_model = transformer.abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
  graphdef, abs_params, abs_extra = partition.split(abstract_model, config)
  abs_extra = partition.cast_frozen(abs_extra, partition.frozen_dtype(config))
  shardings = (parallel.state_shardings(abs_params, mesh), parallel.state_shardings(abs_extra, mesh))
  if abstract:
    attach = lambda a, s: jax.tree.map(lambda x, y: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=y), a, s)
    return graphdef, attach(abs_params, shardings[0]), attach(abs_extra, shardings[1])
  if config.model.hf_path:
    # A causal-LM checkpoint trained as a reward model gets a fresh `score` head (num_labels from model_config).
    load_dtype = partition.frozen_dtype(config) if partition.lora_enabled(config) else param_dtype
    model = pretrained.from_pretrained(config.model.hf_path, dtype=dtype, param_dtype=load_dtype, mesh=mesh,
                                       config_overrides={"remat": cfg.remat, "scan_layers": cfg.scan_layers,
                                                         "num_labels": cfg.num_labels})
    values = state_lib.flat_values(nnx.state(model))
    del model
    if cfg.lora_targets:
      sh = {k: v for k, v in state_lib.flat_values(nnx.merge_state(*shardings)).items() if adapters.is_adapter(k)}
      values |= adapter_values(config, cfg, nnx.merge_state(abs_params, abs_extra), sh)
    cast = lambda abs_state: state_lib.fill(abs_state, {k: v.astype(abs_v.dtype) for k, abs_v in  # noqa: E731
                                                        state_lib.flat_values(abs_state).items() for v in [values[k]]})
    return graphdef, cast(abs_params), cast(abs_extra)

  return graphdef, *jax.jit(lambda: random_init(config, cfg), out_shardings=shardings)()


def random_init(config: ml_collections.ConfigDict, cfg: model_config_lib.ModelConfig):
  """(params, extra) of a freshly initialised model (trace under jit with out_shardings to init sharded)."""
  model = transformer.from_config(cfg, nnx.Rngs(config.seed), dtype=jnp.dtype(config.model.dtype),
                                  param_dtype=jnp.dtype(config.model.param_dtype))
  if cfg.lora_targets:  # adapters from their own key: the base equals the full run's random init
    state = nnx.state(model)
    nnx.update(model, state_lib.fill(state, state_lib.flat_values(state) | adapter_values(config, cfg, state)))
  _, params, extra = partition.split(model, config)
  return params, partition.cast_frozen(extra, partition.frozen_dtype(config))


__all__ = ["model_config", "adapter_values", "build_model_state", "random_init"]
