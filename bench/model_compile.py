"""Compile time of a deep, narrow Llama: layers stacked + `lax.scan` vs an unrolled Python loop over the same params.

    python bench/model_compile.py [--layers 32] [--width 64] [--grad]

Times `jit(...).lower(...).compile()` of the forward (and, with --grad, of a value_and_grad step) for both
variants; the scanned one should stay roughly flat in depth while the unrolled one grows linearly. The step time of
both layer loops, per depth: bench/train_step.py --loops scan,unrolled.
"""

from __future__ import annotations

import argparse
import time

from common import machine, table, today, update_results, write_json


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--grad", action="store_true", help="also compile value_and_grad")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top

  tokens = jnp.zeros((2, args.seq), jnp.int32)
  results = {"date": today(), "device": machine(), "args": vars(args)}
  rows = []
  for scan in (True, False):
    cfg = models.ModelConfig.tiny_llama(num_layers=args.layers, hidden_size=args.width,
                                        intermediate_size=2 * args.width, num_heads=4, num_kv_heads=2,
                                        head_dim=args.width // 4, scan_layers=scan)
    graphdef, state = nnx.split(models.abstract_model(cfg))
    fns = {"forward": lambda st, t: nnx.merge(graphdef, st)(t)}
    if args.grad:
      fns["value_and_grad"] = jax.value_and_grad(lambda st, t: jnp.mean(nnx.merge(graphdef, st)(t)))
    entry = {}
    for name, fn in fns.items():
      t0 = time.perf_counter()
      lowered = jax.jit(fn).lower(state, tokens)
      t1 = time.perf_counter()
      lowered.compile()
      t2 = time.perf_counter()
      entry[name] = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}
    results["scan" if scan else "unrolled"] = entry
  for name in results["scan"]:
    s, u = results["scan"][name]["total_s"], results["unrolled"][name]["total_s"]
    rows.append([name, f"{s:.2f}", f"{u:.2f}", f"{u / s:.1f}x"])
  text = table(["function", "stacked + scan: trace+compile s", "unrolled loop: trace+compile s",
                "unrolled / stacked"], rows)
  desc = f"{args.layers}-layer Llama, width {args.width}, batch 2 x {args.seq}"
  print(desc)
  print(text)
  print(f"wrote {write_json('model_compile', results)}")
  cmd = f"python bench/model_compile.py --layers {args.layers} --width {args.width}" + (" --grad" if args.grad else "")
  update_results("model_compile", (
      f"### Compile time, stacked vs unrolled layers ({desc})\n\n`{cmd}` ({today()}, {machine()}; one compile "
      f"each, jit trace + lower + XLA compile).\n\n{text}\n"))


if __name__ == "__main__":
  main()
