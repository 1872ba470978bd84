"""Trainer throughput on packed vs padded preference batches: one epoch of the same pairs, the trainer's own step.

    python bench/train_packing.py [--pairs 384] [--batch 16] [--max-length 256]

Lengths: lognormal like bench/padding_waste.py, scaled to CPU size (prompt median 24 tokens, responses median 60,
sigma 0.8, prompt <= max_length/2, prompt + response <= max_length). Batches come from the pipeline's BatchPlan and
`collate` (so the layouts are exactly the trainer's); the step is the trainer's jitted DPO-REG step (tiny Llama:
2 layers, width 128, vocab 512, float32) with per-segment losses when packed (data.max_segments = 16). Epoch time =
Σ over the epoch's batches of the median step time of that batch's shape (warm-up excluded, compile reported apart;
all variants' steps timed round-robin, so they see the same machine load); pairs/s and real tokens/s are over the
whole epoch (chosen + rejected rows). A last row runs the pad-to-max batches through the packed step (16 segment
slots): the cost of the per-segment loss machinery alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import train_throughput as tt
from common import (lognormal_lengths, machine, table, timed_interleaved, today, trainer_step, update_results,
                    write_json)


def records_of(lengths: np.ndarray, vocab: int, seed: int = 0) -> dict[int, dict]:
  """Scored-cache records (random ids, reference log-probs and token rewards) with the given lengths."""
  rng = np.random.default_rng(seed)
  out = {}
  for i, (p, c, r) in enumerate(lengths):
    rec = {"prompt_ids": rng.integers(3, vocab, p)}
    for side, m in (("chosen", c), ("rejected", r)):
      rec[f"{side}_ids"] = rng.integers(3, vocab, m)
      rec[f"ref_{side}_token_logps"] = (-6.0 + 0.3 * rng.standard_normal(m)).astype(np.float32)
      rec[f"ref_{side}_logps"] = float(rec[f"ref_{side}_token_logps"].sum())
      rec[f"{side}_token_rewards"] = (0.2 * rng.standard_normal(m)).astype(np.float32)
    out[i] = rec
  return out


class Variant:
  """One batching of the epoch with its own compiled steps (one per shape) and training state."""

  def __init__(self, name: str, plan, records, max_length: int, batch: int, repeats: int, slots: int):
    from tregjax.data import pipeline  # pylint: disable=g-import-not-at-top
    config = tt.tregjax_config(batch, max_length)
    config.loss.regularizer, config.loss.alpha = "treg", 0.25
    config.data.packing, config.data.max_segments = slots > 1, max(slots, 1)
    config.data.buckets, config.data.max_length = tuple(plan.buckets), max_length
    step, self.state, self.place, _ = trainer_step(config)
    self.name = name
    self.batches = [(length, [plan.units[u] if u >= 0 else [] for u in units]) for length, units in plan.epoch(0)]
    by_shape: dict[int, list] = {}
    for length, rows in self.batches:
      by_shape.setdefault(length, []).append(rows)
    self.host = {length: [pipeline.collate(rows, records, length, scored=True) for rows in lists[:repeats]]
                 for length, lists in by_shape.items()}
    self.compiled, self.compile_s, self.calls = {}, 0.0, 0
    for length, host in self.host.items():
      t0 = time.perf_counter()
      self.compiled[length] = step.lower(self.state, self.place(host[0])).compile()
      self.compile_s += time.perf_counter() - t0
    self.real_tokens = sum(len(records[i]["prompt_ids"]) * 2 + len(records[i]["chosen_ids"]) +
                           len(records[i]["rejected_ids"]) for _, rows in self.batches for row in rows for i in row)
    self.pairs = sum(len(row) for _, rows in self.batches for row in rows)
    self.positions = sum(2 * length * len(rows) for length, rows in self.batches)

  def runner(self, length: int):
    import jax  # pylint: disable=g-import-not-at-top

    def run():
      host = self.host[length]
      self.state, metrics = self.compiled[length](self.state, self.place(host[self.calls % len(host)]))
      self.calls += 1
      jax.block_until_ready((self.state, metrics))
    return run

  def summary(self, step_s: dict[int, float]) -> dict:
    epoch_s = sum(step_s[length] for length, _ in self.batches)
    return dict(name=self.name, batches=len(self.batches), shapes=len(self.host), pairs=self.pairs, epoch_s=epoch_s,
                pairs_per_s=self.pairs / epoch_s, real_tokens_per_s=self.real_tokens / epoch_s,
                padded_fraction=1 - self.real_tokens / self.positions,
                step_s={str(k): v for k, v in step_s.items()}, compile_s=self.compile_s)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--pairs", type=int, default=384)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--max-length", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  from tregjax.data.pipeline import BatchPlan  # pylint: disable=g-import-not-at-top
  # padding_waste.py's lognormals scaled by 0.24 (prompt median 24, responses 60)
  lengths = lognormal_lengths(args.pairs, prompt_median=24, response_median=60, min_prompt=2,
                              max_prompt=args.max_length // 2, max_length=args.max_length)
  rows = np.stack([lengths[:, 0] + lengths[:, 1], lengths[:, 0] + lengths[:, 2]], axis=1)
  records = records_of(lengths, tt.VOCAB)
  m = args.max_length
  variants = {
      f"pad to max_length ({m})": dict(buckets=(m,), packing=False),
      f"buckets {m // 4}/{m // 2}/{3 * m // 4}/{m}": dict(buckets=(m // 4, m // 2, 3 * m // 4, m), packing=False),
      f"packing into {m} rows (max_segments 16)": dict(buckets=(m,), packing=True),
  }
  built = []
  for name, kw in variants.items():
    plan = BatchPlan(rows, global_batch_size=args.batch, seed=0, shuffle=True, drop_remainder=False,
                     process_index=0, process_count=1, max_segments=16 if kw["packing"] else None, **kw)
    built.append(Variant(name, plan, records, m, args.batch, args.repeats, 16 if kw["packing"] else 1))
  # The per-segment machinery alone: the pad-to-max batches through a step with 16 segment slots.
  plan = BatchPlan(rows, global_batch_size=args.batch, seed=0, shuffle=True, drop_remainder=False, process_index=0,
                   process_count=1, buckets=(m,), packing=False)
  built.append(Variant(f"pad to max_length ({m}), step with 16 segment slots", plan, records, m, args.batch,
                       args.repeats, 16))
  fns = {(v.name, length): v.runner(length) for v in built for length in v.host}
  for fn in fns.values():  # warm-up
    fn()
  timed = timed_interleaved(fns, args.repeats)
  results = [v.summary({length: timed[(v.name, length)][0] for length in v.host}) for v in built]
  for r in results:
    print(r, flush=True)
  base = results[0]
  md = table(["batching", "padded positions", "jit shapes", "batches/epoch", "epoch s", "pairs/s",
              "real tokens/s", "vs pad-to-max", "compile s"],
             [[r["name"], f"{100 * r['padded_fraction']:.1f}%", r["shapes"], r["batches"], f"{r['epoch_s']:.2f}",
               f"{r['pairs_per_s']:.1f}", f"{r['real_tokens_per_s']:.0f}", f"{base['epoch_s'] / r['epoch_s']:.2f}x",
               f"{r['compile_s']:.1f}"] for r in results])
  print(md)
  write_json("train_packing", dict(args=vars(args), results=results, machine=machine(), date=today()))
  update_results("train_packing", f"""### Trainer on packed vs padded preference batches (DPO-REG step, one epoch)

`python bench/train_packing.py --pairs {args.pairs} --batch {args.batch} --max-length {m}` ({today()}, {machine()}).
Same {args.pairs} pairs per variant (lognormal lengths, mean prompt + response {rows.mean():.0f} tokens), batch of
{args.batch} rows (packed rows hold several pairs), tiny Llama (2 layers, width 128, vocab 512, float32), the trainer's
jitted step; epoch time = Σ per-batch median step time of its shape (all steps timed round-robin). The last row is
the pad-to-max epoch through the packed step (16 segment slots): the per-segment machinery's own cost.

{md}
""")


if __name__ == "__main__":
  main()
