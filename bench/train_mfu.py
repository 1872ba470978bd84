"""MFU of a DPO-REG training step on a ~1B Llama (Llama-3.2-1B shapes) at sequence 2048, bf16, FSDP over local devices.

    python bench/train_mfu.py                       # on a GPU/TPU host: Llama-3.2-1B shapes, T=2048
    python bench/train_mfu.py --smoke               # CPU check that it runs: 2 layers, width 256, T=256

MFU = model FLOPs per step / step time / (peak bf16 FLOP/s per device × devices), with model FLOPs per token from
`tregjax.training.metrics.train_flops_per_token` (PaLM appendix B: 6·N_matmul + 12·L·n_heads·head_dim·T; forward +
backward, no remat recomputation) times 2·B·T tokens (chosen + rejected rows). Also printed: XLA's own FLOP count of
the compiled step (includes remat recomputation and the optimizer, so it is ≥ the model FLOPs). Goal ≥ 55% on H100.
"""

from __future__ import annotations

import argparse
import statistics
import time

import smollm2_common as sc
import train_bench_util as tb


def make_config(a):
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.preset = "llama3p2_1b"
  if a.smoke:
    c.model.overrides = dict(num_layers=2, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2,
                             head_dim=32, vocab_size=4096)
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = a.remat
  c.loss.loss, c.loss.regularizer, c.loss.beta, c.loss.alpha = "dpo", "treg", 0.1, 0.25
  c.data.batch_size = a.pairs_per_device * a.devices * a.accum
  c.optimizer.grad_accum_steps = a.accum
  c.train.logits_chunk_size = a.chunk
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c


def main() -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from tregjax.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from tregjax.training import trainer  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check")
  ap.add_argument("--seq", type=int, default=None, help="T (default 2048, smoke 256)")
  ap.add_argument("--pairs-per-device", type=int, default=2)
  ap.add_argument("--accum", type=int, default=1)
  ap.add_argument("--remat", default="full", choices=["none", "full", "dots"])
  ap.add_argument("--chunk", type=int, default=512, help="log-softmax chunk (positions)")
  ap.add_argument("--steps", type=int, default=10)
  a = ap.parse_args()
  a.devices = jax.device_count()
  seq = a.seq or (256 if a.smoke else 2048)
  config = make_config(a)
  cfg = trainer.model_config(config)
  prompt = seq // 4
  batch = tb.preference_batch(config.data.batch_size, prompt, seq - prompt - 1, cfg.vocab_size)
  step, state, place, mesh = tb.trainer_step(config)
  t0 = time.perf_counter()
  compiled = step.lower(state, place(batch)).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  xla_flops = float((compiled.cost_analysis() or {}).get("flops", float("nan")))
  times = []
  for i in range(a.steps + 2):
    t0 = time.perf_counter()
    state, m = compiled(state, place(batch))
    jax.block_until_ready((state, m))
    if i >= 2:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tokens = 2 * config.data.batch_size * seq
  model_flops = metrics_lib.train_flops_per_token(cfg, seq) * tokens
  peak = metrics_lib.peak_flops_per_device()
  mfu = model_flops / step_s / (peak * a.devices) if peak else float("nan")
  kind = jax.devices()[0].device_kind
  rows = [[kind, a.devices, dict(mesh.shape)["fsdp"], config.data.batch_size, seq, a.remat, f"{step_s:.3f}",
           f"{tokens / step_s:,.0f}", f"{model_flops / 1e12:.2f}", f"{xla_flops / 1e12:.2f}",
           f"{mfu:.1%}" if peak else "n/a (unknown peak)"]]
  md = (f"### MFU of a DPO-REG step, {'SMOKE (tiny shapes)' if a.smoke else 'Llama-3.2-1B shapes'}, bf16, FSDP\n\n"
        f"`python bench/train_mfu.py{' --smoke' if a.smoke else ''} --pairs-per-device {a.pairs_per_device} "
        f"--accum {a.accum} --remat {a.remat} --chunk {a.chunk}` ({sc.today()}, {kind} × {a.devices}); compile "
        f"{compile_s:.1f} s; median of {a.steps} steps; temp memory "
        f"{getattr(mem, 'temp_size_in_bytes', 0) / 2**30:.2f} GiB/device. Model FLOPs = (6·N_matmul + "
        f"12·L·H·d_head·T) × 2·B·T (N_matmul = {metrics_lib.matmul_params(cfg) / 1e9:.3f} B); peak bf16 "
        f"{(peak or 0) / 1e12:.0f} TFLOP/s/device.\n\n"
        + sc.table(["device", "devices", "fsdp", "pairs/step", "T", "remat", "s/step", "tokens/s",
                    "model TFLOP/step", "XLA TFLOP/step", "MFU"], rows)
        + ("\n\nGoal ≥ 55% on H100." if not a.smoke else "\n\n(smoke run: checks the bench runs; MFU not meaningful)"))
  print(md)
  sc.write_json("train_mfu" + ("_smoke" if a.smoke else ""), dict(
      device=kind, devices=a.devices, step_s=times, model_flops=model_flops, xla_flops=xla_flops, mfu=mfu,
      compile_s=compile_s, args=vars(a), seq=seq, date=sc.today()))
  if not a.smoke:
    sc.update_results("train_mfu", md)


if __name__ == "__main__":
  main()
