"""SmolLM2-135M import: GGUF file -> a ready float32 model, tregjax vs transformers' GGUF loader.

    python bench/smollm2_import.py [--repeats 3] [--dtype f32|bf16]

Each measurement is a fresh subprocess (nothing cached in the interpreter): it reports the library import
time, the load time (GGUF parse + dequantize + building the model; for tregjax until the arrays are on the
device) and the peak host RSS of the whole process (ru_maxrss). The tokenizer is not part of either.
"""

from __future__ import annotations

import argparse
import statistics

from common import gguf_path, machine, run_python, table, today, update_results, write_json

_TREGJAX = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import jax, jax.numpy as jnp
from tregjax import models
t1 = time.perf_counter()
m = models.from_pretrained(sys.argv[1], dtype={dtype}, param_dtype=jnp.float32)
jax.block_until_ready(jax.tree.leaves(m))
t2 = time.perf_counter()
print("RESULT" + json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

_TRANSFORMERS = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
import torch, transformers
t1 = time.perf_counter()
p = sys.argv[1]
m = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p), dtype={dtype})
t2 = time.perf_counter()
print("RESULT" + json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
  args = parser.parse_args()
  path = str(gguf_path())
  variants = {
      "tregjax (GGUFSource -> NNX)": _TREGJAX.format(dtype={"f32": "jnp.float32", "bf16": "jnp.bfloat16"}[args.dtype]),
      "transformers GGUF loader": _TRANSFORMERS.format(
          dtype={"f32": "torch.float32", "bf16": "torch.bfloat16"}[args.dtype]),
  }
  results = {"date": today(), "machine": machine(), "dtype": args.dtype, "variants": {}}
  for name, code in variants.items():
    runs = [run_python(code, path) for _ in range(args.repeats)]
    results["variants"][name] = {
        "runs": runs, **{k: statistics.median(r[k] for r in runs) for k in ("import_s", "load_s", "rss_mib")}}
  base = results["variants"]["transformers GGUF loader"]
  rows = []
  for name, r in results["variants"].items():
    rows.append([name, f"{r['import_s']:.2f}", f"{r['load_s']:.2f}", f"{r['import_s'] + r['load_s']:.2f}",
                 f"{r['rss_mib']:.0f}", f"{(base['import_s'] + base['load_s']) / (r['import_s'] + r['load_s']):.2f}x",
                 f"{r['rss_mib'] / base['rss_mib']:.2f}"])
  text = table(["loader", "library import s", "load s", "total s", "peak RSS MiB", "speed vs transformers",
                "RSS vs transformers"], rows)
  print(f"SmolLM2-135M GGUF -> {args.dtype} model, {machine()}, median of {args.repeats} fresh processes")
  print(text)
  print(f"wrote {write_json(f'smollm2_import_{args.dtype}', results)}")
  update_results(f"smollm2_import_{args.dtype}", (
      f"### SmolLM2-135M import from GGUF, {args.dtype}\n\n"
      f"`python bench/smollm2_import.py --dtype {args.dtype}` ({today()}, {machine()}; median of {args.repeats} "
      f"fresh subprocesses; peak RSS = ru_maxrss of the whole process, tokenizer excluded).\n\n{text}\n"))


if __name__ == "__main__":
  main()
