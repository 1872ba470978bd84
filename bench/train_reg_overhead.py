"""What the T-REG regularizer costs per training step: DPO-REG vs DPO and SimPO-REG vs SimPO, same model and batch.

    python bench/train_reg_overhead.py [--repeats 15] [--batch 8] [--seq 256] [--width 256] [--layers 4]

The token rewards come from the scored cache, so the regularizer adds only elementwise work on [B, T] arrays that
the preference loss already has (the policy's per-token log-probs). Measured two ways in one run: wall time of the
trainer's jitted step (interleaved round-robin, median), and XLA's own FLOP count of each compiled step
(`compiled.cost_analysis()`, deterministic). Goal: step time ratio ≤ 1.03.
"""

from __future__ import annotations

import argparse

import smollm2_common as sc
import train_bench_util as tb


def config_for(loss: str, regularizer: str, a):
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.preset = "tiny_llama"
  c.model.overrides = dict(vocab_size=a.vocab, hidden_size=a.width, intermediate_size=a.width * 2,
                           num_layers=a.layers, num_heads=a.width // 32, num_kv_heads=max(1, a.width // 64),
                           head_dim=32, max_position_embeddings=max(512, a.seq))
  c.model.dtype = "float32"
  c.data.batch_size = a.batch
  c.loss.loss, c.loss.regularizer = loss, regularizer
  c.loss.beta, c.loss.gamma = (0.1, 0.5) if loss == "dpo" else (2.0, 1.0)
  c.train.logits_chunk_size = min(a.seq, 256)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  return c


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=2048)
  a = ap.parse_args()
  prompt = a.seq // 4
  batch = tb.preference_batch(a.batch, prompt, a.seq - prompt - 1, a.vocab)
  variants = {"dpo": ("dpo", "none"), "dpo_reg": ("dpo", "treg"), "simpo": ("simpo", "none"),
              "simpo_reg": ("simpo", "treg")}
  runners, flops = {}, {}
  for name, (loss, reg) in variants.items():
    runners[name], compiled, _ = tb.compiled_runner(config_for(loss, reg, a), batch)
    flops[name] = float(compiled.cost_analysis().get("flops", float("nan")))
  times = sc.timed_interleaved(runners, a.repeats)
  rows = []
  for base, reg in (("dpo", "dpo_reg"), ("simpo", "simpo_reg")):
    for name in (base, reg):
      rows.append([name, f"{times[name][0] * 1e3:.1f}", f"{times[name][0] / times[base][0]:.3f}",
                   f"{flops[name] / 1e9:.3f}", f"{flops[name] / flops[base]:.4f}"])
  ratio_dpo = times["dpo_reg"][0] / times["dpo"][0]
  ratio_simpo = times["simpo_reg"][0] / times["simpo"][0]
  md = (f"### T-REG regularizer overhead per training step (CPU, float32)\n\n"
        f"`python bench/train_reg_overhead.py --repeats {a.repeats} --batch {a.batch} --seq {a.seq} --width "
        f"{a.width} --layers {a.layers} --vocab {a.vocab}` ({sc.today()}, {sc.machine()}). The trainer's jitted "
        f"step (AdamW, chunked log-probs), {a.batch} pairs × T={a.seq}; variants timed round-robin, median of "
        f"{a.repeats}; GFLOP from XLA's cost analysis of each compiled step.\n\n"
        + sc.table(["objective", "median ms / step", "time vs base", "XLA GFLOP / step", "FLOPs vs base"], rows)
        + f"\n\nGoal DPO-REG / DPO ≤ 1.03: {'met' if ratio_dpo <= 1.03 else 'NOT met'} ({ratio_dpo:.3f}; "
        f"SimPO-REG / SimPO {ratio_simpo:.3f}).")
  print(md)
  sc.write_json("train_reg_overhead", dict(times={k: v[1] for k, v in times.items()}, flops=flops, args=vars(a),
                                           machine=sc.machine(), date=sc.today()))
  sc.update_results("train_reg_overhead", md)


if __name__ == "__main__":
  main()
