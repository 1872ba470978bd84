"""Whole-model LoRA: fresh adapters, merging them into the weights, and PEFT adapter directories in and out.

The one place LoRA fields are set on a ModelConfig (`with_lora`); `lora.py` holds the layer pieces. A PEFT directory
is `adapter_config.json` + `adapter_model.safetensors`, written so that `peft.PeftModel.from_pretrained(base, DIR)`
loads it on the Hugging Face base, and read back to continue training or to score/generate with the adapter
(torch-free: the tensor names come from the HF name table in `hf_io`, PEFT's LoRA tensors being
`<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]; the shapes from the model's own adapters).
Only plain LoRA is read: rsLoRA, DoRA, biases, per-module ranks or `modules_to_save` are refused by name.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tregjax import parallel
from tregjax.models import hf_io
from tregjax.models import safetensors
from tregjax.models import state as state_lib
from tregjax.models import transformer
from tregjax.models.config import LORA_TARGETS, ModelConfig

PRESETS = {"attention": r"attn/[qkvo]_proj$", "all_linear": r"(attn|mlp)/\w+_proj$"}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def resolve_targets(pattern: str, *, key: str = "model.lora.targets") -> tuple[str, ...]:
  """A preset name or a regex searched over the parameter paths "model/layers/attn/q_proj", ... -> target names."""
  regex = PRESETS.get(pattern, pattern)
  try:
    compiled = re.compile(regex)
  except re.error as e:
    raise ValueError(f"config.{key}={pattern!r} is not a regex: {e}") from e
  found = tuple(t for t in LORA_TARGETS if compiled.search("model/layers/" + t))
  if not found:
    raise ValueError(f"config.{key}={pattern!r} matches no projection; presets {sorted(PRESETS)}, paths "
                     f"model/layers/{{{','.join(LORA_TARGETS)}}}")
  return found


def with_lora(cfg: ModelConfig, *, rank: int, alpha: float, targets: str | Sequence[str], dropout: float = 0.0
              ) -> ModelConfig:
  """cfg with LoRA adapters of rank `rank`, scale alpha / rank, on `targets` (a preset, a regex or target names);
  rank 0 removes them. The one place the LoRA fields of a ModelConfig are set."""
  if rank == 0:
    return cfg.replace(lora_rank=0, lora_alpha=0.0, lora_targets=(), lora_dropout=0.0)
  names = resolve_targets(targets) if isinstance(targets, str) else tuple(targets)
  return cfg.replace(lora_rank=int(rank), lora_alpha=float(alpha), lora_targets=names, lora_dropout=float(dropout))


# ------------------------------------------------------------------ adapters of a model


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
  cfg = model.config
  if not cfg.lora_targets:
    return model
  values = state_lib.flat_values(nnx.state(model))
  dtype = model.model.dtype
  param_dtype = values["model/embed_tokens"].dtype
  abstract = transformer.abstract_model(with_lora(cfg, rank=0, alpha=0.0, targets=()), dtype=dtype,
                                        param_dtype=param_dtype)
  graphdef, abstract_state = nnx.split(abstract)
  scale = cfg.lora_alpha / cfg.lora_rank
  for target in cfg.lora_targets:
    w = f"model/layers/{target}"
    a, b = values.pop(w + "_lora/lora_a"), values.pop(w + "_lora/lora_b")
    dt = jnp.promote_types(values[w].dtype, a.dtype)  # a bfloat16 frozen base merges into float32 weights
    values[w] = (values[w].astype(jnp.float32) + delta(a, b, scale, values[w].shape, True)).astype(dt)
  return nnx.merge(graphdef, state_lib.fill(abstract_state, values))


def add_adapters(model: nnx.Module, *, rank: int, alpha: float, targets: str | Sequence[str], seed: int = 0,
                 dropout: float = 0.0, param_dtype: Any = jnp.float32) -> nnx.Module:
  """A copy of `model` (same base arrays) with fresh adapters (B = 0: same logits) on `targets` (a preset, a
  regex, or target names)."""
  cfg = with_lora(model.config, rank=rank, alpha=alpha, targets=targets, dropout=dropout)
  graphdef, abstract_state = nnx.split(transformer.abstract_model(cfg, dtype=model.model.dtype,
                                                                  param_dtype=param_dtype))
  values = state_lib.flat_values(nnx.state(model)) | init_adapters(abstract_state, jax.random.key(seed))
  return nnx.merge(graphdef, state_lib.fill(abstract_state, values))


# ------------------------------------------------------------------ PEFT directories


def _adapter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every adapter array's shape by path, as the model built from cfg makes it (nothing allocated)."""
  abstract = nnx.state(transformer.abstract_model(cfg), nnx.LoRAParam)
  return {path: tuple(v.shape) for path, v in state_lib.flat_values(abstract).items()}


def _tensor_plan(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]
                 ) -> list[tuple[str, str, hf_io.Rule, tuple[int, ...]]]:
  """(PEFT tensor template with {i}, our adapter path, layout rule, our per-layer shape) of every adapter factor."""
  plan = []
  for target in cfg.lora_targets:
    template, _ = hf_io.BY_PATH[("model", "layers") + tuple(target.split("/"))]
    stem = PEFT_PREFIX + template[:-len(".weight")]
    ours = f"model/layers/{target}_lora/"
    a_shape, b_shape = shapes[ours + "lora_a"][1:], shapes[ours + "lora_b"][1:]  # [*in, r], [r, *out]
    plan.append((stem + ".lora_A.weight", ours + "lora_a", hf_io.Rule("linear", len(a_shape) - 1), a_shape))
    plan.append((stem + ".lora_B.weight", ours + "lora_b", hf_io.Rule("linear", 1), b_shape))
  return plan


def adapter_config(cfg: ModelConfig, base_model_name_or_path: str = "") -> dict[str, Any]:
  """The adapter_config.json PEFT writes for a plain LoRA on these modules."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
      "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "bias": "none",
      "target_modules": sorted({t.split("/")[1] for t in cfg.lora_targets}), "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
      "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
      "layers_pattern": None, "revision": None,
  }


def save_adapter(model: nnx.Module, path: str, *, base_model_name_or_path: str = "") -> str:
  """Write `model`'s adapters as a PEFT LoRA directory (float32 tensors, one per layer and factor; files 0644)."""
  cfg = model.config
  if not cfg.lora_targets:
    raise ValueError("save_adapter: the model has no LoRA adapters (trained without config.model.lora.rank > 0)")
  values = state_lib.flat_values(nnx.state(model, nnx.LoRAParam))
  items = []
  for template, ours, rule, per_layer in _tensor_plan(cfg, {k: tuple(v.shape) for k, v in values.items()}):
    arr = values[ours]
    for i in range(cfg.num_layers):
      thunk = lambda arr=arr, i=i, rule=rule: rule.to_hf(state_lib.to_host(arr[i])).astype(np.float32)  # noqa: E731
      items.append((template.format(i=i), rule.hf_shape(per_layer), np.dtype(np.float32), thunk))
  conf = adapter_config(cfg, base_model_name_or_path)
  if jax.process_index() != 0:
    for *_, thunk in items:  # other processes still take part in the gathers
      thunk()
    return path
  os.makedirs(path, exist_ok=True)
  safetensors.write(os.path.join(path, WEIGHTS_NAME), items)
  safetensors.write_json(os.path.join(path, CONFIG_NAME), conf)
  return path


def is_adapter_dir(path: str) -> bool:
  """A PEFT adapter directory (adapter_config.json, no config.json of a full model)."""
  return os.path.exists(os.path.join(str(path), CONFIG_NAME)) and not os.path.exists(
      os.path.join(str(path), "config.json"))


def read_adapter_config(path: str) -> dict[str, Any]:
  """adapter_config.json of a PEFT directory, refused (naming the field) where it is not a plain LoRA."""
  config_path = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a PEFT adapter directory)")
  with open(config_path, encoding="utf-8") as f:
    conf = json.load(f)
  if conf.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{config_path}: peft_type={conf.get('peft_type')!r}; only LORA adapters are supported")
  for field, ok in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False)):
    if conf.get(field, ok) != ok:
      raise ValueError(f"{config_path}: {field}={conf[field]!r} is not supported")
  if conf.get("bias", "none") != "none":
    raise ValueError(f"{config_path}: bias={conf['bias']!r} is not supported (only 'none')")
  for field in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
    if conf.get(field):
      raise ValueError(f"{config_path}: {field}={conf[field]!r} is not supported")
  r, alpha = conf.get("r"), conf.get("lora_alpha")
  if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
    raise ValueError(f"{config_path}: r={r!r}: must be an int > 0 (the adapters' rank)")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
    raise ValueError(f"{config_path}: lora_alpha={alpha!r}: must be a number > 0 (the scale is lora_alpha / r)"
                     + ("; the file has none" if "lora_alpha" not in conf else ""))
  return conf


def adapter_targets(conf: dict[str, Any], source: str = CONFIG_NAME) -> tuple[str, ...]:
  """PEFT target_modules (names, or a regex over module names) -> tregjax target names."""
  modules = conf.get("target_modules")
  if isinstance(modules, str):
    hf_names = {t: f"model.layers.0.{'self_attn' if t.startswith('attn') else 'mlp'}.{t.split('/')[1]}"
                for t in LORA_TARGETS}
    found = tuple(t for t in LORA_TARGETS if re.fullmatch(modules, hf_names[t]))
  else:
    wanted = set(modules or ())
    found = tuple(t for t in LORA_TARGETS if t.split("/")[1] in wanted)
    unknown = sorted(wanted - {t.split("/")[1] for t in LORA_TARGETS})
    if unknown:
      raise ValueError(f"{source}: target_modules {unknown} are not LoRA targets tregjax supports "
                       f"({[t.split('/')[1] for t in LORA_TARGETS]})")
  if not found:
    raise ValueError(f"{source}: target_modules={modules!r} matches no projection")
  return found


def adapter_values(cfg: ModelConfig, path: str, *, param_dtype: Any = jnp.float32) -> dict[str, np.ndarray]:
  """Our stacked adapter arrays {"model/layers/attn/q_proj_lora/lora_a": [L, *in, r], ...} from a PEFT directory
  whose rank / alpha / targets `cfg` already carries; missing, extra or misshapen tensors are errors by name."""
  file = os.path.join(path, WEIGHTS_NAME)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
  tensors = safetensors.entries(file)
  base = _made_for(path)
  layer_ids = {int(m.group(1)) for m in map(re.compile(r".*\.layers\.(\d+)\.").match, tensors) if m}
  if layer_ids and max(layer_ids) + 1 != cfg.num_layers:
    raise ValueError(f"{file}: the adapter has tensors for {max(layer_ids) + 1} layers, this model has "
                     f"{cfg.num_layers}: an adapter made for another base model{base}")
  out, used = {}, set()
  for template, ours, rule, per_layer in _tensor_plan(cfg, _adapter_shapes(cfg)):
    layers = []
    for i in range(cfg.num_layers):
      name = template.format(i=i)
      if name not in tensors:
        name_alt = name.replace(".weight", ".default.weight")  # some writers keep the adapter name
        if name_alt not in tensors:
          raise ValueError(f"{path}: missing tensor {name} (expected shape {rule.hf_shape(per_layer)})")
        name = name_alt
      got, want = tuple(tensors[name].shape), tuple(rule.hf_shape(per_layer))
      if got != want:
        differ = [d for d in range(len(want)) if len(got) != len(want) or got[d] != want[d]]
        if len(got) == len(want) and all(want[d] == cfg.lora_rank for d in differ):
          raise ValueError(f"{file}: tensor {name} has rank {got[differ[0]]} but {os.path.join(path, CONFIG_NAME)} "
                           f"says r={cfg.lora_rank} (shape {list(got)}, expected {list(want)})")
        raise ValueError(f"{file}: tensor {name} has shape {list(got)}, this model needs {list(want)}: an adapter "
                         f"made for another base model (hidden or MLP size){base}")
      layers.append(rule.to_ours(np.asarray(safetensors.read(tensors[name]), np.float32), per_layer))
      used.add(name)
    out[ours] = np.stack(layers).astype(param_dtype)
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f"{path}: tensors this model has no place for: {extra[:5]} (another base model or targets?)")
  return out


def _made_for(path: str) -> str:
  """", made for <base>" from adapter_config.json's base_model_name_or_path (for the error naming a foreign adapter)."""
  try:
    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
      base = json.load(f).get("base_model_name_or_path")
  except (OSError, ValueError, AttributeError):
    base = None
  return f" ({CONFIG_NAME} names base_model_name_or_path={base!r})" if base else ""


def config_with_adapter(base_cfg: ModelConfig, path: str) -> ModelConfig:
  """base_cfg with the rank, alpha, targets and dropout (used only by training steps) of the PEFT directory at
  `path`."""
  conf = read_adapter_config(path)
  targets = adapter_targets(conf, os.path.join(path, CONFIG_NAME))
  return with_lora(base_cfg, rank=int(conf["r"]), alpha=float(conf["lora_alpha"]), targets=targets,
                   dropout=float(conf.get("lora_dropout") or 0.0))


def load_adapter(model: nnx.Module, path: str, *, mesh=None, param_dtype: Any = jnp.float32) -> nnx.Module:
  """`model` (a base causal LM, no adapters) with the PEFT adapter at `path` applied in its forward."""
  if model.config.lora_targets:
    raise ValueError(f"load_adapter: the model already has adapters on {model.config.lora_targets}")
  cfg = config_with_adapter(model.config, path)
  graphdef, abstract_state = nnx.split(transformer.abstract_model(cfg, dtype=model.model.dtype,
                                                                  param_dtype=param_dtype))
  values = state_lib.flat_values(nnx.state(model))
  axes = {parallel.path_str(p): v.get_metadata().get("axes")
          for p, v in nnx.to_flat_state(abstract_state)}
  for name, x in adapter_values(cfg, path, param_dtype=param_dtype).items():
    sharding = parallel.sharding_for(axes[name], x.shape, mesh) if mesh is not None else None
    values[name] = jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)
  return nnx.merge(graphdef, state_lib.fill(abstract_state, values))


__all__ = ["PRESETS", "CONFIG_NAME", "WEIGHTS_NAME", "resolve_targets", "with_lora", "is_adapter", "init_adapters",
           "delta", "merge", "add_adapters", "adapter_config", "save_adapter", "is_adapter_dir",
           "read_adapter_config", "adapter_targets", "adapter_values", "config_with_adapter", "load_adapter"]
