"""Full-logits vs chunked token log-probs: XLA's peak temporary bytes and wall time of loss + gradient.

Usage: python bench/logprob_memory.py [--vocab 128256] [--width 256] [--batch 2] [--lengths 512,1024,2048]
Prints a table and writes bench/out/logprob_memory.json.
"""

import argparse
import platform

import common
import jax
import jax.numpy as jnp
import numpy as np

from tregjax import losses


def measure(fn, args, repeats):
  compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(*args))  # warm-up
  return temp, common.timed(lambda: jax.block_until_ready(compiled(*args)), repeats)[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", type=int, default=128256)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--lengths", default="512,1024,2048")
  parser.add_argument("--chunk-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  rows = []
  for length in map(int, args.lengths.split(",")):
    key = jax.random.PRNGKey(0)
    hidden = jax.random.normal(key, (args.batch, length, args.width), jnp.float32)
    w = jax.random.normal(key, (args.width, args.vocab), jnp.float32) / np.sqrt(args.width)
    labels = jax.random.randint(key, (args.batch, length), 0, args.vocab)

    def full(hidden, w):
      return jnp.sum(losses.token_logps(hidden @ w, labels))

    def chunked(hidden, w):
      return jnp.sum(losses.chunked_token_logps(hidden, labels, lambda h: h @ w, chunk_size=args.chunk_size))

    full_bytes, full_s = measure(full, (hidden, w), args.repeats)
    chunk_bytes, chunk_s = measure(chunked, (hidden, w), args.repeats)
    rows.append(dict(T=length, full_temp_mib=full_bytes / 2**20, chunked_temp_mib=chunk_bytes / 2**20,
                     memory_ratio=chunk_bytes / full_bytes, full_s=full_s, chunked_s=chunk_s,
                     time_ratio=chunk_s / full_s))

  print(f"B={args.batch} V={args.vocab} D={args.width} chunk={args.chunk_size} device={jax.devices()[0].device_kind}")
  print(f"{'T':>6} {'full MiB':>10} {'chunked MiB':>12} {'mem ratio':>10} {'full s':>8} {'chunked s':>10} {'time ratio':>10}")
  for r in rows:
    print(f"{r['T']:>6} {r['full_temp_mib']:>10.1f} {r['chunked_temp_mib']:>12.1f} {r['memory_ratio']:>10.3f} "
          f"{r['full_s']:>8.3f} {r['chunked_s']:>10.3f} {r['time_ratio']:>10.2f}")
  common.write_json("logprob_memory", dict(args=vars(args), device=jax.devices()[0].device_kind,
                                           machine=platform.machine(), rows=rows))


if __name__ == "__main__":
  main()
