"""DPO vs DPO-REG training step: time, tokens/s and MFU of the trainer's own jitted step, measured in one run.

    python bench/train_step_mfu.py                                   # CPU: tiny Llama, f32 (the overhead ratio)
    python bench/train_step_mfu.py --preset llama3p2_1b --pairs 4 --seq 2048 --dtype bfloat16 --remat full   # GPU

The step is the one `tregjax.training.run` takes (`trainer.build`: optimizer, sharded TrainState, chunked logps,
`preference_objective`, donation), on synthetic pairs; only the policy runs (reference log-probs and token rewards are
cached inputs). T-REG's regulariser is the extra term α·w·(L_REG(y_w)+L_REG(y_l)) over per-token log-probs the DPO
loss already needs, so its cost should be a few elementwise ops. MFU counts 6·N_matmul + 12·L·H·Dh·T FLOPs per token
(PaLM appendix B; `tregjax.training.metrics.train_flops_per_token`) over all 2·B·T tokens of chosen and rejected rows.
The step comes from `train_bench_util.trainer_step` (the trainer's own construction). Writes
bench/out/train_step_mfu.json.
"""

import argparse
import json
import statistics
import time

import smollm2_common as sc
import train_bench_util as tb

VARIANTS = {"dpo": dict(loss="dpo", regularizer="none"), "dpo_reg": dict(loss="dpo", regularizer="treg"),
            "simpo": dict(loss="simpo", regularizer="none"), "simpo_reg": dict(loss="simpo", regularizer="treg"),
            "tgdpo": dict(loss="tgdpo", regularizer="none")}


def step_config(args: argparse.Namespace, variant: str):
  """The trainer config of one variant: FSDP over every local device, one length bucket of `args.seq`."""
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.model.preset = args.preset
  config.model.overrides.update(json.loads(args.overrides))
  config.model.dtype = args.dtype
  config.model.remat = args.remat
  config.model.scan_layers = not args.unrolled
  config.loss.update(VARIANTS[variant])
  config.data.batch_size = args.pairs
  config.data.max_length = args.seq
  config.data.buckets = (args.seq,)
  config.train.logits_chunk_size = args.chunk
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
  return config


def add_step_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", default="tiny_llama")
  parser.add_argument("--overrides", default="{}", help="JSON dict of ModelConfig overrides")
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--chunk", type=int, default=512)
  parser.add_argument("--unrolled", action="store_true", help="config.model.scan_layers=False")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_step_args(parser)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--variants", default="dpo,dpo_reg")
  args = parser.parse_args()

  import jax
  from tregjax.training import metrics as metrics_lib
  from tregjax.training import trainer

  rows = []
  for name in args.variants.split(","):
    config = step_config(args, name)
    cfg = trainer.model_config(config)
    prompt = args.seq // 4
    batch = tb.preference_batch(args.pairs, prompt, args.seq - prompt - 1, cfg.vocab_size)
    step, state, place, _ = tb.trainer_step(config)
    placed = place(batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, placed).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, placed)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, m = compiled(state, placed)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    tokens = 2 * args.pairs * args.seq
    flops = metrics_lib.train_flops_per_token(cfg, args.seq) * tokens
    peak = metrics_lib.peak_flops_per_device()
    mem = compiled.memory_analysis()
    rows.append(dict(variant=name, step_s=seconds, tokens_per_s=tokens / seconds, tflops_per_s=flops / seconds / 1e12,
                     mfu=(flops / seconds / (peak * jax.device_count())) if peak else None, compile_s=compile_s,
                     temp_mib=mem.temp_size_in_bytes / 2**20 if mem else None, loss=float(m["loss/total"])))
    del state, compiled, step

  device = jax.devices()[0].device_kind
  print(f"{args.preset} {args.overrides} pairs={args.pairs} seq={args.seq} dtype={args.dtype} remat={args.remat} "
        f"devices={jax.device_count()}x {device}")
  print(f"{'variant':<10} {'step s':>9} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>7} {'vs first':>9} {'temp MiB':>9}")
  for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
    print(f"{r['variant']:<10} {r['step_s']:>9.4f} {r['tokens_per_s']:>11.0f} {r['tflops_per_s']:>9.2f} {mfu:>7} "
          f"{r['step_s'] / rows[0]['step_s']:>9.3f} {r['temp_mib']:>9.1f}")
  sc.write_json("train_step_mfu", dict(args=vars(args), device=device, rows=rows, date=sc.today()))


if __name__ == "__main__":
  main()
