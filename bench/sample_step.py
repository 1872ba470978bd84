"""The sampling step beside the forward: ways to draw the next token from [rows, vocab] logits, one run.

    python bench/sample_step.py [--rows 64] [--samples 4] [--repeats 20]

Logits are SmolLM2-135M-Instruct's real next-token logits (vocab 49,152) after `--rows / --samples` chat prompts and
the first tokens of a greedy continuation, each row repeated `--samples` times; temperature 0.8. Variants:

  sort + categorical       top-p by sorting the vocabulary (the textbook nucleus), Gumbel noise over [rows, V];
                           timed once (XLA:CPU's sort takes seconds)
  bisection + categorical  main before #30: the nucleus by 31 bisection passes over [rows, V], Gumbel over [rows, V]
  candidate blocks + inverse CDF     #30's option (candidate_blocks=8): the nucleus searched in the 8 vocabulary
                           blocks (of 256) with the largest maxima, an exactness check, the full path for rows that
                           fail it
  snapping bisection + inverse CDF   #30's full path: the bisection over [rows, V] snaps to actual
                           probabilities and stops per row once one value is left; one uniform per row
  top_k(K) candidates      #30's option (candidates=K, off by default): the nucleus among lax.top_k's K most likely tokens, exact when
                           they reach top-p and the K-th is below the threshold; at most rows/8 rows that are not
                           exact run the full path gathered apart, more of them the whole batch
  top-p 1: categorical vs two-level inverse CDF (the arith experiment samples with top_p = 1)
  RNG alone: Gumbel [rows, V] vs one uniform per row from per-row keys

The decode step (64-row forward at the prompts' length) is timed in the same run, so each variant is also a share
of one step. Fast-path share: the fraction of rows whose nucleus (top-p 0.95) lies in the candidate blocks with every
other token below its threshold.
"""

from __future__ import annotations

import argparse

import common


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", type=int, default=64)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top
  from tregjax.models import decoding  # pylint: disable=g-import-not-at-top

  model = models.from_pretrained(str(common.gguf_path()), dtype=jnp.float32, param_dtype=jnp.float32)
  prompts = common.chat_prompt_ids(args.rows // args.samples)
  # Logits at several positions of a greedy continuation (the first response token is unusually peaked).
  out = decoding.generate(model, prompts, max_new_tokens=8, key=jax.random.key(0))
  seqs = [p + np.asarray(out.tokens[i]).tolist()[:k] for i, p in enumerate(prompts) for k in range(args.samples)]
  tokens, lengths = decoding.pad_prompts(seqs)
  cache = decoding.init_cache(model, len(seqs), tokens.shape[1] + 1)
  logits, cache = decoding.prefill(model, cache, tokens, lengths)
  logits = jax.block_until_ready(logits)
  temp, top_p = 0.8, 0.95
  b = logits.shape[0]
  keys = decoding.row_keys(jax.random.key(1), jnp.arange(b))

  def sort_top_p(lg, key):
    x = lg / temp
    srt = jnp.sort(x, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    cut = jnp.take_along_axis(srt, jnp.argmax(cum >= top_p, axis=-1)[:, None], axis=-1)
    return jax.random.categorical(key, jnp.where(x >= cut, x, -jnp.inf), axis=-1)

  def bisect_top_p(lg, key):
    x = lg / temp
    x = jnp.where(common.legacy_nucleus(jax.nn.softmax(x, axis=-1), top_p), x, -jnp.inf)
    return jax.random.categorical(key, x, axis=-1)

  variants = {
      "bisection + categorical (top-p 0.95; main before #30)": jax.jit(bisect_top_p),
      "candidate blocks + inverse CDF (top-p 0.95; #30 option)": jax.jit(
          lambda lg, k: decoding.sample_logits(lg, keys, temperature=temp, top_p=top_p, candidate_blocks=8)),
      "snapping bisection + inverse CDF (top-p 0.95; #30 default, the full path)": jax.jit(
          lambda lg, k: decoding.sample_logits(lg, keys, temperature=temp, top_p=top_p, candidate_blocks=0,
                                               candidates=0)),
      "top_k(64) candidates, <= rows/8 misses to the full path (top-p 0.95; #30 option)": jax.jit(
          lambda lg, k: decoding.sample_logits(lg, keys, temperature=temp, top_p=top_p, candidates=64)),
      "top_k(128) candidates, <= rows/8 misses to the full path (top-p 0.95)": jax.jit(
          lambda lg, k: decoding.sample_logits(lg, keys, temperature=temp, top_p=top_p, candidates=128)),
      "lax.top_k(64) of the logits (a candidate set by top_k)": jax.jit(lambda lg, k: jax.lax.top_k(lg, 64)[1]),
      "categorical (top-p 1; main before #30)": jax.jit(lambda lg, k: jax.random.categorical(k, lg / temp, axis=-1)),
      "two-level inverse CDF (top-p 1; #30)": jax.jit(
          lambda lg, k: decoding.sample_logits(lg, keys, temperature=temp)),
      "RNG: Gumbel [rows, V]": jax.jit(lambda lg, k: jax.random.gumbel(k, lg.shape)),
      "RNG: one uniform per row (per-row keys)": jax.jit(
          lambda lg, k: jax.vmap(lambda kk: jax.random.uniform(kk, ()))(
              jax.vmap(jax.random.fold_in, (0, None))(keys, 3))),
  }
  key = jax.random.key(2)
  layer_weights = decoding.per_layer_weights(model)
  step_cache = [cache]

  def step():
    lg, step_cache[0] = decoding.decode_step(model, step_cache[0], jnp.zeros((b,), jnp.int32), layer_weights)
    return lg

  fns = {name: (lambda f=f: jax.block_until_ready(f(logits, key))) for name, f in variants.items()}
  sort_fn = jax.jit(sort_top_p)
  jax.block_until_ready(sort_fn(logits, key))
  sort_s = common.timed(lambda: jax.block_until_ready(sort_fn(logits, key)), 1)[0]
  fns["decode step (forward, for scale)"] = lambda: jax.block_until_ready(step())
  for fn in fns.values():
    fn()  # compile
  step_cache[0] = decoding.init_cache(model, b, tokens.shape[1] + 1)  # fresh slots: one warm-up wrote one
  step_cache[0] = decoding.prefill(model, step_cache[0], tokens, lengths)[1]
  times = common.timed_interleaved(fns, args.repeats)
  step_s = times["decode step (forward, for scale)"][0]

  # The fast path's exactness on these logits.
  x = np.asarray(logits, np.float64) / temp
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  srt = -np.sort(-p, axis=-1)
  size = (np.cumsum(srt, axis=-1) < top_p).sum(-1) + 1
  blocks = p.reshape(b, -1, 256)
  order = np.argsort(-blocks.max(-1), axis=-1)
  g = 8
  thresh = srt[np.arange(b), size - 1]
  inside = float(np.mean([(blocks[r][order[r, g:]] < thresh[r]).all() for r in range(b)]))
  in_top = {k: float(np.mean((size <= k) & (srt[:, k] < thresh))) for k in (64, 128)}  # exact for top_k(k)
  allowed = jax.jit(lambda lg: decoding.nucleus_mask(jax.nn.softmax(lg / temp, axis=-1), top_p))(logits)
  assert (np.asarray(allowed).sum(-1) >= size).all()  # the nucleus keeps ties, so it is never smaller
  rows = [["sort + categorical (top-p 0.95; one call)", f"{sort_s * 1e3:.0f}", f"{sort_s / step_s:.0%}"]]
  rows += [[name, f"{sec * 1e3:.2f}", f"{sec / step_s:.1%}"] for name, (sec, _) in times.items()]
  text = common.table(["variant", "ms per call", "share of one decode step"], rows)
  device = common.device()
  desc = (f"SmolLM2-135M-Instruct logits [{b}, {logits.shape[1]}], temperature {temp}; nucleus (top-p {top_p}) "
          f"inside the 8 candidate blocks for {inside:.0%} of rows, inside the top 64 / 128 tokens for "
          f"{in_top[64]:.0%} / {in_top[128]:.0%} (median nucleus {np.median(size):.0f}"
          f" tokens, max {size.max()})")
  print(f"{desc}; {device}")
  print(text)
  cmd = f"python bench/sample_step.py --rows {args.rows} --samples {args.samples} --repeats {args.repeats}"
  results = {"date": common.today(), "device": device, "args": vars(args), "fast_path_rows": inside,
             "top_k_exact_rows": in_top,
             "nucleus_sizes": size.tolist(), "ms": {k: v[0] * 1e3 for k, v in times.items()}, "sort_ms": sort_s * 1e3}
  print(f"wrote {common.write_json(f'sample_step_r{args.rows}', results)}")
  common.update_results(f"sample_step_r{args.rows}", (
      f"### The sampling step beside the forward ({desc})\n\n`{cmd}` ({common.today()}, {device}; median of "
      f"{args.repeats}, round-robin).\n\n{text}\n"))


if __name__ == "__main__":
  main()
