"""Shared pieces of the model benchmarks: the random Llama both frameworks run, and FLOP counting.

Timing/result helpers come from smollm2_common (one place for RESULTS.md handling).
"""

from __future__ import annotations

import os
import tempfile

from smollm2_common import REPO  # noqa: F401  (puts the repo on sys.path)


def llama_hf_config(layers: int, width: int, vocab: int, heads: int | None = None, kv_heads: int | None = None
                    ) -> dict:
  heads = heads or max(1, width // 64)
  return dict(model_type="llama", vocab_size=vocab, hidden_size=width, intermediate_size=int(width * 8 / 3 // 64 * 64),
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
              head_dim=width // heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def save_random_hf_llama(hf_config: dict, seed: int = 0, path: str | None = None):
  """Build a random torch Llama, save it with transformers; returns (torch model, directory)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = dict(hf_config)
  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  path = path or tempfile.mkdtemp(prefix="tregjax-bench-")
  model.save_pretrained(path)
  return model, path


def flops_per_token(cfg, seq: int) -> float:
  """Matmul FLOPs of one token's forward (2 per multiply-add); attention dense at length `seq` (no causal skip)."""
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  per_layer = 2 * (d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2 + 3 * d * f)
  attention = 2 * 2 * seq * cfg.num_heads * hd
  return cfg.num_layers * (per_layer + attention) + 2 * d * cfg.vocab_size


def rss_mib() -> float:
  with open(f"/proc/{os.getpid()}/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")
