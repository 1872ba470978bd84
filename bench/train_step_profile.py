"""Where the trainer's step spends its time: device time per op category, from a profiler trace of the real step.

    python bench/train_step_profile.py                     # CPU: tiny Llama, f32
    python bench/train_step_profile.py --preset llama3p2_1b --pairs 8 --seq 2048 --dtype bfloat16 \
        --remat dots --chunk 512   # GPU

The step and its arguments are those of bench/train_step.py (one variant: `--variant`, `--loop`). Runs `--steps` steps
under `jax.profiler.trace`, maps every traced op (the `hlo_op` of each trace event) to its instruction in the compiled
module, and sums time per category: matmul (dots, GEMM custom calls, fusions around a dot), attention kernel (fused-attention custom calls),
reductions (fusions holding a reduce: log-softmax, norms, softmax), copies/transposes (fusions whose result is a
layout change), scan buffers (dynamic slices and updates, zero-filled stacks), collectives, other fusions.
Control-flow ops (while, conditional, call) are left out: their bodies' ops are traced on their own. The matmul row
also gives the dots' own FLOP/s (FLOPs from the HLO dot shapes), so the gap between matmul efficiency and the step's
MFU (bench/train_step.py) is visible. On CPU several ops run at once on the thread pool, so shares are of summed
op time, not of wall time.
A second table splits the same time by phase, read from each instruction's `op_name` metadata: jax names the
backward's ops `transpose(jvp(...))` and the forward's `jvp(...)`; the rest (AdamW, the skip logic) is "update".
Writes bench/out/train_step_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import re
import tempfile

import common
import train_step

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?(?:\{[^}]*\})?) ([\w\-$]+)\((.*)$")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_CONTROL = ("while", "conditional", "call")


def parse_module(text: str) -> tuple[dict, dict]:
  """({instruction name: (shape, opcode, rest of line, computation)}, {computation: [its instruction names]})."""
  instructions, computations, current = {}, collections.defaultdict(list), None  # a computation's root comes last
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      continue
    m = _INSTRUCTION.match(line)
    if m and current:
      instructions[m.group(1)] = (m.group(2), m.group(3), m.group(4), current)
      if line.lstrip().startswith("ROOT "):
        computations[current + " ROOT"] = [m.group(1)]
      computations[current].append(m.group(1))
  return instructions, computations


def _dims(shape: str) -> list[int]:
  m = _SHAPE.search(shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def phase(name: str, instructions: dict) -> str:
  """forward | backward | update, from the instruction's op_name (jax's autodiff names)."""
  m = re.search(r'op_name="([^"]*)"', instructions[name][2])
  op_name = m.group(1) if m else ""
  if "transpose(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "update"


def dot_flops(name: str, instructions: dict) -> float:
  """2 · |output| · |contracted dims of the lhs| for a dot instruction."""
  shape, _, rest, _ = instructions[name]
  lhs = rest.split(",")[0].strip().lstrip("%").rstrip(")")
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
  lhs_dims = _dims(instructions[lhs][0]) if lhs in instructions else []
  k = math.prod(lhs_dims[int(i)] for i in contracting.group(1).split(",") if i) if contracting and lhs_dims else 0
  return 2.0 * math.prod(_dims(shape)) * k


def classify(name: str, instructions: dict, computations: dict) -> tuple[str | None, float]:
  """(category or None for control flow, matmul FLOPs of one execution) of a top-level instruction."""
  _, opcode, rest, _ = instructions[name]
  base = opcode.removesuffix("-start").removesuffix("-done")
  if base in _CONTROL:
    return None, 0.0
  if base in _COLLECTIVES:
    return "collectives", 0.0
  body, root = [name], opcode
  called = re.search(r"calls=%?([\w.\-]+)", rest)
  if opcode == "fusion" and called:
    body = computations.get(called.group(1), [])
    root = instructions[computations[called.group(1) + " ROOT"][0]][1]
  ops = [instructions[n][1] for n in body]
  targets = " ".join(instructions[n][2] for n in body if instructions[n][1] == "custom-call").lower()
  if "fmha" in targets or "attention" in targets or "flash" in targets:
    return "attention kernel", 0.0
  flops = sum(dot_flops(n, instructions) for n in body if instructions[n][1] == "dot")
  if flops or "gemm" in targets or "matmul" in targets or "convolution" in ops:
    return "matmul", flops
  if "reduce" in ops or "reduce-window" in ops:
    return "reductions", 0.0
  # A layout change, with any elementwise work XLA fused into it (XLA names a fusion after its root ops).
  if root in ("copy", "transpose") or re.match(r"(loop_)?(copy|transpose)", name):
    return "copies / transposes", 0.0
  if any(op in ("dynamic-slice", "dynamic-update-slice") for op in ops) or name.startswith("wrapped_broadcast"):
    return "scan buffers", 0.0
  return "other fusions", 0.0


def trace_op_times(trace_dir: str, module_ops: set) -> tuple[collections.Counter, collections.Counter]:
  """(summed microseconds, executions) per HLO op name over the trace's events that name an op of the module."""
  path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  times, counts = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    op = (e.get("args") or {}).get("hlo_op", e.get("name"))
    if op in module_ops:
      times[op] += e["dur"]
      counts[op] += 1
  return times, counts


def main() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  train_step.add_step_args(parser)
  parser.add_argument("--variant", default="dpo_reg", choices=sorted(train_step.VARIANTS))
  parser.add_argument("--loop", default="scan", choices=["scan", "unrolled"], help="model.scan_layers")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--section", default="", help="bench/RESULTS.md section (default train_step_profile_<backend>)")
  args = parser.parse_args()

  from tregjax.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from tregjax.training import model_init  # pylint: disable=g-import-not-at-top
  config = train_step.step_config(args, args.variant, args.loop, int(args.layers) if args.layers else None)
  cfg = model_init.model_config(config)
  batch = train_step.step_batch(args, cfg.vocab_size)
  run, compiled, _ = common.compiled_runner(config, batch)
  instructions, computations = parse_module(compiled.as_text())
  for _ in range(2):  # the first steps after compiling run slower (allocation, thread-pool start)
    run()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      wall, walls = common.timed(run, args.steps)
    times, counts = trace_op_times(trace_dir, set(instructions))

  per_category, matmul_flops = collections.Counter(), 0.0
  per_phase, phase_flops = collections.Counter(), collections.Counter()
  for op, us in times.items():
    category, op_flops = classify(op, instructions, computations)
    if category:
      per_category[category] += us / 1e6 / args.steps
      matmul_flops += op_flops * counts[op] / args.steps
      key = (phase(op, instructions), category)
      per_phase[key] += us / 1e6 / args.steps
      phase_flops[key] += op_flops * counts[op] / args.steps
  total = sum(per_category.values())
  tokens = 2 * args.pairs * args.seq
  model_flops = metrics_lib.train_flops_per_token(cfg, args.seq) * tokens
  rows = []
  for category, seconds in per_category.most_common():
    rate = f"{matmul_flops / seconds / 1e12:.2f}" if category == "matmul" and seconds else ""
    rows.append([category, f"{seconds * 1e3:.1f}", f"{seconds / total:.1%}", rate])
  phase_rows = []
  for name in ("forward", "backward", "update"):
    for category in per_category:
      seconds = per_phase.get((name, category), 0.0)
      if seconds >= 0.005 * total:
        flops = phase_flops.get((name, category), 0.0)
        rate = f"{flops / seconds / 1e9:.0f}" if flops else ""
        phase_rows.append([name, category, f"{seconds * 1e3:.1f}", f"{seconds / total:.1%}",
                           f"{flops / 1e9:.1f}" if flops else "", rate])
  device = jax.devices()[0].device_kind
  section = args.section or f"train_step_profile_{jax.default_backend()}"
  model = args.preset + (" with the overrides below" if args.overrides != "{}" else "")
  md = (f"### Where the training step's time goes ({args.variant}, {model}, {args.dtype}, {device})\n\n"
        f"`python bench/train_step_profile.py {train_step.step_flags(args)} --variant {args.variant} "
        f"--loop {args.loop} --steps {args.steps}" + (f" --section {args.section}" if args.section else "") + "` "
        f"({common.today()}, {common.machine()}). Median wall "
        f"{wall * 1e3:.1f} ms per step; summed op time {total * 1e3:.1f} ms per step; model FLOPs (PaLM formula) "
        f"{model_flops / 1e12:.3f} TFLOP per step, HLO dot FLOPs {matmul_flops / 1e12:.3f} TFLOP.\n\n"
        + common.table(["category", "ms / step", "share of op time", "matmul TFLOP/s"], rows)
        + "\n\nBy phase (rows under 0.5% of op time left out):\n\n"
        + common.table(["phase", "category", "ms / step", "share of op time", "dot GFLOP", "dot GFLOP/s"],
                       phase_rows))
  print(md)
  common.write_json(section, dict(args=vars(args), device=device, wall_s=walls, categories=per_category,
                                  phases={f"{k[0]}/{k[1]}": v for k, v in per_phase.items()},
                                  phase_flops={f"{k[0]}/{k[1]}": v for k, v in phase_flops.items()},
                                  matmul_flops=matmul_flops, model_flops=model_flops, date=common.today()))
  common.update_results(section, md)


if __name__ == "__main__":
  main()
