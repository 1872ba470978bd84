"""KV-cache decoding against a naive golden: re-running the full forward pass on the growing sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tregjax import models
from tregjax.models import decoding

PROMPTS = [[5, 9, 13, 2, 7, 11, 3], [100, 3], [42, 8, 1, 77]]
NEW = 10


def _make(**overrides):
  # Random N(0, 0.02) weights give near-uniform logits; scale them up so argmax is well separated.
  m = models.from_config(models.ModelConfig.tiny_llama(**overrides), 0)
  nnx.update(m, jax.tree.map(lambda x: x * 12.0, nnx.state(m, nnx.Param)))
  return m


@pytest.fixture(scope="module")
def model():
  """Sliding window 4, shorter than prompt + new tokens: the cache must apply the window too."""
  return _make(model_type="mistral", sliding_window=4)


@pytest.fixture(scope="module")
def global_model():
  return _make()


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def _naive_greedy(model, prompt, n):
  """Full forward on the growing sequence, right-padded to one width (causal: padding never affects it)."""
  seq = list(prompt)
  width = len(prompt) + n
  for _ in range(n):
    padded = jnp.asarray([seq + [0] * (width - len(seq))])
    seq.append(int(np.argmax(np.asarray(_logits(model, padded))[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize("which", ["model", "global_model"])
def test_greedy_equals_repeated_full_forward_argmax(which, request):
  model = request.getfixturevalue(which)
  out = decoding.generate(model, PROMPTS, max_new_tokens=NEW, key=jax.random.key(0))
  for row, prompt in enumerate(PROMPTS):
    assert np.asarray(out.tokens[row]).tolist() == _naive_greedy(model, prompt, NEW)
  assert np.asarray(out.lengths).tolist() == [NEW] * len(PROMPTS)


def test_mixed_length_batch_equals_each_row_alone(model):
  key = jax.random.key(3)
  batch = np.asarray(decoding.generate(model, PROMPTS, max_new_tokens=NEW, key=key).tokens)
  for row, prompt in enumerate(PROMPTS):
    alone = decoding.generate(model, [prompt], max_new_tokens=NEW, key=key)
    assert np.asarray(alone.tokens[0]).tolist() == batch[row].tolist()


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked_weights", "per_layer_weights"])
def test_prefill_and_decode_step_logits_equal_full_forward(model, per_layer):
  tokens, lengths = decoding.pad_prompts(PROMPTS)
  cache = decoding.init_cache(model, len(PROMPTS), tokens.shape[1] + 3)
  layer_weights = decoding.per_layer_weights(model) if per_layer else None
  assert (layer_weights is not None) == per_layer  # CPU: generate() takes the per-layer path
  logits, cache = decoding.prefill(model, cache, tokens, lengths, layer_weights)
  nxt = np.array([4, 5, 6])
  step_logits, cache = decoding.decode_step(model, cache, nxt, layer_weights)
  for row, prompt in enumerate(PROMPTS):
    seq = prompt + [int(nxt[row])]
    full = np.asarray(_logits(model, jnp.asarray([seq + [0] * (12 - len(seq))])))[0]
    np.testing.assert_allclose(np.asarray(logits[row]), full[len(prompt) - 1], atol=1e-4)
    np.testing.assert_allclose(np.asarray(step_logits[row]), full[len(prompt)], atol=1e-4)
  assert np.asarray(cache.index).tolist() == [len(p) + 1 for p in PROMPTS]


def test_temperature_to_zero_equals_greedy(model):
  greedy = decoding.generate(model, PROMPTS, max_new_tokens=NEW, key=jax.random.key(0))
  cold = decoding.generate(model, PROMPTS, max_new_tokens=NEW, key=jax.random.key(7), temperature=1e-6)
  top1 = decoding.generate(model, PROMPTS, max_new_tokens=NEW, key=jax.random.key(7), temperature=1.5, top_k=1)
  np.testing.assert_array_equal(np.asarray(cold.tokens), np.asarray(greedy.tokens))
  np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))


def test_each_row_stops_at_its_eos(model):
  greedy = np.asarray(decoding.generate(model, PROMPTS, max_new_tokens=NEW, key=jax.random.key(0)).tokens)
  eos = int(greedy[0, 2])  # row 0 emits it at step 2 (other rows may too, at their first occurrence)
  out = decoding.generate(model, PROMPTS, max_new_tokens=NEW, key=jax.random.key(0), eos_ids=(eos,), pad_id=-1)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(greedy[row] == eos)
    stop = int(hits[0]) + 1 if hits.size else NEW
    assert lengths[row] == stop
    assert tokens[row, :stop].tolist() == greedy[row, :stop].tolist()
    assert (tokens[row, stop:] == -1).all()


def test_top_k_and_top_p_only_sample_allowed_tokens():
  logits = jax.random.normal(jax.random.key(0), (2, 50))
  keys = jax.random.split(jax.random.key(1), 400)
  top_k = np.asarray(jax.vmap(lambda k: decoding.sample_logits(logits, k, temperature=1.0, top_k=5))(keys))
  top_p = np.asarray(jax.vmap(lambda k: decoding.sample_logits(logits, k, temperature=1.0, top_p=0.6))(keys))
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  for row in range(2):
    order = np.argsort(-probs[row])
    assert set(top_k[:, row]) <= set(order[:5].tolist())
    # Nucleus: the smallest prefix of the sorted vocabulary whose mass reaches 0.6.
    nucleus = order[:int(np.searchsorted(np.cumsum(probs[row][order]), 0.6) + 1)]
    assert 1 < len(nucleus) < 50
    assert set(top_p[:, row]) <= set(nucleus.tolist())
    assert len(set(top_p[:, row])) > 1 and len(set(top_k[:, row])) > 1  # it samples, not just argmax


def _allowed_probs(logits, temperature, top_k=0, top_p=1.0):
  """numpy golden: softmax(logits / T) cut to the top-k logits and to the smallest sorted top-p prefix (ties at
  either boundary kept)."""
  x = np.asarray(logits, np.float64) / temperature
  p = np.exp(x - x.max())
  if top_k:
    p = np.where(x >= np.sort(x)[::-1][top_k - 1], p, 0.0)
  p /= p.sum()
  if top_p < 1.0:
    order = np.argsort(-p, kind="stable")
    k = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    p = np.where(p >= p[order[k - 1]], p, 0.0)
    p /= p.sum()
  return p


def _assert_frequencies(samples, probs, what):
  """Pearson chi-square at the 1e-4 level over cells with >= 5 expected counts (the rest pooled), and nothing
  sampled where the golden probability is 0."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  n = len(samples)
  counts = np.bincount(samples, minlength=len(probs))
  assert counts[probs == 0].sum() == 0, f"{what}: sampled a token outside the allowed set"
  big = probs * n >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(probs[big] * n, probs[~big].sum() * n)
  obs, exp = obs[exp > 0], exp[exp > 0]
  chi2 = float(((obs - exp) ** 2 / exp).sum())
  assert chi2 < stats.chi2.ppf(1 - 1e-4, len(obs) - 1), f"{what}: chi2 {chi2:.1f} over {len(obs) - 1} dof"


@pytest.mark.parametrize("kw", [dict(temperature=0.8), dict(temperature=0.8, top_p=0.9),
                                dict(temperature=1.0, top_k=7), dict(temperature=1.3, top_k=40, top_p=0.6),
                                dict(temperature=0.8, top_p=0.9, candidate_blocks=0, candidates=0),
                                dict(temperature=0.8, top_p=0.9, candidate_blocks=0, candidates=8, fallback_rows=3),
                                dict(temperature=0.8, top_p=0.9, candidate_blocks=0, candidates=8, fallback_rows=1)],
                         ids=["full", "top_p", "top_k", "top_k_top_p", "top_p_full_path", "top_p_candidates",
                              "top_p_candidates_all_fall_back"])
def test_sampled_frequencies_equal_exact_probabilities(kw):
  """sample_logits' top-p paths against exact numpy probabilities: candidate blocks (2 of 256 tokens), top_k
  candidates (8 tokens; the rows that miss them gathered for the full path, or -- more of them than fallback_rows --
  the whole batch) and the full-vocabulary path (snapping-bisection nucleus, two-level inverse CDF). Rows: a flat row
  (nucleus far beyond the candidates: fallback), a peaked row (six likely tokens: inside 2 blocks, beyond 8 tokens'
  mass), a row with a 90-way tie at its top spread over blocks (fallback), and a very peaked row (4 tokens: every
  candidate path holds its nucleus)."""
  rng = np.random.default_rng(0)
  v, n = 2900, 6000  # 12 blocks of 256 (the last one partial), 2 candidate blocks
  kw = dict(kw, candidate_blocks=kw.get("candidate_blocks", 2))
  peaked = rng.normal(size=v)
  peaked[3:9] += 6.0  # six likely tokens, all in block 0: the nucleus lies in the candidates
  sharp = rng.normal(size=v)
  sharp[[40, 700, 1500, 2800]] += 14.0
  logits = np.stack([rng.normal(size=v) * 0.3, peaked, np.where(np.arange(v) % 32 == 0, 2.0, rng.normal(size=v)),
                     sharp]).astype(np.float32)
  keys = decoding.row_keys(jax.random.key(5), jnp.arange(n))
  rows = jnp.arange(len(logits))
  draw = jax.jit(jax.vmap(lambda k: decoding.sample_logits(
      jnp.asarray(logits), jax.vmap(lambda r: jax.random.fold_in(k, r))(rows), **kw)))
  samples = np.asarray(draw(keys))
  if kw.get("candidates"):  # vocabulary order inside the candidates: the full path's token for the same u
    full = jax.jit(jax.vmap(lambda k: decoding.sample_logits(
        jnp.asarray(logits), jax.vmap(lambda r: jax.random.fold_in(k, r))(rows), **dict(kw, candidates=0))))
    assert (np.asarray(full(keys)) == samples).mean() > 0.999  # float rounding may move a boundary draw
  for row in range(len(logits)):
    golden = _allowed_probs(logits[row], kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0))
    _assert_frequencies(samples[:, row], golden, f"{kw} row {row}")


def test_first_sampled_token_frequencies_equal_full_forward_probabilities(global_model):
  """One prompt x 3000 sample rows through generate (prefix sharing: one prefill, cache copied to every row): the
  first tokens' frequencies against softmax / nucleus of the full (uncached) forward's logits."""
  prompt, n = [5, 9, 13, 2], 3000
  model = _make()
  nnx.update(model, jax.tree.map(lambda x: x / 12.0 * 1.5, nnx.state(model, nnx.Param)))  # a spread distribution
  out = decoding.generate(model, [prompt] * n, max_new_tokens=1, key=jax.random.key(11), temperature=0.9, top_p=0.8)
  full = np.asarray(_logits(model, jnp.asarray([prompt])))[0, -1]
  probs = _allowed_probs(full, 0.9, top_p=0.8)
  assert (probs > 0).sum() > 5  # a real distribution, not nearly greedy
  _assert_frequencies(np.asarray(out.tokens)[:, 0], probs, "generate's first token")


def test_rows_are_independent_of_batch_and_compaction(model):
  """Per-row keys: a row's samples are the same alone (with its row id), in a bigger batch with fillers, and with
  finished-row compaction on or off; compaction compiles at most one loop per size of batch_buckets."""
  prompts = [PROMPTS[i % 3] for i in range(12)]
  kw = dict(max_new_tokens=NEW, key=jax.random.key(4), temperature=1.0, pad_id=-1)
  free = np.asarray(decoding.generate(model, prompts, **kw).tokens)
  eos = int(np.bincount(free[:, :4][free[:, :4] >= 0]).argmax())  # a token many rows sample early
  kw["eos_ids"] = (eos,)
  before = decoding.generate_loop._cache_size()  # pylint: disable=protected-access
  compacted = decoding.generate(model, prompts, batch_size=32, **kw)
  compiled = decoding.generate_loop._cache_size() - before  # pylint: disable=protected-access
  plain = decoding.generate(model, prompts, batch_size=32, compact=False, **kw)
  np.testing.assert_array_equal(np.asarray(compacted.tokens), np.asarray(plain.tokens))
  np.testing.assert_array_equal(np.asarray(compacted.lengths), np.asarray(plain.lengths))
  lengths = np.asarray(plain.lengths)
  assert lengths.min() < NEW and lengths.max() == NEW  # some rows stopped early, so compaction had work to do
  assert 1 <= compiled <= len(decoding.batch_buckets(32))
  for row in (0, 7, 11):
    alone = decoding.generate(model, [prompts[row]], row_ids=[row], **kw)
    assert np.asarray(alone.tokens)[0].tolist() == np.asarray(plain.tokens)[row].tolist()


def test_continuous_batching_samples_what_one_batch_samples(model):
  """More rows than slots: finished rows' slots go to waiting rows (their prompts prefilled into the freed cache
  slots), and every row still samples token-for-token what it samples in one batch of all rows, and in batches run
  one after another -- with rows ending at different steps. Compiles: one decode loop per batch size, one admit per
  prefill size (one prompt width here), no compaction gather."""
  prompts = [PROMPTS[i % 3] for i in range(12)]
  kw = dict(max_new_tokens=NEW, key=jax.random.key(4), temperature=1.0, pad_id=-1)
  free = np.asarray(decoding.generate(model, prompts, **kw).tokens)
  kw["eos_ids"] = (int(free[0, 3]), int(free[1, 4]))  # row 0 ends by step 4, row 1 by step 5, some rows run on
  plain = decoding.generate(model, prompts, batch_size=32, compact=False, **kw)
  jitted = (decoding.generate_loop, decoding.admit, decoding.take_rows)
  before = [f._cache_size() for f in jitted]  # pylint: disable=protected-access
  refilled = decoding.generate(model, prompts, batch_size=4, refill=True, **kw)
  compiled = [f._cache_size() - b for f, b in zip(jitted, before)]  # pylint: disable=protected-access
  waves = decoding.generate(model, prompts, batch_size=4, refill=False, **kw)
  lengths = np.asarray(plain.lengths)
  assert len(set(lengths.tolist())) >= 3 and lengths.max() == NEW, lengths  # EOS at different steps, and none
  for other in (refilled, waves):
    np.testing.assert_array_equal(np.asarray(other.tokens), np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(other.lengths), lengths)
  assert compiled[0] <= len(decoding.batch_buckets(4)) and compiled[2] == 0
  assert 1 <= compiled[1] <= len(decoding.prefill_sizes(4)) == 3


def test_batch_size_fits_memory_and_probe(global_model):
  """row_bytes counts the cache arrays init_cache allocates; the chosen batch is a power-of-two multiple of
  `multiple` within max_rows; the probe measures each size it tries."""
  cache = decoding.init_cache(global_model, 1, 40)
  extra = decoding.row_bytes(global_model, 40) - (cache.k.nbytes + cache.v.nbytes)
  assert extra == 8 * 4 * global_model.config.vocab_size
  assert decoding.choose_batch_size(global_model, 40, max_rows=20, multiple=4, probe=False) == (16, {})
  assert decoding.choose_batch_size(global_model, 40, max_rows=3, multiple=4, probe=False) == (4, {})
  batch, rates = decoding.choose_batch_size(global_model, 40, max_rows=16, multiple=2)
  assert batch in (2, 4, 8, 16) and set(rates) <= {2, 4, 8, 16} and batch in rates and all(r > 0 for r in rates.values())


def test_per_layer_copies_only_when_they_fit_in_free_memory(model, monkeypatch):
  """The per-layer copy doubles the layer weights for the whole call: skipped when free memory cannot hold it, and
  the stacked path samples the same greedy tokens."""
  copied = np.asarray(decoding.generate(model, PROMPTS, max_new_tokens=NEW, key=jax.random.key(0)).tokens)
  monkeypatch.setattr(decoding, "free_bytes", lambda: 1024)
  assert decoding.per_layer_weights(model) is None
  stacked = np.asarray(decoding.generate(model, PROMPTS, max_new_tokens=NEW, key=jax.random.key(0)).tokens)
  np.testing.assert_array_equal(stacked, copied)
  monkeypatch.setattr(decoding, "free_bytes", lambda: 1 << 40)
  assert decoding.per_layer_weights(model) is not None
