"""Scoring throughput (tokens/s): tregjax.score's jitted three-pass scorer vs a straightforward transformers-torch one.

    python bench/scoring_throughput.py [--pairs 48] [--width 64] [--repeats 3]

Same random Llama (saved by transformers, loaded by tregjax), same pairs, same work: for every chosen and rejected
response, reference log-probs under the plain prompt and under the better/worse contrastive prompts (3 forwards), then
r̂_t = σ(log π_better − log π_worse) − 0.5. Lengths are lognormal (prompt median 40, response median 60 tokens,
instruction 24 tokens). The torch baseline is what one would write first: batches of 16 responses in data order, one
padded forward per context (pad to the longest row, attention mask), full-vocabulary log-softmax, gather. tregjax sorts
responses into length buckets and runs the three contexts of a response in one jitted call with the chunked
log-softmax. Tokens/s counts real (unpadded) tokens of all three contexts. Compile time is reported separately; the
timed runs are the median of `--repeats` after a warm-up, torch and tregjax interleaved (the machine is shared).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from common import (llama_hf_config, machine, save_random_hf_llama, table, timed_interleaved, today, update_results,
                    write_json)

import ml_collections  # noqa: E402


def make_units(n_pairs: int, vocab: int, seed: int = 0):
  from tregjax import score  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  better = list(rng.integers(3, vocab, 24))
  worse = list(rng.integers(3, vocab, 24))
  units = []
  for _ in range(n_pairs):
    prompt = list(rng.integers(3, vocab, int(np.clip(rng.lognormal(np.log(40), 0.7), 4, 192))))
    for _side in range(2):
      response = list(rng.integers(3, vocab, int(np.clip(rng.lognormal(np.log(60), 0.7), 1, 256 - len(prompt)))))
      contexts = [prompt, better + prompt, worse + prompt]
      units.append(score.Unit([c + response for c in contexts], [len(c) for c in contexts], len(response)))
  return units


def torch_scorer(model, units, batch: int, threads: int):
  import torch  # pylint: disable=g-import-not-at-top

  @torch.no_grad()
  def run():
    torch.set_num_threads(threads)
    out = []
    for start in range(0, len(units), batch):
      chunk = units[start:start + batch]
      per_context = []
      for k in range(3):
        rows = [u.rows[k] for u in chunk]
        t = max(map(len, rows))
        ids = torch.zeros((len(rows), t), dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
          ids[i, :len(r)] = torch.tensor(r)
          mask[i, :len(r)] = 1
        logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        resp = []
        for i, u in enumerate(chunk):
          p = u.prompt_lens[k]
          positions = torch.arange(p - 1, p - 1 + u.resp_len)
          resp.append(logps[i, positions, torch.tensor(u.rows[k][p:])])
        per_context.append(resp)
      for i in range(len(chunk)):
        plain, better, worse = (per_context[k][i] for k in range(3))
        out.append((plain.numpy(), float(plain.sum()), (torch.sigmoid(better - worse) - 0.5).numpy()))
    return out

  return run


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--pairs", type=int, default=48)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  from tregjax import parallel, score  # pylint: disable=g-import-not-at-top
  hf = llama_hf_config(args.layers, args.width, args.vocab, heads=args.heads, kv_heads=args.kv_heads)
  torch_model, path = save_random_hf_llama(hf, path=tempfile.mkdtemp(prefix="tregjax-score-bench-"))
  units = make_units(args.pairs, args.vocab)
  real_tokens = sum(len(r) for u in units for r in u.rows)

  variants = {}
  for dtype in ("float32", "bfloat16"):
    config = ml_collections.ConfigDict(dict(model=dict(hf_path=path, dtype=dtype), mesh=dict(fsdp=1, tensor=1)))
    s = score.default_score_config()
    s.update(buckets=tuple(range(32, 353, 32)), dtype=dtype, chunk_size=512)  # default token budget
    scorer = score.Scorer(config, s, pad_id=0, mesh=parallel.mesh_from_config(config, per_process=True))
    t0 = time.perf_counter()
    first = scorer.score_units(units)
    variants[f"tregjax {dtype}"] = dict(run=lambda sc=scorer: sc.score_units(units),
                                        first_s=time.perf_counter() - t0, result=first)
  for threads in (torch.get_num_threads(), 1):
    name = f"transformers-torch float32, {threads} thread{'s' * (threads > 1)}"
    if name in variants:
      continue
    variants[name] = dict(run=torch_scorer(torch_model, units, args.batch, threads))
    t0 = time.perf_counter()
    variants[name]["result"] = variants[name]["run"]()
    variants[name]["first_s"] = time.perf_counter() - t0
  torch_names = [n for n in variants if n.startswith("transformers")]

  # interleaved: load from other jobs hits every variant alike
  times = {name: ts for name, (_, ts) in timed_interleaved({n: v["run"] for n, v in variants.items()},
                                                           args.repeats).items()}

  ref = variants[torch_names[0]]["result"]
  # The ratio is against the FASTEST torch setting measured (thread oversubscription can slow torch down a lot).
  torch_tps = max(real_tokens / float(np.median(times[n])) for n in torch_names)
  rows, payload = [], {}
  for name, v in variants.items():
    med = float(np.median(times[name]))
    diff = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(v["result"], ref))
    rdiff = max(float(np.abs(a[2] - b[2]).max()) for a, b in zip(v["result"], ref))
    tps = real_tokens / med
    payload[name] = dict(median_s=med, times=times[name], first_call_s=v["first_s"], tokens_per_s=tps,
                         max_abs_diff_logps=diff, max_abs_diff_rewards=rdiff)
    rows.append([name, f"{med:.3f}", f"{tps:,.0f}", f"{tps / torch_tps:.2f}x", f"{v['first_s']:.2f}",
                 f"{diff:.1e} / {rdiff:.1e}"])
  headers = ["scorer", "median s / pass", "tokens/s", "vs fastest torch", "first call s (incl. compile)",
             "max |Δ| vs torch: logps / rewards"]
  md = table(headers, rows)
  print(md)
  write_json("scoring_throughput", dict(args=vars(args), real_tokens=real_tokens, units=len(units), results=payload,
                                        machine=machine(), date=today()))
  section = "scoring_throughput" if args.width == 64 else f"scoring_throughput_w{args.width}"
  update_results(section, f"""### Scoring throughput: tregjax.score vs transformers-torch (3 passes)

`python bench/scoring_throughput.py --pairs {args.pairs} --width {args.width} --heads {args.heads} --kv-heads \
{args.kv_heads} --layers {args.layers} --vocab {args.vocab} --batch {args.batch} --repeats {args.repeats}`
({today()}, {machine()}, shared with other jobs while measured; interleaved runs, median). {len(units)} responses x 3 contexts = {real_tokens:,} real tokens per pass;
random {args.layers}-layer Llama, width {args.width}, {args.heads} heads ({args.kv_heads} kv), vocab {args.vocab}
(the project's tiny_llama shape by default); lognormal lengths. tregjax: rows sorted by length, buckets every 32
tokens, the default CPU token budget (1024 padded positions per call); torch: {args.batch} responses per batch,
padded per context.

{md}
""")


if __name__ == "__main__":
  main()
