"""KV-cache decoding: init_cache / prefill / decode_step (jitted, static shapes, cache donated) and `generate`.

Cache slot == token position: row b's prompt fills slots [0, len_b), and its n-th new token is written at slot
len_b + n. Attention is causal in slot index, so every row can have its own prompt length inside one static-shape
batch: slots a row has not written yet always lie in its future and are masked. The cache is donated to each call
so XLA updates it in place instead of copying [L, B, K, S, H] per token.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tregjax import parallel
from tregjax.models import layers
from tregjax.models.transformer import CausalLM


@flax.struct.dataclass
class Cache:
  k: jax.Array  # [L, B, K, S, H]
  v: jax.Array  # [L, B, K, S, H]
  index: jax.Array  # i32[B]: next slot (== position) to write, per row


class GenerateOutput(NamedTuple):
  tokens: jax.Array  # i32[B, max_new_tokens]; pad_id after a row's EOS
  lengths: jax.Array  # i32[B]; generated tokens incl. the EOS


def init_cache(model: CausalLM, batch: int, max_len: int, *, dtype=None) -> Cache:
  """Zeroed cache for `batch` rows of up to `max_len` positions (prompt + new tokens)."""
  cfg = model.config
  dtype = model.model.dtype if dtype is None else dtype
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # see layers.cached_attention
  axes = ("layers", "cache_batch", "kv_heads", "cache_length", "head_dim")
  mesh = parallel.active_mesh()
  sharding = None if mesh is None else parallel.sharding_for(axes, shape, mesh)
  zeros = jnp.zeros(shape, dtype, device=sharding)
  return Cache(k=zeros, v=jnp.zeros(shape, dtype, device=sharding), index=jnp.zeros((batch,), jnp.int32))


def per_layer_weights(model: CausalLM) -> list[nnx.State] | None:
  """Per-layer weight copies for decoding on CPU (see `Backbone.run_layers`), None elsewhere.

  A decode step streams every weight once; on XLA:CPU slicing a layer out of the stacked weights copies it first,
  so separate buffers make the step ~1.5x faster at batch 8 for a transient second copy of the layer weights.
  Accelerators keep the stacked weights (no extra memory; their slices feed the matmuls directly), and so does a
  CPU whose free memory (`free_bytes`) cannot hold the copy: copied, Qwen2.5-Coder-1.5B's ~5.2 GB of float32 layer
  weights held its sampling at 13.4 GiB resident, and the jobs beside it were killed for memory (#28).
  """
  leaves = jax.tree.leaves(nnx.state(model.model.layers))
  if {d.platform for d in leaves[0].devices()} != {"cpu"}:
    return None
  copy = sum(int(x.nbytes) for x in leaves)
  if copy > free_bytes():
    logging.getLogger(__name__).info("decoding from the stacked layer weights: a per-layer copy (%.2f GiB) does not "
                                     "fit in half the available memory", copy / 2**30)
    return None
  return model.model.unstack_layers()


def forward_cached(model: CausalLM, tokens: jax.Array, cache: Cache,
                   layer_weights: list[nnx.State] | None = None) -> tuple[jax.Array, Cache]:
  """Run `tokens` [B, T] at positions cache.index + t; returns final-norm hidden [B, T, D] and the new cache."""
  backbone = model.model
  b, t = tokens.shape
  s = cache.k.shape[3]
  positions = cache.index[:, None] + jnp.arange(t, dtype=jnp.int32)
  kv_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  ones_q, ones_kv = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
  mask = layers.attention_mask(ones_q, ones_kv, positions, kv_index)
  x, (k, v) = backbone.run_layers(backbone.embed(tokens), positions, mask, positions, kv_index,
                                  cache=(cache.k, cache.v), cache_index=cache.index, per_layer_state=layer_weights)
  return backbone.norm(x), Cache(k=k, v=v, index=cache.index + t)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def prefill_step(graphdef, state, cache: Cache, tokens: jax.Array, lengths: jax.Array, layer_weights=None):
  """`prefill` on a split model (compiled once per graphdef and shapes; the cache is donated)."""
  model = nnx.merge(graphdef, state)
  hidden, cache = forward_cached(model, tokens, cache, layer_weights)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  # Row b continues at its own length, not at the padded prompt width.
  return model.unembed(last), cache.replace(index=lengths.astype(jnp.int32))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def decode_step_split(graphdef, state, cache: Cache, token: jax.Array, layer_weights=None):
  """`decode_step` on a split model (compiled once per graphdef and shapes; the cache is donated)."""
  model = nnx.merge(graphdef, state)
  hidden, cache = forward_cached(model, token[:, None], cache, layer_weights)
  return model.unembed(hidden[:, 0]), cache


def prefill(model: CausalLM, cache: Cache, tokens: jax.Array, lengths: jax.Array,
            layer_weights: list[nnx.State] | None = None) -> tuple[jax.Array, Cache]:
  """Right-padded prompts [B, P] with true lengths [B] -> (f32 logits [B, V] at each row's last prompt token, cache).

  The cache is donated: do not reuse the one passed in. `layer_weights`: optional `per_layer_weights(model)`,
  computed once and passed to every call.
  """
  graphdef, state = nnx.split(model)
  return prefill_step(graphdef, state, cache, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32),
                      layer_weights)


def decode_step(model: CausalLM, cache: Cache, token: jax.Array,
                layer_weights: list[nnx.State] | None = None) -> tuple[jax.Array, Cache]:
  """One new token per row [B] -> (f32 logits [B, V] for the next token, cache). The cache is donated."""
  graphdef, state = nnx.split(model)
  return decode_step_split(graphdef, state, cache, jnp.asarray(token, jnp.int32), layer_weights)


# Top-p fast path off by default: on SmolLM2's logits the nucleus fits 8 candidate blocks for 78% of rows, so a
# 64-row batch still runs the full path and the step costs 85 vs 78 ms (bench/sample_step.py). >0 turns it on (a
# peaked policy, few rows per batch).
CANDIDATE_BLOCKS = 0
# Top-p candidates by lax.top_k, off by default: on SmolLM2's [64, 49152] logits the path cost 983 ms against the full
# path's 101 ms (bench/sample_step.py, 2026-12-08), although lax.top_k(64) alone takes 9 ms; >0 turns it on.
CANDIDATES = 0
_BLOCK = 256  # vocabulary block size (two-level inverse CDF, candidate blocks)


def row_keys(key: jax.Array, row_ids: jax.Array) -> jax.Array:
  """Per-row keys fold_in(key, row_id): a row's samples depend on its id and the key only, not on its batch."""
  return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.asarray(row_ids, jnp.int32))


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, candidate_blocks: int = CANDIDATE_BLOCKS, candidates: int = CANDIDATES,
                  fallback_rows: int = 0) -> jax.Array:
  """Next tokens [B] from f32 logits [B, V]: greedy when temperature == 0, else top-k / top-p sampling.

  `key`: one key per row [B] (`row_keys`), or a single key (split per row). Each row draws ONE uniform u and takes
  the token whose interval of the allowed distribution's CDF holds u (inverse CDF): no [B, V] Gumbel noise, and a
  row's token depends on its own key only. The allowed distribution is softmax(logits / temperature) restricted to the
  top-k logits (ties at the k-th kept) and then to the nucleus (`nucleus_mask`: the smallest top-p set, ties kept).

  Full path: the k-th logit by lax.top_k(top_k) (only with top_k), the nucleus by `nucleus_mask` over [B, V] (a snapping
  bisection, no sort: XLA:CPU sorts [64, 49152] in ~0.8 s), the token by a two-level inverse CDF (block sums, then
  one block). Top-p fast path (no top_k, `candidate_blocks` > 0): the vocabulary in blocks of 256, the nucleus
  searched only in the `candidate_blocks` blocks with the largest maxima; a row is exact when every token outside
  them is strictly below the candidates' nucleus threshold (the next block maximum is < t), and then samples among
  the candidates. Only when some row is not exact does the batch run the full path too, for those rows.
  Top-p candidates (no top_k, `candidates` = K > 0; off by default, see CANDIDATES): the K most likely tokens by
  lax.top_k; a row is exact when its sorted candidates reach top_p and the last one is strictly below its nucleus
  threshold (no token outside can be in the nucleus), and then samples among them in vocabulary order (the full
  path's token for the same u, up to float rounding); up to `fallback_rows` (default B / 8) rows that are not exact
  run the full path gathered into a small batch, more than that the whole batch. Every path
  samples the same distribution; tests/models_decoding_test.py checks frequencies against exact probabilities.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  b, v = logits.shape
  x = logits.astype(jnp.float32) / temperature
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  keys = key if key.ndim == (1 if typed else 2) else row_keys(key, jnp.arange(b))
  u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)  # [B] in [0, 1)
  top_k = top_k if 0 < top_k < v else 0
  w = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))  # unnormalized probabilities, max 1

  def full(_=None):
    ww = jnp.where(x >= jax.lax.top_k(x, top_k)[0][:, -1:], w, 0.0) if top_k else w
    if top_p < 1.0:
      ww = jnp.where(nucleus_mask(ww / jnp.sum(ww, axis=-1, keepdims=True), top_p), ww, 0.0)
    return _inverse_cdf(ww, u)

  if not top_k and top_p < 1.0 and 0 < candidates < v and not candidate_blocks:
    return _top_p_candidates(x, w, u, top_p, candidates, min(fallback_rows or max(1, b // 8), b))
  blk = min(_BLOCK, v)
  nb = -(-v // blk)
  g = candidate_blocks
  if top_k or top_p >= 1.0 or not g or nb <= g:
    return full()
  z = jnp.sum(w, axis=-1, keepdims=True)
  blocks = (jnp.pad(w, ((0, 0), (0, nb * blk - v))) if nb * blk != v else w).reshape(b, nb, blk)
  block_max, block_i = jax.lax.top_k(jnp.max(blocks, axis=-1), g + 1)  # [B, g + 1]
  cand = jnp.take_along_axis(blocks, block_i[:, :g, None], axis=1).reshape(b, g * blk)
  keep = nucleus_mask(cand / z, top_p, vocab=v)
  t = jnp.min(jnp.where(keep, cand, jnp.inf), axis=-1)  # the candidates' nucleus threshold (unnormalized)
  exact = (jnp.sum(jnp.where(keep, cand, 0.0), axis=-1) >= top_p * z[:, 0]) & (block_max[:, g] < t)
  j = _inverse_cdf(jnp.where(keep, cand, 0.0), u)
  fast = jnp.take_along_axis(block_i, (j // blk)[:, None], axis=-1)[:, 0] * blk + j % blk
  return jax.lax.cond(jnp.all(exact), lambda _: fast, lambda _: jnp.where(exact, fast, full()), None
                      ).astype(jnp.int32)


def _top_p_full(w: jax.Array, u: jax.Array, top_p: float) -> jax.Array:
  """The full top-p path on unnormalized probabilities w [B, V]: `nucleus_mask`, then `_inverse_cdf`."""
  return _inverse_cdf(jnp.where(nucleus_mask(w / jnp.sum(w, axis=-1, keepdims=True), top_p), w, 0.0), u)


def _top_p_candidates(x: jax.Array, w: jax.Array, u: jax.Array, top_p: float, k: int, m: int) -> jax.Array:
  """Top-p sampling from the k most likely tokens, exact rows only; see `sample_logits`. x: logits / temperature,
  w = exp(x - max) [B, V], u [B]."""
  b = x.shape[0]
  vals, idx = jax.lax.top_k(x, k)  # descending
  c = jnp.exp(vals - vals[:, :1])  # == w at idx (the row maximum is vals[:, 0])
  cum = jnp.cumsum(c, axis=-1)
  reach = cum >= top_p * jnp.sum(w, axis=-1, keepdims=True)
  t = jnp.take_along_axis(c, jnp.argmax(reach, axis=-1)[:, None], axis=-1)  # nucleus threshold (first reach)
  exact = reach[:, -1] & (c[:, -1] < t[:, 0])
  keep = c >= t  # the nucleus (ties at t included)
  # Inverse CDF in vocabulary order, as the full path: the same token for the same u, up to float rounding.
  perm = jnp.argsort(jnp.where(keep, idx, x.shape[1]), axis=-1)
  cv = jnp.take_along_axis(jnp.where(keep, c, 0.0), perm, axis=-1)
  cumv = jnp.cumsum(cv, axis=-1)
  pos = jnp.minimum(jnp.sum(cumv <= (u * cumv[:, -1])[:, None], axis=-1), jnp.sum(keep, axis=-1) - 1)
  fast = jnp.take_along_axis(jnp.take_along_axis(idx, perm, axis=-1), pos[:, None], axis=-1)[:, 0].astype(jnp.int32)
  miss = ~exact

  def some(_):  # at most m rows miss: the full path on those rows only
    sel = jnp.nonzero(miss, size=m, fill_value=0)[0]
    sub = _top_p_full(w[sel], u[sel], top_p)
    return fast.at[jnp.where(miss[sel], sel, b)].set(sub, mode="drop")

  def many(_):
    return jnp.where(exact, fast, _top_p_full(w, u, top_p))

  branch = jnp.where(jnp.any(miss), jnp.where(jnp.sum(miss) <= m, 1, 2), 0)
  return jax.lax.switch(branch, (lambda _: fast, some, many), None)


def _inverse_cdf(w: jax.Array, u: jax.Array) -> jax.Array:
  """Index [B] of the entry whose interval of cumsum(w) [B, N] (w >= 0, unnormalized) holds u [B] * sum(w).

  Two levels (block sums, then one block) keep it O(N) without a length-N scan. The first entry whose running sum
  exceeds the target always has w > 0; float rounding past the end falls back to the last positive entry.
  """
  b, n = w.shape
  blk = min(_BLOCK, n)
  nb = -(-n // blk)
  if nb * blk != n:
    w = jnp.pad(w, ((0, 0), (0, nb * blk - n)))
  blocks = w.reshape(b, nb, blk)
  cum_blocks = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [B, nb]
  target = u * cum_blocks[:, -1]
  last_block = nb - 1 - jnp.argmax(jnp.flip(cum_blocks > jnp.concatenate(
      [jnp.zeros((b, 1)), cum_blocks[:, :-1]], axis=-1), axis=-1), axis=-1)  # last block with mass
  blk_i = jnp.minimum(jnp.sum(cum_blocks <= target[:, None], axis=-1), last_block)
  inner = jnp.take_along_axis(blocks, blk_i[:, None, None], axis=1)[:, 0]  # [B, blk]
  before = jnp.where(blk_i > 0, jnp.take_along_axis(cum_blocks, jnp.maximum(blk_i - 1, 0)[:, None], axis=-1)[:, 0],
                     0.0)
  cum = jnp.cumsum(inner, axis=-1)
  last = blk - 1 - jnp.argmax(jnp.flip(inner > 0, axis=-1), axis=-1)
  j = jnp.minimum(jnp.sum(cum <= (target - before)[:, None], axis=-1), last)
  return (blk_i * blk + j).astype(jnp.int32)


def nucleus_mask(probs: jax.Array, top_p: float, vocab: int | None = None) -> jax.Array:
  """bool[B, V]: the tokens at least as likely as t, the largest probability whose at-least-as-likely mass reaches
  top_p (the smallest top-p set; ties at t are all kept). No sort (XLA:CPU sorts [64, 49152] in seconds).

  t is bracketed over the float32 bit patterns (monotone for p >= 0), lo <= t < hi with mass(>= lo) >= top_p >
  mass(>= hi): each pass halves the bracket, then snaps lo up to the smallest probability >= lo and hi down to just
  above the largest one < hi (neither changes a mass), and a row is done once one distinct probability is left in
  [lo, hi) -- that one is t. About a third of the 31 passes of a plain bisection on LM logits (bench/sample_step.py).
  The start lo = (1 - top_p) / V is valid: the tokens below it hold less than 1 - top_p (`vocab`: V when `probs`
  is a subset of the vocabulary; a subset that cannot reach top_p returns a set whose mass is < top_p).
  """
  b, v = probs.shape
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
  big = jnp.iinfo(jnp.int32).max

  def snap(lo, hi):
    lo = jnp.min(jnp.where(bits >= lo[:, None], bits, big), axis=-1)  # smallest value >= lo
    top = jnp.max(jnp.where(bits < hi[:, None], bits, -1), axis=-1)  # largest value < hi
    return lo, top + 1, lo >= top  # one distinct value left in [lo, hi)

  def cond(c):
    i, _, _, done = c
    return (i < 32) & ~jnp.all(done)

  def body(c):
    i, lo, hi, done = c
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(jnp.where(bits >= mid[:, None], probs, 0.0), axis=-1) >= top_p
    lo2, hi2, fin = snap(jnp.where(ok, mid, lo), jnp.where(ok, hi, mid))
    return i + 1, jnp.where(done, lo, lo2), jnp.where(done, hi, hi2), done | fin

  start = jax.lax.bitcast_convert_type(jnp.float32((1.0 - top_p) / (vocab or v)), jnp.int32)
  lo, hi, done = snap(jnp.full((b,), start, jnp.int32), jnp.max(bits, axis=-1) + 1)
  _, lo, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), lo, hi, done))
  return (bits >= lo[:, None]) & (probs > 0)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10, 11, 12), donate_argnums=(2, 3))
def generate_loop(graphdef, state, cache, carry, key, layer_weights, stop_at, max_new_tokens, temperature, top_k,
                  top_p, eos_ids, pad_id):
  """Decode until at most `stop_at` rows still run (then the caller refills or compacts the batch).

  carry = (logits [B, V], done [B], out [B, N], lengths [B], row_ids [B]). A row's step counter is its own length:
  its n-th token uses key fold_in(fold_in(key, row_id), n) and goes to out[b, n], so a row's samples do not depend on
  when it entered the batch. A row is done after an EOS id or N tokens; done rows keep their slot (pad tokens in,
  nothing written) until the caller reuses it. `stop_at` is traced: one compile per batch size.
  """
  model = nnx.merge(graphdef, state)
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  logits, done, out, lengths, rows = carry
  keys = row_keys(key, rows)
  b = rows.shape[0]

  def cond(c):
    return jnp.sum(~c[2]) > stop_at

  def body(c):
    logits, cache, done, out, lengths = c
    token = sample_logits(logits, jax.vmap(jax.random.fold_in)(keys, lengths), temperature=temperature,
                          top_k=top_k, top_p=top_p)
    token = jnp.where(done, pad_id, token)
    out = out.at[jnp.arange(b), jnp.where(done, max_new_tokens, lengths)].set(token, mode="drop")
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, eos) | (lengths >= max_new_tokens)
    hidden, cache = forward_cached(model, token[:, None], cache, layer_weights)
    return model.unembed(hidden[:, 0]), cache, done, out, lengths

  logits, cache, done, out, lengths = jax.lax.while_loop(cond, body, (logits, cache, done, out, lengths))
  return (logits, done, out, lengths, rows), cache  # returning the cache lets XLA alias the donated buffer


@functools.partial(jax.jit, static_argnums=(0, 11), donate_argnums=(2, 3))
def admit(graphdef, state, cache: Cache, carry, small: Cache, tokens: jax.Array, lengths: jax.Array,
          src: jax.Array, dst: jax.Array, row_ids: jax.Array, layer_weights, pad_id: int):
  """Continuous batching: prefill distinct prompts `tokens` [D, P] (lengths [D]) into `small` (a [.., D, .., P, ..]
  cache), then start slot dst[i] of the batch as a new row row_ids[i] on prompt src[i]: its cache slots [0, P),
  index, first logits, a fresh output. dst [B] entries >= B are dropped (a fixed shape per (B, D, P)). Slots past a
  new row's prompt may hold its predecessor's keys; they lie in its future and are masked until overwritten."""
  logits, small = prefill_step(graphdef, state, small, tokens, lengths, layer_weights)
  p = small.k.shape[3]
  put = lambda a, new: a.at[dst].set(new, mode="drop")
  cache = Cache(k=cache.k.at[:, dst, :, :p].set(small.k[:, src], mode="drop"),
                v=cache.v.at[:, dst, :, :p].set(small.v[:, src], mode="drop"),
                index=put(cache.index, small.index[src]))
  old_logits, done, out, n, rows = carry
  return cache, (put(old_logits, logits[src]), put(done, False), put(out, pad_id), put(n, 0), put(rows, row_ids))


@jax.jit
def take_rows(cache: Cache, carry, idx: jax.Array):
  """Rows `idx` of the cache and the loop carry (compaction: the running rows into a smaller batch)."""
  take = lambda a, axis=0: jnp.take(a, idx, axis=axis)
  return (Cache(k=take(cache.k, 1), v=take(cache.v, 1), index=take(cache.index)), tuple(take(a) for a in carry))


def pad_prompts(prompt_tokens: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1
                ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad variable-length prompts -> (tokens i32[B, P], lengths i32[B]); P rounded up to `multiple`."""
  lengths = np.array([len(p) for p in prompt_tokens], np.int32)
  if len(lengths) == 0 or lengths.min() < 1:
    raise ValueError("generate needs at least one prompt and every prompt needs at least one token (e.g. BOS)")
  width = -(-int(lengths.max()) // multiple) * multiple
  tokens = np.full((len(lengths), width), pad_id, np.int32)
  for i, p in enumerate(prompt_tokens):
    tokens[i, :len(p)] = p
  return tokens, lengths


def batch_buckets(batch: int, multiple: int = 1, smallest: int = 8) -> tuple[int, ...]:
  """The compiled batch sizes of one generate call: `batch`, then halves (multiples of `multiple`) down to about
  `smallest`. Each size compiles one decode loop, so a call compiles at most len(...) loops."""
  sizes = [batch]
  while True:
    half = -(-(sizes[-1] // 2) // multiple) * multiple
    if half >= sizes[-1] or half < max(smallest, multiple):
      return tuple(sizes)
    sizes.append(half)


def row_bytes(model: CausalLM, max_len: int) -> int:
  """Device bytes one decode row holds: its K and V cache over `max_len` slots, and ~8 f32 [V] buffers of logits
  and sampling temporaries."""
  cfg = model.config
  itemsize = jnp.dtype(model.model.dtype).itemsize
  return 2 * cfg.num_layers * cfg.num_kv_heads * max_len * cfg.head_dim * itemsize + 8 * 4 * cfg.vocab_size


def free_bytes() -> int:
  """Memory a decode batch may take: half of the first device's free memory on an accelerator (memory_stats), half
  of the host's available memory on CPU."""
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)) // 2
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"] // 2
  except (OSError, KeyError, ValueError):
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) // 2


def choose_batch_size(model: CausalLM, max_len: int, *, max_rows: int, multiple: int = 1, probe: bool = True,
                      gain: float = 1.1, steps: int = 3) -> tuple[int, dict[int, float]]:
  """The decode batch for rows of up to `max_len` slots: the largest power-of-two multiple of `multiple` that fits
  `free_bytes()` and `max_rows`; with `probe`, the smallest size whose measured decode step rate (rows/s over
  `steps` steps, after one compiling step) is not beaten by `gain` x by the next size up. Returns (batch,
  {size: rows/s probed}). A bigger batch than the rate needs only makes rows wait for the slowest row.
  """
  cap = max(multiple, min(free_bytes() // row_bytes(model, max_len), -(-max_rows // multiple) * multiple))
  sizes = [multiple]
  while sizes[-1] * 2 <= cap:
    sizes.append(sizes[-1] * 2)
  if not probe or len(sizes) == 1:
    return sizes[-1], {}
  graphdef, state = nnx.split(model)
  layer_weights = per_layer_weights(model)
  rates: dict[int, float] = {}
  for size in sizes:
    cache = init_cache(model, size, max_len)
    cache = cache.replace(index=jnp.full((size,), max_len // 2, jnp.int32))  # a typical attention length
    token = jnp.zeros((size,), jnp.int32)
    logits, cache = decode_step_split(graphdef, state, cache, token, layer_weights)  # compile
    jax.block_until_ready(logits)
    t0 = time.perf_counter()
    for _ in range(steps):
      logits, cache = decode_step_split(graphdef, state, cache, token, layer_weights)
    jax.block_until_ready(logits)
    rates[size] = size * steps / (time.perf_counter() - t0)
    if size > sizes[0] and rates[size] < gain * rates[size // 2]:
      return size // 2, rates
  return sizes[-1], rates


# Continuous batching off by default: on 2 CPU cores it measured 1.01x (128 rows, EOS, top-p 0.95) and 0.99x (the arith
# experiment's 120 rows) against batches run one after another with compaction (bench/decode.py --chunk 64,
# bench/RESULTS.md): compaction already drops most finished rows, and a full 64-row step costs more per row than the
# compacted ones. The samples are the same either way; True turns it on.
REFILL = False


def prefill_sizes(batch: int, multiple: int = 1) -> tuple[int, ...]:
  """The compiled prefill batches of continuous batching: `multiple` x powers of two below `batch`, and `batch`
  (the distinct prompts of one admission are padded to the next; each size compiles one `admit` per width)."""
  sizes = [multiple]
  while sizes[-1] * 2 < batch:
    sizes.append(sizes[-1] * 2)
  return tuple(dict.fromkeys(sizes + [batch]))


def generate(model: CausalLM, prompt_tokens: Sequence[Sequence[int]], *, max_new_tokens: int, key: jax.Array,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_ids: Sequence[int] = (),
             pad_id: int = 0, prompt_multiple: int = 8, row_ids: Sequence[int] | None = None,
             batch_size: int | None = None, batch_multiple: int = 1, compact: bool = True, refill: bool = REFILL,
             refill_rows: int = 0) -> GenerateOutput:
  """Sample up to `max_new_tokens` per prompt row (rows may differ in prompt length); stops each row at an EOS id.

  `batch_size` slots (default: every row, rounded up to `batch_multiple`) decode at once. Continuous batching
  (`refill`, off by default: see REFILL; with more rows than slots): once `refill_rows` slots (default batch / 8) have finished, the next waiting
  rows take them -- their distinct prompts prefilled (`admit`, padded to a size of `prefill_sizes` and to a multiple
  of `prompt_multiple` tokens), the rest of the batch untouched -- so the batch stays full until the rows run out.
  Without `refill`, batches of `batch_size` rows run one after another. Prefix sharing: equal prompts admitted
  together are prefilled once. With `compact`, once no row waits and at most half the slots still run, the running
  rows move into the next smaller size of `batch_buckets`.

  Row r samples its n-th token with key fold_in(fold_in(key, row_ids[r]), n) (row_ids default: r), so its tokens do
  not depend on the batch size, the rows beside it, or when it was admitted (up to matmul rounding). Compiles: one
  decode loop per batch size used, one `admit` per (prefill size, prompt width) used, one `take_rows` per compaction.
  """
  if not isinstance(model, CausalLM):
    raise TypeError(f"generate needs a CausalLM, got {type(model).__name__}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  tokens, lengths = pad_prompts(prompt_tokens, pad_id, prompt_multiple)
  n = len(lengths)
  batch = batch_size or -(-n // batch_multiple) * batch_multiple
  if batch < 1 or batch % batch_multiple:
    raise ValueError(f"batch_size={batch} must be a positive multiple of batch_multiple={batch_multiple}")
  rows = np.arange(n, dtype=np.int32) if row_ids is None else np.asarray(row_ids, np.int32)
  if rows.shape != (n,):
    raise ValueError(f"row_ids needs one id per prompt row ({n}), got shape {rows.shape}")
  kw = dict(max_new_tokens=max_new_tokens, key=key, temperature=temperature, top_p=top_p, top_k=top_k,
            eos_ids=eos_ids, pad_id=pad_id, prompt_multiple=prompt_multiple, batch_size=batch,
            batch_multiple=batch_multiple, compact=compact)
  if not refill and n > batch:  # one batch after another
    outs = [generate(model, prompt_tokens[i:i + batch], row_ids=rows[i:i + batch], refill=False, **kw)
            for i in range(0, n, batch)]
    return GenerateOutput(tokens=jnp.concatenate([o.tokens for o in outs]),
                          lengths=jnp.concatenate([o.lengths for o in outs]))
  sizes = batch_buckets(batch, batch_multiple) if compact else (batch,)
  size = min(s for s in sizes if s >= min(n, batch))
  p_sizes = prefill_sizes(size, batch_multiple)
  refill_rows = min(refill_rows or max(batch_multiple, batch // 8), size)
  first: dict[bytes, int] = {}
  src = np.array([first.setdefault(tokens[i].tobytes() + lengths[i].tobytes(), len(first)) for i in range(n)],
                 np.int32)  # row -> its distinct prompt
  holder = np.zeros(len(first), np.int32)
  holder[src[::-1]] = np.arange(n - 1, -1, -1, dtype=np.int32)  # distinct prompt -> its first row

  graphdef, state = nnx.split(model)
  layer_weights = per_layer_weights(model)
  cache = init_cache(model, size, tokens.shape[1] + max_new_tokens)
  carry = (jnp.zeros((size, model.config.vocab_size), jnp.float32), jnp.ones((size,), bool),
           jnp.full((size, max_new_tokens), pad_id, jnp.int32), jnp.zeros((size,), jnp.int32),
           jnp.zeros((size,), jnp.int32))
  where = np.full(size, -1)  # batch slot -> prompt row (-1: free)
  waiting = 0  # rows [waiting, n) wait for a slot
  out_tokens = np.full((n, max_new_tokens), pad_id, np.int32)
  out_lengths = np.zeros((n,), np.int32)
  static = (int(max_new_tokens), float(temperature), int(top_k), float(top_p), tuple(int(e) for e in eos_ids),
            int(pad_id))
  while True:
    free = np.flatnonzero(where < 0)
    if waiting < n and free.size:
      new = np.arange(waiting, waiting + min(free.size, n - waiting))
      waiting += new.size
      uniq, inv = np.unique(src[new], return_inverse=True)
      d = min(s for s in p_sizes if s >= uniq.size)
      width = min(-(-int(lengths[new].max()) // prompt_multiple) * prompt_multiple, tokens.shape[1])
      pick = np.pad(holder[uniq], (0, d - uniq.size), mode="edge")
      pad = lambda a, fill: np.concatenate([a, np.full(size - a.size, fill, np.int32)]).astype(np.int32)
      cache, carry = admit(graphdef, state, cache, carry, init_cache(model, d, width),
                           jnp.asarray(tokens[pick, :width]), jnp.asarray(lengths[pick]), jnp.asarray(pad(inv, 0)),
                           jnp.asarray(pad(free[:new.size], size)), jnp.asarray(pad(rows[new], 0)), layer_weights,
                           int(pad_id))
      where[free[:new.size]] = new
    smaller = [s for s in sizes if s < size]
    stop_at = size - min(refill_rows, n - waiting) if waiting < n else (smaller[0] if smaller else 0)
    carry, cache = generate_loop(graphdef, state, cache, carry, key, layer_weights, jnp.int32(stop_at), *static)
    finished = np.asarray(carry[1]) & (where >= 0)  # rows that leave the batch now: their output is final
    if finished.any():
      out_tokens[where[finished]] = np.asarray(carry[2])[finished]
      out_lengths[where[finished]] = np.asarray(carry[3])[finished]
      where[finished] = -1
    live = np.flatnonzero(where >= 0)
    if waiting < n:
      continue
    if not live.size:
      break
    if smaller and live.size <= smaller[0]:
      size = min(s for s in sizes if s >= live.size)
      keep = np.concatenate([live, np.flatnonzero(where < 0)[:size - live.size]])  # free slots keep the shape
      cache, carry = take_rows(cache, carry, jnp.asarray(keep))
      where = where[keep]
  return GenerateOutput(tokens=jnp.asarray(out_tokens), lengths=jnp.asarray(out_lengths))
