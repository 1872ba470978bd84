"""Loading and saving models by path: the one module that knows both plain Hugging Face directories (and .gguf files)
and PEFT adapter directories.

`from_pretrained` / `load_config` take an HF directory, a `.gguf` file, or a PEFT LoRA directory (adapter_config.json,
no config.json) whose `base_model_name_or_path` is a local directory or .gguf (relative paths are taken from the
adapter directory): its base with the adapter applied in the forward, so score and generate take it as is.
`save_pretrained` writes what `transformers` loads, LoRA adapters merged into the weights.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from tregjax.models import adapters
from tregjax.models import hf_io
from tregjax.models import transformer
from tregjax.models.config import ModelConfig


def adapter_base(path: str) -> str:
  """The local base model of the PEFT directory at `path` (its `base_model_name_or_path`)."""
  conf = adapters.read_adapter_config(path)
  base = conf.get("base_model_name_or_path") or ""
  candidates = [base, os.path.join(path, base)] if base and not os.path.isabs(base) else [base]
  found = next((c for c in candidates if c and os.path.exists(c)), None)
  if found is None:
    raise FileNotFoundError(f"{os.path.join(path, adapters.CONFIG_NAME)}: base_model_name_or_path={base!r} is not a "
                            "local model directory; load the base with from_pretrained and call "
                            "adapters.load_adapter")
  return found


def load_config(path: str) -> ModelConfig:
  """The ModelConfig of an HF directory (config.json only), a .gguf file (its metadata) or a PEFT directory (its
  base's, with the adapter's rank, alpha and targets)."""
  if adapters.is_adapter_dir(path):
    return adapters.config_with_adapter(hf_io.read_config(adapter_base(path)), path)
  return hf_io.read_config(path)


def from_pretrained(path: str, *, dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.float32, mesh=None,
                    config_overrides: dict[str, Any] | None = None, source: hf_io.TensorSource | None = None,
                    head_seed: int = 0) -> transformer.Model:
  """Load an HF directory (config.json + *.safetensors), a `.gguf` file or a PEFT LoRA directory, streamed onto
  `mesh` (or one device).

  `config_overrides` sets execution fields (e.g. remat="full", scan_layers=False, attention_impl="xla").
  `config_overrides={"num_labels": 1}` on a causal-LM checkpoint gives a RewardModel whose backbone is the
  checkpoint's and whose `score` head is freshly initialised (N(0, 0.02), seed `head_seed`), as HF does when a
  *ForSequenceClassification is made from a causal LM; the LM head is dropped. A PEFT adapter is loaded in float32.
  """
  if source is None and adapters.is_adapter_dir(path):
    model = hf_io.load_model(adapter_base(path), dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                             config_overrides=config_overrides, head_seed=head_seed)
    return adapters.load_adapter(model, path, mesh=mesh, param_dtype=jnp.float32)
  return hf_io.load_model(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, config_overrides=config_overrides,
                          source=source, head_seed=head_seed)


def save_pretrained(model: transformer.Model, path: str, *, tokenizer: Any = None, dtype: Any = None,
                    max_shard_size: int = 5 * 2**30) -> None:
  """Write config.json + safetensors shards (+ index when sharded) that `transformers` loads (files 0644).

  `dtype` casts the saved tensors (default: the parameter dtype); tied embeddings write no lm_head (HF re-ties).
  A config without pad_token_id takes the tokenizer's. A model with LoRA adapters is saved merged (W + (α/r)·A B);
  `adapters.save_adapter` writes the adapter alone, as PEFT does.
  """
  hf_io.save_model(adapters.merge(model), path, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size)


__all__ = ["from_pretrained", "load_config", "save_pretrained", "adapter_base"]
