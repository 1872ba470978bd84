"""Independent goldens for the model tests: tiny random Hugging Face models built and run in torch.

Every parameter (norm scales and biases included) is randomised, so a layout or offset mistake cannot hide behind
HF's ones/zeros initialisation.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

TOKENS = np.array([[5, 17, 3, 250, 9, 44, 101, 7, 8, 200, 31, 2],
                   [11, 4, 99, 123, 6, 0, 0, 0, 0, 0, 0, 0]], np.int32)
SEGMENTS = (np.arange(TOKENS.shape[1])[None] < np.array([[12], [5]])).astype(np.int32)

LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=3, head_dim=12, max_position_embeddings=256,
             rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
             tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_hf(config: dict, *, seed: int = 0, seq_cls: bool = False) -> torch.nn.Module:
  """A float32 HF model with all parameters randomised."""
  config = dict(config)
  model_type = config.pop("model_type")
  hf_config = transformers.AutoConfig.for_model(model_type, **config)
  hf_config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(seed)
  cls = transformers.AutoModelForSequenceClassification if seq_cls else transformers.AutoModelForCausalLM
  model = cls.from_config(hf_config, dtype=torch.float32, attn_implementation="eager")
  gen = torch.Generator().manual_seed(seed + 1)
  gemma = model_type.startswith("gemma")
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name:
        p.copy_((0.0 if gemma else 1.0) + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      else:
        p.copy_(0.08 * noise)
  model.eval()
  return model


def hf_logits(model: torch.nn.Module, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  with torch.no_grad():
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def save_hf(model: torch.nn.Module, path: str, *, max_shard_size: str | None = None) -> str:
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, **kwargs)
  return str(path)
