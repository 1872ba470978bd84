"""Padding waste of the pipeline's batching: pad-to-max vs length buckets vs packing, lognormal lengths.

    python bench/padding_waste.py [--pairs 20000] [--batch 32]

Lengths follow UltraFeedback-like lognormals (prompt median 100 tokens, responses median 250, sigma 0.8), truncated
the way build_dataset truncates (prompt <= 512, prompt + response <= 1024). Waste = padded positions / all positions
over the chosen and rejected rows of one epoch, with drop_remainder=False (the padding rows of each bucket's last
batch count as waste). Pure numpy (tregjax.data.pipeline.BatchPlan), so the figures are exact, not timed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import lognormal_lengths, machine, table, today, update_results, write_json

from tregjax.data.pipeline import BatchPlan

MAX_PROMPT, MAX_LENGTH = 512, 1024


def pair_lengths(n: int, seed: int = 0) -> np.ndarray:
  """[n, 2] lengths of the chosen and rejected rows (prompt + response)."""
  p, c, r = lognormal_lengths(n, prompt_median=100, response_median=250, min_prompt=4, max_prompt=MAX_PROMPT,
                              max_length=MAX_LENGTH, seed=seed).T
  return np.stack([p + c, p + r], axis=1)


def waste_of(plan: BatchPlan, lengths: np.ndarray) -> tuple[float, int, int]:
  """(waste fraction, distinct shapes, batches) over one epoch of a single-process plan."""
  real = total = 0
  shapes = set()
  for length, units in plan.epoch(0):
    shapes.add(length)
    total += 2 * length * len(units)
    for u in units:
      if u >= 0:
        real += int(lengths[plan.units[u]].sum())
  return 1 - real / total, len(shapes), len(plan.epoch(0))


def dynamic_waste(lengths: np.ndarray, batch: int, seed: int = 0) -> tuple[float, int, int]:
  """Pad-to-longest per batch in shuffled order (HF collator style; unbounded shapes)."""
  order = np.random.default_rng(seed).permutation(len(lengths))
  real = total = 0
  shapes = set()
  for start in range(0, len(order), batch):
    rows = lengths[order[start:start + batch]]
    t = int(rows.max())
    shapes.add(t)
    total += 2 * t * batch
    real += int(rows.sum())
  return 1 - real / total, len(shapes), -(-len(order) // batch)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--pairs", type=int, default=20000)
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  lengths = pair_lengths(args.pairs)
  variants = {
      "pad to max_length (1024)": dict(buckets=(MAX_LENGTH,), packing=False),
      "buckets 256/512/1024": dict(buckets=(256, 512, MAX_LENGTH), packing=False),
      "buckets 128/256/384/512/768/1024": dict(buckets=(128, 256, 384, 512, 768, MAX_LENGTH), packing=False),
      "packing into 1024 rows": dict(buckets=(MAX_LENGTH,), packing=True),
  }
  rows, results = [], {}
  base = None
  for name, kw in variants.items():
    t0 = time.perf_counter()
    plan = BatchPlan(lengths, global_batch_size=args.batch, seed=0, shuffle=True, drop_remainder=False,
                     process_index=0, process_count=1, **kw)
    waste, shapes, batches = waste_of(plan, lengths)
    seconds = time.perf_counter() - t0
    base = base if base is not None else (1 - waste)
    results[name] = dict(waste=waste, shapes=shapes, batches=batches, plan_seconds=seconds)
    rows.append([name, f"{100 * waste:.1f}%", shapes, batches, f"{(1 - waste) / base:.2f}x", f"{seconds:.2f}"])
  waste, shapes, batches = dynamic_waste(lengths, args.batch)
  results["pad to longest in batch (unbounded shapes)"] = dict(waste=waste, shapes=shapes, batches=batches)
  rows.append(["pad to longest in batch (HF collator; unbounded shapes)", f"{100 * waste:.1f}%", shapes, batches,
               f"{(1 - waste) / base:.2f}x", "-"])
  headers = ["batching", "padded positions", "distinct T (jit shapes)", "batches / epoch",
             "useful-token density vs pad-to-max", "plan s"]
  md = table(headers, rows)
  print(md)
  stats = dict(prompt_median=float(np.median(lengths.min(1))), row_mean=float(lengths.mean()))
  write_json("padding_waste", dict(pairs=args.pairs, batch=args.batch, results=results, lengths=stats,
                                   machine=machine(), date=today()))
  update_results("padding_waste", f"""### Padding waste: buckets and packing vs pad-to-max (data pipeline)

`python bench/padding_waste.py --pairs {args.pairs} --batch {args.batch}` ({today()}, {machine()}; exact counts,
not timings). Lognormal lengths: prompt median 100, responses median 250 tokens, sigma 0.8, truncated to prompt <= 512
and prompt + response <= 1024 (mean row {stats['row_mean']:.0f} tokens); one epoch, chosen + rejected rows,
drop_remainder=False.

{md}
""")


if __name__ == "__main__":
  main()
