"""SmolLM2-135M's architecture on an accelerator: forward tokens/s (with MFU) and KV-cache decode tokens/s, bf16.

    python bench/smollm2_accelerator.py [--batch 8] [--seq 256] [--new 128] [--dtype bfloat16]

The real weights (a 98 MB GGUF) cannot travel to the lent GPU machine (64 MiB limit, no network there), so this uses
random weights of exactly SmolLM2-135M-Instruct's shape (30 layers, width 576, 9 heads, 3 kv heads, MLP 1536, vocab
49152, tied embeddings, rope base 100000): throughput does not depend on the values. Writes
bench/out/smollm2_accelerator.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def median_time(fn, repeats):
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from tregjax import models
  from tregjax.models import decoding
  from tregjax.training import metrics

  cfg = models.ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                           num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
                           max_position_embeddings=8192, rms_norm_eps=1e-5)
  model = models.from_config(cfg, 0, dtype=jnp.dtype(args.dtype))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
  forward = jax.jit(lambda t: model(t))
  fwd_s = median_time(lambda: forward(tokens), args.repeats)
  flops = (2 * metrics.matmul_params(cfg) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.seq)
  flops *= args.batch * args.seq
  peak = metrics.peak_flops_per_device()
  prompts = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt)).tolist()
  key = jax.random.key(0)
  dec_s = median_time(lambda: decoding.generate(model, prompts, max_new_tokens=args.new, key=key).tokens,
                      args.repeats)
  device = jax.devices()[0].device_kind
  out = dict(device=device, args=vars(args), forward_s=fwd_s, forward_tokens_per_s=args.batch * args.seq / fwd_s,
             forward_mfu=flops / fwd_s / peak if peak else None, decode_s=dec_s,
             decode_tokens_per_s=args.batch * args.new / dec_s)
  print(f"SmolLM2-135M shape, random weights, {args.dtype}, {device}")
  print(f"forward {args.batch}x{args.seq}: {fwd_s * 1e3:.2f} ms, {out['forward_tokens_per_s']:.0f} tokens/s"
        + (f", MFU {100 * out['forward_mfu']:.1f}%" if peak else ""))
  print(f"greedy decode batch {args.batch}, prompt {args.prompt}, {args.new} new: {dec_s:.3f} s, "
        f"{out['decode_tokens_per_s']:.0f} new tokens/s (prefill and compile-free)")
  os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
  with open(os.path.join(ROOT, "bench", "out", "smollm2_accelerator.json"), "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
