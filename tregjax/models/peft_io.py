"""PEFT adapter directories in and out: `adapter_config.json` + `adapter_model.safetensors`.

Written so that `peft.PeftModel.from_pretrained(base, DIR)` loads it on the Hugging Face base, and read back to
continue training or to score/generate with the adapter (torch-free: the tensor names and layouts come from the
HF name table in `hf_io`, PEFT's LoRA tensors being `<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]).
Only plain LoRA is read: rsLoRA, DoRA, biases, per-module ranks or `modules_to_save` are refused by name.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tregjax import parallel
from tregjax.models import hf_io
from tregjax.models import lora
from tregjax.models import transformer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _tensor_plan(cfg) -> list[tuple[str, str, hf_io.Rule, int]]:
  """(PEFT tensor template with {i}, our adapter path, layout rule, in_ndim) for every adapter factor."""
  plan = []
  for target in cfg.lora_targets:
    template, _ = hf_io._BY_PATH[("model", "layers") + tuple(target.split("/"))]  # pylint: disable=protected-access
    in_ndim = len(lora.projection_shapes(cfg)[target].in_shape)
    stem = _PREFIX + template[:-len(".weight")]
    ours = f"model/layers/{target}_lora/"
    plan.append((stem + ".lora_A.weight", ours + "lora_a", hf_io.Rule("linear", in_ndim), in_ndim))
    plan.append((stem + ".lora_B.weight", ours + "lora_b", hf_io.Rule("linear", 1), 1))
  return plan


def adapter_config(cfg, base_model_name_or_path: str = "") -> dict[str, Any]:
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
  """Write `model`'s adapters as a PEFT LoRA directory (float32 tensors, one per layer and factor)."""
  cfg = model.config
  if not cfg.lora_targets:
    raise ValueError("save_adapter: the model has no LoRA adapters (trained without config.model.lora.rank > 0)")
  values = lora.flat_values(nnx.state(model, nnx.LoRAParam))
  items = []
  for template, ours, rule, _ in _tensor_plan(cfg):
    arr = values[ours]
    for i in range(cfg.num_layers):
      per_layer = tuple(arr.shape[1:])
      host = hf_io._host  # pylint: disable=protected-access
      thunk = lambda arr=arr, i=i, rule=rule, host=host: rule.to_hf(host(arr[i])).astype(np.float32)  # noqa: E731
      items.append((template.format(i=i), rule.hf_shape(per_layer), np.dtype(np.float32), thunk))
  conf = adapter_config(cfg, base_model_name_or_path)
  if jax.process_index() != 0:
    for *_, thunk in items:
      thunk()
    return path
  os.makedirs(path, exist_ok=True)
  hf_io._write_safetensors(os.path.join(path, WEIGHTS_NAME), items)  # pylint: disable=protected-access
  hf_io._write_json(os.path.join(path, CONFIG_NAME), conf)  # pylint: disable=protected-access
  return path


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
  return conf


def adapter_targets(conf: dict[str, Any], source: str = CONFIG_NAME) -> tuple[str, ...]:
  """PEFT target_modules (names, or a regex over module names) -> tregjax target names."""
  modules = conf.get("target_modules")
  if isinstance(modules, str):
    import re  # pylint: disable=import-outside-toplevel
    hf_names = {t: f"model.layers.0.{'self_attn' if t.startswith('attn') else 'mlp'}.{t.split('/')[1]}"
                for t in lora.TARGETS}
    found = tuple(t for t in lora.TARGETS if re.fullmatch(modules, hf_names[t]))
  else:
    wanted = set(modules or ())
    found = tuple(t for t in lora.TARGETS if t.split("/")[1] in wanted)
    unknown = sorted(wanted - {t.split("/")[1] for t in lora.TARGETS})
    if unknown:
      raise ValueError(f"{source}: target_modules {unknown} are not LoRA targets tregjax supports "
                       f"({[t.split('/')[1] for t in lora.TARGETS]})")
  if not found:
    raise ValueError(f"{source}: target_modules={modules!r} matches no projection")
  return found


def _read_tensors(path: str) -> dict[str, tuple[np.dtype, tuple[int, ...], Any]]:
  file = os.path.join(path, WEIGHTS_NAME)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
  header, offset = hf_io._read_safetensors_header(file)  # pylint: disable=protected-access
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = hf_io._ST_DTYPES[info["dtype"]]  # pylint: disable=protected-access
    shape = tuple(info["shape"])
    start, end = info["data_offsets"]

    def read(start=start, end=end, dtype=dtype, shape=shape):
      with open(file, "rb") as f:
        f.seek(offset + start)
        return np.frombuffer(f.read(end - start), dtype).reshape(shape)

    out[name] = (dtype, shape, read)
  return out


def adapter_values(cfg, path: str, *, param_dtype: Any = jnp.float32) -> dict[str, np.ndarray]:
  """Our stacked adapter arrays {"model/layers/attn/q_proj_lora/lora_a": [L, *in, r], ...} from a PEFT directory
  whose rank / alpha / targets `cfg` already carries; missing, extra or misshapen tensors are errors by name."""
  tensors = _read_tensors(path)
  shapes = lora.projection_shapes(cfg)
  out, used = {}, set()
  for template, ours, rule, _ in _tensor_plan(cfg):
    target = ours[len("model/layers/"):].rsplit("_lora/", 1)[0]
    s = shapes[target]
    per_layer = s.in_shape + (cfg.lora_rank,) if ours.endswith("lora_a") else (cfg.lora_rank,) + s.out_shape
    layers = []
    for i in range(cfg.num_layers):
      name = template.format(i=i)
      if name not in tensors:
        name_alt = name.replace(".weight", ".default.weight")  # some writers keep the adapter name
        if name_alt not in tensors:
          raise ValueError(f"{path}: missing tensor {name} (expected shape {rule.hf_shape(per_layer)})")
        name = name_alt
      _, shape, read = tensors[name]
      if shape != rule.hf_shape(per_layer):
        raise ValueError(f"{path}: tensor {name} has shape {shape}, expected {rule.hf_shape(per_layer)}")
      layers.append(rule.to_ours(np.asarray(read(), np.float32), per_layer))
      used.add(name)
    out[ours] = np.stack(layers).astype(param_dtype)
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f"{path}: tensors this model has no place for: {extra[:5]} (another base model or targets?)")
  return out


def config_with_adapter(base_cfg, path: str):
  """base_cfg with the rank, alpha, targets and dropout (used only by training steps) of the PEFT directory at
  `path`."""
  conf = read_adapter_config(path)
  targets = adapter_targets(conf, os.path.join(path, CONFIG_NAME))
  return base_cfg.replace(lora_rank=int(conf["r"]), lora_alpha=float(conf.get("lora_alpha", conf["r"])),
                          lora_targets=targets, lora_dropout=float(conf.get("lora_dropout") or 0.0))


def load_adapter(model: nnx.Module, path: str, *, mesh=None, param_dtype: Any = jnp.float32) -> nnx.Module:
  """`model` (a base causal LM, no adapters) with the PEFT adapter at `path` applied in its forward."""
  if model.config.lora_targets:
    raise ValueError(f"load_adapter: the model already has adapters on {model.config.lora_targets}")
  cfg = config_with_adapter(model.config, path)
  graphdef, abstract_state = nnx.split(transformer.abstract_model(cfg, dtype=model.model.dtype,
                                                                  param_dtype=param_dtype))
  values = lora.flat_values(nnx.state(model))
  axes = {parallel.path_str(p): v.get_metadata().get("axes")
          for p, v in nnx.to_flat_state(abstract_state)}
  for name, x in adapter_values(cfg, path, param_dtype=param_dtype).items():
    sharding = parallel.sharding_for(axes[name], x.shape, mesh) if mesh is not None else None
    values[name] = jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)
  return nnx.merge(graphdef, lora.fill(abstract_state, values))


def _base_path(path: str) -> str:
  conf = read_adapter_config(path)
  base = conf.get("base_model_name_or_path") or ""
  candidates = [base, os.path.join(path, base)] if base and not os.path.isabs(base) else [base]
  found = next((c for c in candidates if c and os.path.exists(c)), None)
  if found is None:
    raise FileNotFoundError(f"{os.path.join(path, CONFIG_NAME)}: base_model_name_or_path={base!r} is not a local "
                            "model directory; load the base with from_pretrained and call load_adapter")
  return found


def load_config(path: str):
  """The ModelConfig of a PEFT directory: its base's, with the adapter's rank, alpha and targets."""
  return config_with_adapter(hf_io.load_config(_base_path(path)), path)


def from_pretrained(path: str, *, dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.float32, mesh=None,
                    config_overrides: dict[str, Any] | None = None) -> nnx.Module:
  """The base named by a PEFT directory's `base_model_name_or_path` (a local HF directory or .gguf; relative paths
  are taken from the adapter directory) with the adapter applied in the forward."""
  model = hf_io.from_pretrained(_base_path(path), dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                config_overrides=config_overrides)
  return load_adapter(model, path, mesh=mesh, param_dtype=jnp.float32)


__all__ = ["from_pretrained", "load_config", "save_adapter", "load_adapter", "adapter_values", "read_adapter_config",
           "config_with_adapter",
           "adapter_config", "CONFIG_NAME", "WEIGHTS_NAME"]
