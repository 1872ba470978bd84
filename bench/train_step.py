"""The trainer's own jitted step under configuration variants: time, tokens/s, MFU, XLA's FLOPs and the ratios
between the variants, measured in one run.

    python bench/train_step.py                                        # CPU: tiny Llama, f32, DPO vs DPO-REG
    python bench/train_step.py --preset llama3p2_1b --pairs 4 --seq 2048 --dtype bfloat16 --remat full   # GPU: MFU
    python bench/train_step.py --interleave --variants dpo,dpo_reg,simpo,simpo_reg --width 256 --layers 4 \\
        --vocab 2048 --chunk 256 --repeats 15 --section train_reg_overhead   # what T-REG's regularizer costs, CPU
    python bench/train_step.py --interleave --variants dpo_reg --loops scan,unrolled --layers 2,4,16 --width 256 \\
        --vocab 2048 --chunk 256 --repeats 10 --section train_layer_loop     # layers under lax.scan vs unrolled, CPU

The step is the one `tregjax.training.run` takes (`trainer.build`: optimizer, sharded TrainState over an FSDP mesh of
every local device, chunked logps, `preference_objective`, donation; `common.compiled_runner`), on synthetic pairs of
`--seq` tokens (a quarter prompt); only the policy runs (reference log-probs and token rewards are cached inputs).
The model is `--preset`, with `--width` (a tiny Llama of that width: MLP 2·width, heads of 32), `--layers` and `--vocab`
replacing its shape when given. Variants: objectives (`--variants`) x layer loops (`--loops`: `model.scan_layers`) x
depths (`--layers`, comma-separated).

Timing: by default one variant at a time, the batch placed once (the step alone; one model in memory: the large-model
MFU runs); with --interleave every variant of a depth is compiled first and all are timed round-robin, each call
placing the batch as the trainer's loop does (on a shared CPU, variants timed a minute apart see different loads).
Median of `--repeats` steps after one warm-up step.

Columns: 'vs no reg' = step time over the same objective without T-REG's regularizer (DPO-REG / DPO), 'vs scan' =
over the same step with the layers under lax.scan. T-REG's regulariser is the extra term α·w·(L_REG(y_w)+L_REG(y_l))
over per-token log-probs the preference loss already needs, so its cost should be a few elementwise ops (goal:
DPO-REG / DPO ≤ 1.03). MFU counts `tregjax.training.metrics.train_flops_per_token` (6·N_matmul + 12·L·H·Dh·T, PaLM
appendix B) over all 2·B·T tokens of chosen and rejected rows, against `metrics.ACCELERATORS`; XLA GFLOP is the
compiled step's own cost analysis (XLA:CPU counts a scanned layer loop's body once). Writes bench/out/<section or
train_step>.json, and the section `--section` of bench/RESULTS.md when given.
"""

from __future__ import annotations

import argparse
import json

import common

VARIANTS = {"dpo": dict(loss="dpo", regularizer="none"), "dpo_reg": dict(loss="dpo", regularizer="treg"),
            "simpo": dict(loss="simpo", regularizer="none", beta=2.0, gamma=1.0),
            "simpo_reg": dict(loss="simpo", regularizer="treg", beta=2.0, gamma=1.0),
            "tgdpo": dict(loss="tgdpo", regularizer="none")}


def add_step_args(parser: argparse.ArgumentParser) -> None:
  """The model, batch and step options shared with bench/train_step_profile.py."""
  parser.add_argument("--preset", default="tiny_llama")
  parser.add_argument("--overrides", default="{}", help="JSON dict of ModelConfig overrides")
  parser.add_argument("--width", type=int, default=0,
                      help="a tiny Llama of this width (MLP 2·width, heads of 32, kv heads of 64); 0: the preset's")
  parser.add_argument("--layers", default="", help="num_layers ('' -> the preset's)")
  parser.add_argument("--vocab", type=int, default=0, help="vocab_size (0 -> the preset's)")
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--chunk", type=int, default=512, help="train.logits_chunk_size")


def step_flags(args: argparse.Namespace) -> str:
  """The `add_step_args` flags that give `args` again (for the command a RESULTS.md section shows)."""
  return (f"--preset {args.preset}" + (f" --overrides '{args.overrides}'" if args.overrides != "{}" else "")
          + (f" --width {args.width}" if args.width else "") + (f" --layers {args.layers}" if args.layers else "")
          + (f" --vocab {args.vocab}" if args.vocab else "")
          + f" --pairs {args.pairs} --seq {args.seq} --dtype {args.dtype} --remat {args.remat} --chunk {args.chunk}")


def step_config(args: argparse.Namespace, variant: str, loop: str = "scan", layers: int | None = None):
  """The trainer config of one variant: FSDP over every local device, one length bucket of `args.seq`."""
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.model.preset = args.preset
  overrides = json.loads(args.overrides)
  if args.width:
    w = args.width
    overrides |= dict(hidden_size=w, intermediate_size=2 * w, num_heads=w // 32, num_kv_heads=max(1, w // 64),
                      head_dim=32, max_position_embeddings=max(512, args.seq))
  if args.vocab:
    overrides["vocab_size"] = args.vocab
  if layers:
    overrides["num_layers"] = layers
  config.model.overrides.update(overrides)
  config.model.dtype = args.dtype
  config.model.remat = args.remat
  config.model.scan_layers = {"scan": True, "unrolled": False}[loop]
  config.loss.update(VARIANTS[variant])
  config.data.batch_size = args.pairs
  config.data.max_length = args.seq
  config.data.buckets = (args.seq,)
  config.train.logits_chunk_size = args.chunk
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
  return config


def step_batch(args: argparse.Namespace, vocab: int):
  prompt = args.seq // 4
  return common.preference_batch(args.pairs, prompt, args.seq - prompt - 1, vocab)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_step_args(parser)
  parser.add_argument("--variants", default="dpo,dpo_reg", help=f"comma-separated: {', '.join(VARIANTS)}")
  parser.add_argument("--loops", default="scan", help="comma-separated layer loops: scan, unrolled")
  parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
  parser.add_argument("--interleave", action="store_true", help="time a depth's variants round-robin")
  parser.add_argument("--section", default="", help="also write this section of bench/RESULTS.md")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  from tregjax.training import metrics  # pylint: disable=g-import-not-at-top
  from tregjax.training import model_init  # pylint: disable=g-import-not-at-top
  from tregjax.training import trainer  # pylint: disable=g-import-not-at-top

  variants, loops = args.variants.split(","), args.loops.split(",")
  peak = metrics.peak_flops_per_device()
  tokens = 2 * args.pairs * args.seq
  rows = []
  for layers in [int(n) for n in args.layers.split(",")] if args.layers else [None]:
    configs = {(v, loop): step_config(args, v, loop, layers) for loop in loops for v in variants}
    cfg = model_init.model_config(next(iter(configs.values())))
    batch = step_batch(args, cfg.vocab_size)
    built, times = {}, {}
    for key, config in configs.items():
      run, compiled, compile_s = common.compiled_runner(config, batch, place_each_step=args.interleave)
      mem = compiled.memory_analysis()
      built[key] = dict(run=run, compile_s=compile_s, xla_flops=common.xla_flops(compiled),
                        temp_mib=mem.temp_size_in_bytes / 2**20 if mem else None)
      if not args.interleave:  # one model in memory at a time
        times[key] = common.timed(run, args.repeats)
        del built[key]["run"], run, compiled
    if args.interleave:
      times = common.timed_interleaved({key: b.pop("run") for key, b in built.items()}, args.repeats)
    flops = metrics.train_flops_per_token(cfg, args.seq) * tokens
    for (v, loop), b in built.items():
      seconds = times[(v, loop)][0]
      rows.append(dict(layers=cfg.num_layers, loop=loop, variant=v, step_s=seconds, all_s=times[(v, loop)][1],
                       tokens_per_s=tokens / seconds, tflops_per_s=flops / seconds / 1e12,
                       mfu=flops / seconds / (peak * jax.device_count()) if peak else None, **b))
    for r in rows[-len(built):]:
      print({k: v for k, v in r.items() if k != "all_s"}, flush=True)

  def counterpart(r, **change):
    key = (r["layers"], r["loop"], r["variant"]) if not change else (
        r["layers"], change.get("loop", r["loop"]), change.get("variant", r["variant"]))
    return next((o for o in rows if (o["layers"], o["loop"], o["variant"]) == key), None)

  def ratio(r, field, fmt, **change):
    base = counterpart(r, **change)
    return fmt.format(r[field] / base[field]) if base is not None and base is not r else ""

  device = jax.devices()[0].device_kind
  out = []
  for r in rows:
    no_reg = dict(variant=r["variant"].removesuffix("_reg"))
    out.append([r["layers"], r["loop"], r["variant"], f"{r['step_s'] * 1e3:.1f}",
                ratio(r, "step_s", "{:.3f}", **no_reg), ratio(r, "step_s", "{:.3f}", loop="scan"),
                f"{r['tokens_per_s']:,.0f}", f"{r['tflops_per_s']:.3f}",
                f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a", f"{r['xla_flops'] / 1e9:.3f}",
                ratio(r, "xla_flops", "{:.4f}", **no_reg), f"{r['compile_s']:.1f}",
                f"{r['temp_mib']:.1f}" if r["temp_mib"] is not None else "n/a"])
  text = common.table(["layers", "layer loop", "objective", "ms / step", "vs no reg", "vs scan", "tokens/s",
                       "model TFLOP/s", "MFU", "XLA GFLOP / step", "XLA FLOPs vs no reg", "compile s", "temp MiB"], out)
  goals = []
  for base, label in (("dpo", "DPO"), ("simpo", "SimPO")):
    for r in rows:
      reg = counterpart(r, variant=base + "_reg")
      if r["variant"] == base and reg is not None:
        q = reg["step_s"] / r["step_s"]
        goals.append(f"{label}-REG / {label} ({r['layers']} layers, {r['loop']}): {q:.3f}"
                     + (f" (goal ≤ 1.03: {'met' if q <= 1.03 else 'NOT met'})" if base == "dpo" else ""))
  cmd = (f"python bench/train_step.py {step_flags(args)} --variants {args.variants} --loops {args.loops} "
         f"--repeats {args.repeats}" + (" --interleave" if args.interleave else "")
         + (f" --section {args.section}" if args.section else ""))
  md = (f"### The trainer's step: {args.variants} x {args.loops} layer loop ({args.preset}, {args.dtype}, {device})\n\n"
        f"`{cmd}` ({common.today()}, {common.machine()}, {jax.device_count()}x {device}). The trainer's jitted step "
        f"(AdamW, chunked log-probs), {args.pairs} pairs × T={args.seq}; median of {args.repeats} steps"
        + (", variants timed round-robin" if args.interleave else ", one variant at a time")
        + "; XLA GFLOP from XLA's cost analysis of each compiled step; compile = XLA compile of the step.\n\n"
        + text + ("\n\n" + "; ".join(goals) + "." if goals else ""))
  print(md)
  common.write_json(args.section or "train_step", dict(args=vars(args), device=device, rows=rows, date=common.today(),
                                                       machine=common.machine()))
  if args.section:
    common.update_results(args.section, md)


if __name__ == "__main__":
  main()
