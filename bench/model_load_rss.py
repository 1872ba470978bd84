"""Peak host memory while importing a ≈1 GB safetensors checkpoint: tregjax `from_pretrained` vs transformers.

    python bench/model_load_rss.py [--layers 16] [--width 1024] [--keep DIR]

A random f32 Llama is written once (by tregjax `save_pretrained`); each loader then runs in a fresh subprocess that
reports its RSS after imports/backend start-up (baseline) and its peak RSS (ru_maxrss) after loading. Goal: peak
growth ≤ 1.3x the checkpoint size (the loaded f32 model itself is 1.0x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

from common import REPO, llama_hf_config, machine, run_python, table, today, update_results, write_json

_MAKE = """
import sys, jax.numpy as jnp
from tregjax import models
cfg = models.ModelConfig.from_hf_config(json.loads(sys.argv[2]))
models.save_pretrained(models.from_config(cfg, 0), sys.argv[1], max_shard_size=400 * 2**20)
"""

_LOAD = {
    "tregjax": """
import jax, jax.numpy as jnp
from tregjax import models
jax.devices(); jnp.zeros(1).block_until_ready()
base = rss()
t0 = time.time()
m = models.from_pretrained(path, dtype=jnp.float32, param_dtype=jnp.float32)
jax.block_until_ready(jax.tree.leaves(m))
""",
    "transformers": """
import torch, transformers
base = rss()
t0 = time.time()
m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
with torch.no_grad():  # transformers maps safetensors lazily: touch every weight so it is really resident
  float(sum(p.float().sum() for p in m.parameters()))
""",
}

_PRELUDE = """
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
path = sys.argv[1]
def rss():
  with open(f"/proc/{{os.getpid()}}/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
"""
_EPILOGUE = """
load_s = time.time() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT" + json.dumps({"baseline_mib": base, "peak_mib": peak, "after_mib": rss(), "load_s": load_s}))
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--keep", default="", help="write/reuse the checkpoint here instead of a temp dir")
  parser.add_argument("--skip-transformers", action="store_true")
  args = parser.parse_args()

  hf_config = llama_hf_config(args.layers, args.width, args.vocab)
  path = args.keep or tempfile.mkdtemp(prefix="tregjax-rss-")
  if not os.path.exists(os.path.join(path, "config.json")):
    run_python(_PRELUDE.format(repo=str(REPO)) + _MAKE, path, json.dumps(hf_config))
  size_mib = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20
  results = {"date": today(), "device": machine(), "args": vars(args), "checkpoint_mib": size_mib}
  loaders = ["tregjax"] + ([] if args.skip_transformers else ["transformers"])
  for name in loaders:
    results[name] = run_python(_PRELUDE.format(repo=str(REPO)) + _LOAD[name] + _EPILOGUE, path)
  if not args.keep:
    shutil.rmtree(path)
  rows = []
  for name in loaders:
    r = results[name]
    growth = r["peak_mib"] - r["baseline_mib"]
    rows.append([name, f"{r['load_s']:.1f}", f"{r['baseline_mib']:.0f}", f"{r['peak_mib']:.0f}", f"{growth:.0f}",
                 f"{growth / size_mib:.2f}x", f"{r['peak_mib'] / size_mib:.2f}x"])
  text = table(["loader", "load s", "baseline RSS MiB", "peak RSS MiB", "peak - baseline MiB",
                "(peak - baseline) / checkpoint", "peak / checkpoint"], rows)
  desc = f"random f32 Llama, {args.layers} layers, width {args.width}, vocab {args.vocab}: {size_mib:.0f} MiB"
  print(desc)
  print(text)
  print(f"wrote {write_json('model_load_rss', results)}")
  cmd = f"python bench/model_load_rss.py --layers {args.layers} --width {args.width} --vocab {args.vocab}"
  update_results("model_load_rss", (
      f"### Peak host RSS while loading a checkpoint ({desc} in 3 safetensors shards)\n\n`{cmd}` ({today()}, "
      f"{machine()}; each loader in a fresh subprocess; baseline = RSS after imports and backend start-up; peak = "
      f"ru_maxrss; transformers' weights are touched after loading because it maps them lazily from the "
      f"files).\n\n{text}\n"))


if __name__ == "__main__":
  main()
