"""Flax NNX decoders (Llama 2/3/3.1/3.2, Mistral, Qwen 2/3, Gemma 1/2/3-text), HF import/export, KV-cache decoding.

Modules, each importing only those before it: config <- lora (adapter layer pieces) <- layers <- transformer <-
state (values by path) / safetensors (the file format) <- hf_io (plain HF checkpoints) <- adapters (whole-model
LoRA, PEFT directories) <- pretrained (from_pretrained / load_config / save_pretrained of either); decoding and gguf
beside them.

Exports resolve lazily so `import tregjax.models` stays cheap (and never touches torch).
"""

import importlib

_EXPORTS = {
    "ModelConfig": "tregjax.models.config",
    "UnsupportedModelError": "tregjax.models.config",
    "SUPPORTED_MODEL_TYPES": "tregjax.models.config",
    "CausalLM": "tregjax.models.transformer",
    "RewardModel": "tregjax.models.transformer",
    "from_config": "tregjax.models.transformer",
    "abstract_model": "tregjax.models.transformer",
    "from_pretrained": "tregjax.models.pretrained",
    "save_pretrained": "tregjax.models.pretrained",
    "load_config": "tregjax.models.pretrained",
    "TensorSource": "tregjax.models.hf_io",
    "SafetensorsSource": "tregjax.models.hf_io",
    "check_tokenizer_vocab": "tregjax.models.hf_io",
    "decoding": "tregjax.models.decoding",
    "generate": "tregjax.models.decoding",
    "GenerateOutput": "tregjax.models.decoding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'tregjax.models' has no attribute {name!r}")
  module = importlib.import_module(_EXPORTS[name])
  return module if name == "decoding" else getattr(module, name)
