"""Peak host RSS of `tregjax.export` (kernel counter: /proc/self/status VmHWM) per byte it writes: every parameter
restored at once (before) vs streamed leaf by leaf (now, `Checkpointer.restore_params(streamed=True)`), in one run.

A synthetic run directory (random-init Llama of `--layers` x `--width`, vocab 32000; float32 params + both Adam
moments in an Orbax checkpoint, as the trainer writes them) is exported to bfloat16 by each variant in its own fresh
process; the two outputs must be byte-identical. Baseline = VmRSS after every import the export does (jax, orbax,
tensorstore, transformers) and the backend's start-up.

  python bench/export_memory.py --layers 8 --width 1024
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile

import common

BUILD = r"""
import json, sys
sys.path.insert(0, "tests")
import train_common as tc
print("RESULT " + json.dumps({"params": tc.synthetic_run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))}))
"""

MEASURE = r"""
import json, os, sys, time
def status(key):
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
from tregjax import export, models, storage, training
from tregjax.training import checkpoint as ckpt_lib
import jax, jax.numpy as jnp, orbax.checkpoint, tensorstore, transformers, safetensors
jnp.zeros(1).block_until_ready()
workdir, out, variant = sys.argv[1:4]
if variant == "before":  # every parameter restored at once (the restore before streaming)
  eager = ckpt_lib.Checkpointer.restore_params
  ckpt_lib.Checkpointer.restore_params = lambda self, step, target, dtype=None, streamed=False: eager(
      self, step, target, dtype)
base = status("VmRSS")
t0 = time.perf_counter()
export.export(workdir, out, dtype="bfloat16")
seconds = time.perf_counter() - t0
written = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".safetensors"))
print("RESULT " + json.dumps({"baseline": base, "peak": status("VmHWM"), "written": written, "seconds": seconds}))
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--keep", action="store_true", help="keep the temporary run directory")
  args = parser.parse_args()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(common.REPO))
  root = tempfile.mkdtemp(prefix="export_memory-")
  try:
    workdir = os.path.join(root, "run")
    built = common.run_python(BUILD, workdir, str(args.layers), str(args.width), env=env)
    results = {}
    for variant in ("before", "streamed"):
      results[variant] = common.run_python(MEASURE, workdir, os.path.join(root, variant), variant, env=env)
      print(variant, results[variant], flush=True)
    same = all(filecmp.cmp(os.path.join(root, "before", n), os.path.join(root, "streamed", n), shallow=False)
               for n in os.listdir(os.path.join(root, "before")))
    if not same:
      raise SystemExit("the two exports differ")
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
  rows = []
  for variant, label in (("before", "before: every parameter restored at once"),
                         ("streamed", "now: streamed, one leaf at a time")):
    r = results[variant]
    rows.append([label, mb(r["written"]), mb(r["baseline"]), mb(r["peak"]), mb(r["peak"] - r["baseline"]),
                 f"{r['peak'] / r['written']:.2f}", f"{(r['peak'] - r['baseline']) / r['written']:.2f}",
                 f"{r['seconds']:.1f}"])
  before, now = results["before"], results["streamed"]
  cmd = f"python bench/export_memory.py --layers {args.layers} --width {args.width}"
  md = (f"### Export peak host RSS per byte written (#26)\n\n`{cmd}` ({common.today()}, {common.machine()}; each "
        f"variant a fresh process; run under /work/wt/cpu-exclusive). A random-init Llama of {args.layers} layers x "
        f"width {args.width}, vocab 32000 ({built['params'] / 1e6:.0f}M parameters; float32 params + two Adam "
        "moments in the Orbax checkpoint), exported to bfloat16. Peak = VmHWM (the kernel's high-water mark of the "
        "whole process, interpreter included); baseline = VmRSS after the export's imports (jax, orbax, "
        "tensorstore, transformers) and the CPU backend's start-up. The two outputs are byte-identical.\n\n"
        + common.table(["export", "written MiB", "baseline MiB", "peak MiB", "peak - baseline MiB",
                        "peak / written", "(peak - baseline) / written", "s"], rows)
        + f"\n\nThe cause before: Orbax restores every leaf concurrently, and tensorstore decodes each float32 chunk "
        "before the cast, so all of the model's float32 bytes were alive at once. Streamed, one leaf is read (and "
        "cast) when the safetensors writer reaches it, and dropped before the next is read: the increment is one "
        f"leaf as stored (compressed and decoded, one chunk per leaf for a 1-device checkpoint) plus its cast: "
        f"{(before['peak'] - before['baseline']) / (now['peak'] - now['baseline']):.1f}x less than before. The "
        "interpreter's baseline is a fixed cost, so the whole-process ratio falls toward the increment's as the "
        "model grows (a Llama-3-8B's largest leaf, the stacked MLP gate, is 23% of its bf16 bytes; here 18%).\n")
  common.update_results("export_memory", md)
  print(md)


if __name__ == "__main__":
  sys.exit(main())
