"""DPO vs DPO-REG training step: time, tokens/s and MFU of the trainer's own jitted step, measured in one run.

    python bench/train_step_mfu.py                                   # CPU: tiny Llama, f32 (the overhead ratio)
    python bench/train_step_mfu.py --preset llama3p2_1b --pairs 4 --seq 2048 --dtype bfloat16 --remat full   # GPU

The step is built exactly as `tregjax.training.run` builds it (optimizer, sharded TrainState, chunked log-probs,
`preference_objective`, donation), on synthetic pairs; only the policy runs (reference log-probs and token rewards are
cached inputs). T-REG's regulariser is the extra term α·w·(L_REG(y_w)+L_REG(y_l)) over per-token log-probs the DPO
loss already needs, so its cost should be a few elementwise ops. MFU counts 6·N_matmul + 12·L·H·Dh·T FLOPs per token
(PaLM appendix B; `tregjax.training.metrics.train_flops_per_token`) over all 2·B·T tokens of chosen and rejected rows.
Writes bench/out/train_step_mfu.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="tiny_llama")
  parser.add_argument("--overrides", default="{}", help="JSON dict of ModelConfig overrides")
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--chunk", type=int, default=512)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--variants", default="dpo,dpo_reg")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from tregjax import parallel
  from tregjax.data.batch import PreferenceBatch, SequenceBatch
  from tregjax.training import config as config_lib
  from tregjax.training import metrics as metrics_lib
  from tregjax.training import optimizer as optimizer_lib
  from tregjax.training import step as step_lib
  from tregjax.training import trainer

  variants = {"dpo": dict(loss="dpo", regularizer="none"), "dpo_reg": dict(loss="dpo", regularizer="treg"),
              "simpo": dict(loss="simpo", regularizer="none"), "simpo_reg": dict(loss="simpo", regularizer="treg"),
              "tgdpo": dict(loss="tgdpo", regularizer="none")}
  mesh = parallel.make_mesh(1, -1, 1)  # FSDP over every local device
  b, t = args.pairs, args.seq
  rng = np.random.default_rng(0)

  def side():
    tokens = rng.integers(3, 1000, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[:, t // 4:t - 1] = 1.0
    return SequenceBatch(tokens=tokens, labels=np.roll(tokens, -1, 1), loss_mask=mask,
                         segment_ids=np.ones((b, t), np.int32), positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)))

  chosen, rejected = side(), side()
  batch = PreferenceBatch(chosen=chosen, rejected=rejected, ref_chosen_logps=np.full(b, -200.0, np.float32),
                          ref_rejected_logps=np.full(b, -210.0, np.float32),
                          ref_chosen_token_logps=-np.ones((b, t), np.float32) * chosen.loss_mask,
                          ref_rejected_token_logps=-np.ones((b, t), np.float32) * rejected.loss_mask,
                          chosen_token_rewards=rng.uniform(-.5, .5, (b, t)).astype(np.float32) * chosen.loss_mask,
                          rejected_token_rewards=rng.uniform(-.5, .5, (b, t)).astype(np.float32) * rejected.loss_mask)
  placed = jax.tree.map(lambda x: jax.device_put(x, parallel.batch_sharding(mesh, np.ndim(x))), batch)

  rows = []
  for name in args.variants.split(","):
    config = config_lib.base_config()
    config.model.preset = args.preset
    config.model.overrides.update(json.loads(args.overrides))
    config.model.dtype = args.dtype
    config.model.remat = args.remat
    config.loss.update(variants[name])
    config.train.logits_chunk_size = args.chunk
    graphdef, params, extra = trainer.build_model_state(config, mesh)
    cfg = trainer.model_config(config)
    tx, schedule = optimizer_lib.make_optimizer(config.optimizer, 1000, params)
    init_fn = lambda p, e: step_lib.init_state(p, e, tx, 0)
    state_sh = step_lib.state_shardings(jax.eval_shape(init_fn, params, extra), tx, mesh)
    state = jax.jit(init_fn, out_shardings=state_sh)(params, extra)
    loss_fn = step_lib.make_loss_fn("preference", config_lib.objective_options(config), args.chunk)
    step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, loss_fn, 1, mesh),
                   in_shardings=(state_sh, None), out_shardings=(state_sh, None), donate_argnums=0)
    with parallel.use_mesh(mesh):
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
    tokens = 2 * b * t
    flops = metrics_lib.train_flops_per_token(cfg, t) * tokens
    peak = metrics_lib.peak_flops_per_device()
    mem = compiled.memory_analysis()
    rows.append(dict(variant=name, step_s=seconds, tokens_per_s=tokens / seconds, tflops_per_s=flops / seconds / 1e12,
                     mfu=(flops / seconds / (peak * jax.device_count())) if peak else None, compile_s=compile_s,
                     temp_mib=mem.temp_size_in_bytes / 2**20 if mem else None, loss=float(m["loss/total"])))
    del state, compiled, step

  device = jax.devices()[0].device_kind
  print(f"{args.preset} {args.overrides} pairs={b} seq={t} dtype={args.dtype} remat={args.remat} "
        f"devices={jax.device_count()}x {device}")
  print(f"{'variant':<10} {'step s':>9} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>7} {'vs first':>9} {'temp MiB':>9}")
  for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
    print(f"{r['variant']:<10} {r['step_s']:>9.4f} {r['tokens_per_s']:>11.0f} {r['tflops_per_s']:>9.2f} {mfu:>7} "
          f"{r['step_s'] / rows[0]['step_s']:>9.3f} {r['temp_mib']:>9.1f}")
  os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
  with open(os.path.join(ROOT, "bench", "out", "train_step_mfu.json"), "w") as f:
    json.dump(dict(args=vars(args), device=device, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
