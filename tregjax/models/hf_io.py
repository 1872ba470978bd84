"""Hugging Face checkpoint import/export of plain (adapter-free) models: a declarative name table, tensor sources,
streamed loading.

Import goes tensor by tensor: an abstract (shape-only) model gives every parameter's logical axes, `parallel`
turns those into shardings, and each HF tensor is read from disk (plain reads, no mmap, so the page cache is not
counted twice), converted to our layout and placed straight onto its devices. Stacked layer parameters are filled
one layer at a time into a donated buffer, so the host never holds a second copy of the model.

Only safetensors (and GGUF through `tregjax.models.gguf.GGUFSource`) are read: never pickle, never remote code.
PEFT directories and LoRA models are `tregjax.models.adapters`' (built on this module); `tregjax.models.pretrained`
is the entry point that knows both.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from tregjax import parallel
from tregjax.models import safetensors
from tregjax.models import state as state_lib
from tregjax.models import transformer
from tregjax.models.config import ModelConfig

# ------------------------------------------------------------------ tensor sources


@runtime_checkable
class TensorSource(Protocol):
  """Where HF-layout tensors come from (safetensors directory, GGUF file, ...)."""

  @property
  def config(self) -> dict[str, Any]:
    """HF config.json contents."""
    ...

  def keys(self) -> list[str]:
    """HF tensor names."""
    ...

  def get(self, name: str) -> np.ndarray:
    """One tensor in HF layout (Linear weights [out, in])."""
    ...


def weight_files(path: str) -> list[str]:
  """The safetensors shards an HF directory's weights are read from: those its model.safetensors.index.json names,
  else every top-level *.safetensors (what the model's cache key hashes, `data.hashing.model_files`)."""
  index_path = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(path, name) for name in files]
  else:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = f" (found {pickles}: pickle checkpoints are refused; convert them to safetensors)" if pickles else ""
    raise FileNotFoundError(f"{path}: no *.safetensors files{hint}")
  return files


class SafetensorsSource:
  """A local HF model directory: config.json + one or many *.safetensors (index.json optional)."""

  def __init__(self, path: str):
    self.path = path
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path}: not a directory (expected an HF model directory or a .gguf file)")
    if not os.path.exists(config_path):
      raise FileNotFoundError(f"{path}: no config.json")
    with open(config_path) as f:
      self._config = json.load(f)
    files = weight_files(path)
    self._entries: dict[str, safetensors.Entry] = {}
    for file in files:
      for name, entry in safetensors.entries(file).items():
        if name in self._entries:
          raise ValueError(f"tensor {name!r} appears in both {self._entries[name].file} and {file}")
        self._entries[name] = entry

  @property
  def config(self) -> dict[str, Any]:
    return self._config

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name].shape

  def get(self, name: str) -> np.ndarray:
    return safetensors.read(self._entries[name])


def open_source(path: str) -> TensorSource:
  """SafetensorsSource for a directory, GGUFSource for a `.gguf` file."""
  if str(path).endswith(".gguf"):
    from tregjax.models import gguf  # pylint: disable=import-outside-toplevel  (gguf package: .gguf only)
    return gguf.GGUFSource(path)
  return SafetensorsSource(path)


def read_config(path: str) -> ModelConfig:
  """The ModelConfig of an HF directory (config.json only) or a .gguf file (its metadata)."""
  if str(path).endswith(".gguf"):
    return ModelConfig.from_hf_config(open_source(path).config, source=str(path))
  config_path = os.path.join(str(path), "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{path}: no config.json")
  with open(config_path) as f:
    return ModelConfig.from_hf_config(json.load(f), source=config_path)


# ------------------------------------------------------------------ the name table


@dataclasses.dataclass(frozen=True)
class Rule:
  """HF <-> tregjax layout. kind: "same" (identical), "flat" (HF flattens our trailing dims),
  "linear" (HF [out, in]; ours = transpose reshaped, the first `in_ndim` of our dims form `in`)."""

  kind: str
  in_ndim: int = 1

  def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
    if self.kind == "same":
      return ours
    if self.kind == "flat":
      return (math.prod(ours),)
    return (math.prod(ours[self.in_ndim:]), math.prod(ours[:self.in_ndim]))

  def to_ours(self, x: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    return (x.T if self.kind == "linear" else x).reshape(ours)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.kind == "same":
      return x
    if self.kind == "flat":
      return x.reshape(-1)
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:self.in_ndim]), -1).T)


_SAME, _FLAT, _LIN, _LIN2 = Rule("same"), Rule("flat"), Rule("linear", 1), Rule("linear", 2)
_L = "model.layers.{i}."
_P = ("model", "layers")
# (HF name template, our parameter path, layout rule). `{i}` = layer index of a stacked parameter.
HF_TABLE: tuple[tuple[str, tuple[str, ...], Rule], ...] = (
    ("model.embed_tokens.weight", ("model", "embed_tokens"), _SAME),
    ("model.norm.weight", ("model", "norm", "scale"), _SAME),
    ("lm_head.weight", ("lm_head",), _LIN),
    ("score.weight", ("score",), _LIN),
    (_L + "self_attn.q_proj.weight", _P + ("attn", "q_proj"), _LIN),
    (_L + "self_attn.k_proj.weight", _P + ("attn", "k_proj"), _LIN),
    (_L + "self_attn.v_proj.weight", _P + ("attn", "v_proj"), _LIN),
    (_L + "self_attn.o_proj.weight", _P + ("attn", "o_proj"), _LIN2),
    (_L + "self_attn.q_proj.bias", _P + ("attn", "q_bias"), _FLAT),
    (_L + "self_attn.k_proj.bias", _P + ("attn", "k_bias"), _FLAT),
    (_L + "self_attn.v_proj.bias", _P + ("attn", "v_bias"), _FLAT),
    (_L + "self_attn.o_proj.bias", _P + ("attn", "o_bias"), _SAME),
    (_L + "self_attn.q_norm.weight", _P + ("attn", "q_norm", "scale"), _SAME),
    (_L + "self_attn.k_norm.weight", _P + ("attn", "k_norm", "scale"), _SAME),
    (_L + "mlp.gate_proj.weight", _P + ("mlp", "gate_proj"), _LIN),
    (_L + "mlp.up_proj.weight", _P + ("mlp", "up_proj"), _LIN),
    (_L + "mlp.down_proj.weight", _P + ("mlp", "down_proj"), _LIN),
    (_L + "mlp.gate_proj.bias", _P + ("mlp", "gate_bias"), _SAME),
    (_L + "mlp.up_proj.bias", _P + ("mlp", "up_bias"), _SAME),
    (_L + "mlp.down_proj.bias", _P + ("mlp", "down_bias"), _SAME),
    (_L + "input_layernorm.weight", _P + ("input_layernorm", "scale"), _SAME),
    (_L + "post_attention_layernorm.weight", _P + ("post_attention_layernorm", "scale"), _SAME),
    (_L + "pre_feedforward_layernorm.weight", _P + ("pre_feedforward_layernorm", "scale"), _SAME),
    (_L + "post_feedforward_layernorm.weight", _P + ("post_feedforward_layernorm", "scale"), _SAME),
)
# Our parameter path -> (HF name template, layout rule).
BY_PATH = {path: (template, rule) for template, path, rule in HF_TABLE}
# Buffers some checkpoints carry that are not parameters (recomputed from the config).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class _Slot:
  """One HF tensor <-> (our parameter, layer index or None)."""

  hf_name: str
  path: tuple[str, ...]
  layer: int | None
  rule: Rule
  shape: tuple[int, ...]  # our per-tensor shape (one layer of a stacked parameter)


def _param_plan(abstract_state) -> tuple[dict[tuple[str, ...], Any], list[_Slot]]:
  """Every parameter of the (abstract) model and the HF tensors that make it up."""
  variables = {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(abstract_state)}
  slots = []
  for path, var in variables.items():
    if path not in BY_PATH:
      raise KeyError(f"parameter {'/'.join(path)} has no entry in the HF name table")
    template, rule = BY_PATH[path]
    shape = tuple(var.get_value().shape)
    if "{i}" in template:
      for i in range(shape[0]):
        slots.append(_Slot(template.format(i=i), path, i, rule, shape[1:]))
    else:
      slots.append(_Slot(template, path, None, rule, shape))
  return variables, slots


# ------------------------------------------------------------------ import


def _target_sharding(axes, shape, mesh):
  if mesh is None:
    return SingleDeviceSharding(jax.devices()[0])
  return parallel.sharding_for(axes, shape, mesh)


def _to_device(x: np.ndarray, sharding) -> jax.Array:
  """Place a host array on its sharding (each process reads only what its devices hold)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _set_layer_impl(full, part, i):
  return jax.lax.dynamic_update_index_in_dim(full, part, i, axis=0)


_set_layer = jax.jit(_set_layer_impl, donate_argnums=0)


def load_model(path: str, *, dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.float32, mesh=None,
               config_overrides: dict[str, Any] | None = None, source: TensorSource | None = None,
               head_seed: int = 0) -> transformer.Model:
  """Load an HF directory (config.json + *.safetensors) or a `.gguf` file, streamed onto `mesh` (or one device).

  `config_overrides` sets execution fields (e.g. remat="full", scan_layers=False, attention_impl="xla").
  `config_overrides={"num_labels": 1}` on a causal-LM checkpoint gives a RewardModel whose backbone is the
  checkpoint's and whose `score` head is freshly initialised (N(0, 0.02), seed `head_seed`), as HF does when a
  *ForSequenceClassification is made from a causal LM; the LM head is dropped.
  (`pretrained.from_pretrained` is the public entry point; it also takes PEFT adapter directories.)
  """
  source = open_source(path) if source is None else source
  label = str(path) if str(path).endswith(".gguf") else os.path.join(str(path), "config.json")
  cfg = ModelConfig.from_hf_config(source.config, source=label)
  if config_overrides:
    cfg = cfg.replace(**config_overrides)
  abstract = transformer.abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
  graphdef, abstract_state = nnx.split(abstract)
  variables, slots = _param_plan(abstract_state)
  by_name = {s.hf_name: s for s in slots}

  # Names first: report every missing/unexpected tensor before reading any data.
  keys = list(source.keys())
  # A causal LM loaded as a reward model gets a fresh `score` head; its unembedding is either its own lm_head or, with
  # tied embeddings (SmolLM2, Gemma), the embedding itself (no lm_head tensor at all).
  new_head = cfg.is_reward_model and "score.weight" not in keys and (
      "lm_head.weight" in keys or cfg.tie_word_embeddings)
  if new_head:
    keys = [k for k in keys if k != "lm_head.weight"]
  unexpected = []
  for name in keys:
    if name in by_name or _IGNORED.match(name):
      continue
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue  # tied: some exporters write the shared matrix twice; the embedding is the one we keep
    unexpected.append(name)
  missing = [s for s in slots if s.hf_name not in set(keys) and not (new_head and s.hf_name == "score.weight")]
  if missing or unexpected:
    lines = [f"{path}: checkpoint does not match the {cfg.model_type} model described by its config.json"]
    lines += [f"  missing tensor {s.hf_name} (expected shape {s.rule.hf_shape(s.shape)})" for s in missing[:20]]
    lines += [f"  unexpected tensor {n}" + (
        f" (shape {source.shape(n)})" if hasattr(source, "shape") else "") for n in unexpected[:20]]
    if len(missing) > 20 or len(unexpected) > 20:
      lines.append(f"  ... {len(missing)} missing and {len(unexpected)} unexpected in total")
    raise ValueError("\n".join(lines))

  shape_of = getattr(source, "shape", None)
  if shape_of is not None:  # cheap header check before any data is read
    for s in slots:
      if s.hf_name not in keys:
        continue
      expected, found = s.rule.hf_shape(s.shape), tuple(shape_of(s.hf_name))
      if expected != found:
        raise ValueError(f"{path}: tensor {s.hf_name} has shape {found}, expected {expected}")

  values: dict[tuple[str, ...], jax.Array] = {}
  for p, var in variables.items():
    axes = var.get_metadata().get("axes")
    shape = tuple(var.get_value().shape)
    if p[:2] == _P:  # stacked: allocate once on the target sharding, fill layer by layer (donated in place)
      zeros = jax.jit(lambda shape=shape: jnp.zeros(shape, param_dtype),
                      out_shardings=_target_sharding(axes, shape, mesh))  # multi-host safe allocation
      values[p] = zeros()
  for s in slots:
    if new_head and s.hf_name == "score.weight":
      axes = variables[s.path].get_metadata().get("axes")
      init = jax.jit(lambda key: (0.02 * jax.random.normal(key, s.shape)).astype(param_dtype),
                     out_shardings=_target_sharding(axes, s.shape, mesh))
      values[s.path] = init(jax.random.key(head_seed))
      continue
    x = source.get(s.hf_name)
    expected = s.rule.hf_shape(s.shape)
    if tuple(x.shape) != expected:
      raise ValueError(f"{path}: tensor {s.hf_name} has shape {tuple(x.shape)}, expected {expected}")
    # One contiguous host copy in our layout and dtype (astype/transposes would otherwise stack copies).
    x = np.ascontiguousarray(s.rule.to_ours(np.asarray(x), s.shape).astype(param_dtype, copy=False))
    axes = variables[s.path].get_metadata().get("axes")
    if s.layer is None:
      values[s.path] = _to_device(x, _target_sharding(axes, s.shape, mesh))
    else:
      part = _to_device(x, _target_sharding(axes[1:], s.shape, mesh))
      values[s.path] = _set_layer(values[s.path], part, s.layer)
    # Wait before reading the next tensor: async dispatch would otherwise let host buffers pile up.
    values[s.path].block_until_ready()
    del x

  flat = [(path_keys, var.replace(values[tuple(str(k) for k in path_keys)]))
          for path_keys, var in nnx.to_flat_state(abstract_state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def check_tokenizer_vocab(tokenizer: Any, model_or_config: Any, *, where: str = "") -> None:
  """Refuse a tokenizer whose ids would index past the embedding (a smaller tokenizer is fine: padded vocab).

  Every path pairing a tokenizer with a model calls this: an out-of-range id does not crash on an accelerator, it
  reads garbage (NaN scores, silently). `where` names the pairing in the message (command, paths).
  """
  cfg = getattr(model_or_config, "config", model_or_config)
  if isinstance(tokenizer, int):
    size = tokenizer
  elif hasattr(tokenizer, "get_vocab_size"):  # a `tokenizers.Tokenizer`
    size = tokenizer.get_vocab_size(with_added_tokens=True)
  else:  # transformers tokenizers count added tokens in len()
    size = len(tokenizer)
  if size > cfg.vocab_size:
    raise ValueError(
        f"{where + ': ' if where else ''}tokenizer has {size} tokens but the model's embedding has only "
        f"vocab_size={cfg.vocab_size} rows; "
        "ids >= vocab_size would read out of range. Use the tokenizer that belongs to this checkpoint.")


# ------------------------------------------------------------------ export


def _iter_export(model: transformer.Model, dtype) -> Iterator[tuple[_Slot, Any]]:
  """(slot, thunk -> HF-layout numpy array) for every tensor, layer by layer (one tensor on host at a time)."""
  state = nnx.state(model, nnx.Param)
  variables, slots = _param_plan(state)
  for s in slots:
    arr = variables[s.path].get_value()

    def thunk(arr=arr, s=s):
      x = state_lib.to_host(arr[s.layer] if s.layer is not None else arr)
      return s.rule.to_hf(x).astype(dtype or x.dtype, copy=False)  # read as `dtype` already: no copy

    yield s, thunk


def save_model(model: transformer.Model, path: str, *, tokenizer: Any = None, dtype: Any = None,
               max_shard_size: int = 5 * 2**30) -> None:
  """Write config.json + safetensors shards (+ index when sharded) that `transformers` loads; files 0644.

  `dtype` casts the saved tensors (default: the parameter dtype); tied embeddings write no lm_head (HF re-ties).
  A config without pad_token_id takes the tokenizer's. A model with LoRA adapters is refused: merge it first
  (`pretrained.save_pretrained` does).
  """
  cfg = model.config
  if cfg.lora_targets:
    raise ValueError("save_model: the model has LoRA adapters; merge them first (adapters.merge)")
  hf_config = cfg.to_hf_config()
  if hf_config.get("pad_token_id") is None and getattr(tokenizer, "pad_token_id", None) is not None:
    # transformers' *ForSequenceClassification finds each row's last token through pad_token_id; without it a
    # reward model refuses batches > 1. The tokenizer saved alongside knows the id.
    hf_config["pad_token_id"] = int(tokenizer.pad_token_id)
  if dtype is not None:
    hf_config["torch_dtype"] = {"bfloat16": "bfloat16", "float16": "float16"}.get(jnp.dtype(dtype).name, "float32")
  np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
  items = list(_iter_export(model, np_dtype))
  # Plan the shards from shapes only, then stream each file.
  state = nnx.state(model, nnx.Param)
  variables = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(state)}
  planned, shards, size = [], [[]], 0
  for s, thunk in items:
    dt = np_dtype or np.dtype(variables[s.path].get_value().dtype)
    shape = s.rule.hf_shape(s.shape)
    nbytes = math.prod(shape) * dt.itemsize
    if shards[-1] and size + nbytes > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append((s.hf_name, shape, dt, thunk))
    size += nbytes
    planned.append(nbytes)
  if jax.process_index() != 0:
    for shard in shards:  # other processes still take part in the gathers
      for *_, thunk in shard:
        thunk()
    return
  os.makedirs(path, exist_ok=True)
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  for name, shard in zip(names, shards):
    safetensors.write(os.path.join(path, name), shard)
  if len(shards) > 1:
    weight_map = {t[0]: name for name, shard in zip(names, shards) for t in shard}
    safetensors.write_json(os.path.join(path, "model.safetensors.index.json"),
                {"metadata": {"total_size": int(sum(planned))}, "weight_map": weight_map})
  elif os.path.exists(os.path.join(path, "model.safetensors.index.json")):
    os.unlink(os.path.join(path, "model.safetensors.index.json"))
  for stale in glob.glob(os.path.join(path, "model*.safetensors")):  # shards of an earlier save
    if os.path.basename(stale) not in names:
      os.unlink(stale)
  safetensors.write_json(os.path.join(path, "config.json"), hf_config)
  if tokenizer is not None:
    if hasattr(tokenizer, "save_pretrained"):
      tokenizer.save_pretrained(path)
    else:  # a bare `tokenizers.Tokenizer`
      tokenizer.save(os.path.join(path, "tokenizer.json"))
