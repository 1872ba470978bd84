"""Peak host RSS of `tregjax.export` (kernel counter: /proc/self/status VmHWM) per byte it writes, in one run:

  all at once      every parameter restored at once (the export before streaming);
  before           streamed one leaf at a time from a checkpoint stored one chunk per leaf (as checkpoints were
                   written before per-layer chunks: a stacked [L, ...] leaf is read whole), glibc's default
                   (dynamic) mmap threshold: the export before this change;
  now, old layout  today's export on that checkpoint (its fallback: such leaves are read whole);
  glibc default    today's export on a checkpoint as the trainer writes it now, without `map_large_blocks`;
  Orbax context    the same with tensorstore's context as Orbax sets it (128 I/O threads, a 100 MB OCDBT cache,
                   decode threads = cores) instead of the export's (no cache, one decode thread);
  now              a checkpoint as the trainer writes it now (`checkpoint.save_args`: one layer per chunk, chunks
                   of at most 16 MiB), each stacked leaf read one layer at a time, blocks of 1 MiB and more
                   mapped and unmapped (`host_memory.map_large_blocks`).

Two synthetic run directories (random-init Llama of `--layers` x `--width`, vocab 32000; float32 params + both
Adam moments in an Orbax checkpoint, as the trainer writes them; the same values, chunked the old and the new way)
are exported to bfloat16, each variant in its own fresh process; every output must be byte-identical. Baseline =
VmRSS after every import the export does (jax, orbax, tensorstore, transformers) and the backend's start-up;
"before the first tensor" = VmRSS when the model is assembled from the checkpoint's metadata, before any tensor is
written (all at once: every parameter already read).

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
import orbax.checkpoint as ocp
from tregjax.training import checkpoint as ckpt_lib
import train_common as tc
if sys.argv[4] == "leaf":  # the layout before per-layer chunks: Orbax's defaults, one chunk per leaf
  ckpt_lib.save_args = lambda state: None
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
if variant == "at_once":  # every parameter restored at once (the restore before streaming)
  eager = ckpt_lib.Checkpointer.restore_params
  ckpt_lib.Checkpointer.restore_params = lambda self, step, target, dtype=None, streamed=False: eager(
      self, step, target, dtype)
if variant in ("before", "glibc_default"):  # glibc's dynamic mmap threshold, as before this change
  from tregjax import host_memory
  host_memory.map_large_blocks = lambda *a: None
if variant == "orbax_context":
  from orbax.checkpoint._src.serialization import tensorstore_utils
  init = ckpt_lib._ArrayReader.__init__
  def orbax_context(self, *a, **k):
    init(self, *a, **k)
    self._context = tensorstore_utils.get_ts_context(use_ocdbt=True)
  ckpt_lib._ArrayReader.__init__ = orbax_context
loaded = {}
load_model = training.load_model
def load_and_measure(*a, **k):
  out = load_model(*a, **k)
  loaded["rss"] = status("VmRSS")
  return out
training.load_model = load_and_measure
base = status("VmRSS")
t0 = time.perf_counter()
export.export(workdir, out, dtype="bfloat16")
seconds = time.perf_counter() - t0
written = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".safetensors"))
print("RESULT " + json.dumps({"baseline": base, "loaded": loaded["rss"], "peak": status("VmHWM"), "written": written,
                              "seconds": seconds}))
"""

VARIANTS = (("at_once", "new", "all at once (before streaming)"),
            ("before", "leaf", "before: leaf by leaf, one chunk per leaf, glibc's default mmap threshold"),
            ("leaf", "leaf", "now, on a checkpoint of one chunk per leaf (read whole)"),
            ("glibc_default", "new", "layer by layer, glibc's default mmap threshold"),
            ("orbax_context", "new", "layer by layer, Orbax's tensorstore context"),
            ("layer", "new", "now: layer by layer (per-layer chunks)"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--keep", action="store_true", help="keep the temporary run directories")
  args = parser.parse_args()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(common.REPO))
  root = tempfile.mkdtemp(prefix="export_memory-")
  try:
    built = {}
    for layout in ("new", "leaf"):
      built[layout] = common.run_python(BUILD, os.path.join(root, layout), str(args.layers), str(args.width), layout,
                                        env=env)
    results = {}
    for variant, layout, _ in VARIANTS:
      results[variant] = common.run_python(MEASURE, os.path.join(root, layout), os.path.join(root, variant), variant,
                                           env=env)
      print(variant, results[variant], flush=True)
    first = os.path.join(root, VARIANTS[0][0])
    for variant, *_ in VARIANTS[1:]:
      if not all(filecmp.cmp(os.path.join(first, n), os.path.join(root, variant, n), shallow=False)
                 for n in os.listdir(first)):
        raise SystemExit(f"the exports differ: {VARIANTS[0][0]} vs {variant}")
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
  rows = []
  for variant, _, label in VARIANTS:
    r = results[variant]
    rows.append([label, mb(r["written"]), mb(r["baseline"]), mb(r["loaded"]), mb(r["peak"]),
                 mb(r["peak"] - r["baseline"]), f"{r['peak'] / r['written']:.2f}",
                 f"{(r['peak'] - r['baseline']) / r['written']:.2f}", f"{r['seconds']:.1f}"])
  inc = {v: results[v]["peak"] - results[v]["baseline"] for v, *_ in VARIANTS}
  now = results["layer"]
  ratio = lambda v: f"{inc[v] / inc['layer']:.1f}x"  # noqa: E731
  cmd = f"python bench/export_memory.py --layers {args.layers} --width {args.width}"
  md = (f"### Export peak host RSS per byte written (#26)\n\n`{cmd}` ({common.today()}, {common.machine()}; each "
        f"variant a fresh process; run under /work/wt/cpu-exclusive). A random-init Llama of {args.layers} layers x "
        f"width {args.width}, vocab 32000 ({built['new']['params'] / 1e6:.0f}M parameters; float32 params + two Adam "
        "moments in the Orbax checkpoint), exported to bfloat16. Peak = VmHWM (the kernel's high-water mark of the "
        "whole process, interpreter included); baseline = VmRSS after the export's imports (jax, orbax, "
        "tensorstore, transformers) and the CPU backend's start-up; model assembled = VmRSS when the model is "
        "assembled from the checkpoint's metadata, before the first tensor is written. The six outputs are "
        "byte-identical.\n\n"
        + common.table(["export", "written MiB", "baseline MiB", "model assembled MiB", "peak MiB",
                        "peak - baseline MiB", "peak / written", "(peak - baseline) / written", "s"], rows)
        + f"\n\nIncrement over the baseline, each against now: all at once {ratio('at_once')}, before "
        f"{ratio('before')}, now on the old layout {ratio('leaf')}, glibc's default threshold "
        f"{ratio('glibc_default')}, Orbax's context {ratio('orbax_context')}. Now, the whole process peaks at "
        f"{now['peak'] / now['written']:.2f}x the bytes written (the issue's bound: 1.5x).\n\n"
        "Where the memory goes: the baseline is the imports (jax, orbax, tensorstore, transformers, the trainer's "
        f"modules); assembling the model from the checkpoint's metadata adds {mb(now['loaded'] - now['baseline'])} MiB "
        "(an earlier note of a fixed ~230 MiB export cost was these imports). The rest of the increment is the largest "
        "single tensor, the untied lm_head (32000 x 1024: 62.5 MiB in bfloat16), read whole, cast as read, then "
        "transposed to HF's layout (two copies), plus the 16 MiB chunk being decoded; the stacked layers, read one "
        "layer at a time, are far smaller (one layer's MLP weight: 8 MiB in bfloat16). 'before' reads the old layout through today's tensorstore reader (the "
        "export before this change went through Orbax's partial restore of each leaf: it measured 605 MiB peak, "
        "1.69x, on this model, 2026-12-07 17:05 UTC); its extra increment over 'now, on a checkpoint of one chunk per "
        "leaf' is glibc's dynamic mmap threshold keeping freed tensor-sized blocks in RSS.\n")
  common.update_results("export_memory", md)
  print(md)


if __name__ == "__main__":
  sys.exit(main())
