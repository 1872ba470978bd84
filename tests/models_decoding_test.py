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
