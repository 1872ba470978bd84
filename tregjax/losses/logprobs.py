"""Per-token log-probabilities, with a chunked path that never holds [B, T, V] float32 logits.

The token -> sequence reduction (sum for DPO-style losses, mean for SimPO) lives here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tregjax.losses import _checks


def _gather_logps(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """log_softmax(logits)[labels] in float32, without materialising the full log-softmax twice."""
  logits = _checks.as_float(logits)
  label_logits = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return label_logits - jax.nn.logsumexp(logits, axis=-1)


def token_logps(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """log π(labels[b, t] | ·) from full logits [B, T, V]; float32 [B, T].

  Labels are the next tokens (labels[t] = tokens[t + 1]); pair with a mask to ignore prompt and padding positions.
  """
  _checks.check_rank("logits", logits, 3, "[B, T, V]")
  _checks.check_integer("labels", labels)
  if jnp.shape(labels) != jnp.shape(logits)[:2]:
    raise ValueError(f"labels shape {jnp.shape(labels)} must equal logits[B, T] = {jnp.shape(logits)[:2]}")
  return _gather_logps(logits, labels)


def chunked_token_logps(hidden: jax.Array,
                        labels: jax.Array,
                        unembed: Callable[[jax.Array], jax.Array],
                        *,
                        chunk_size: int = 128) -> jax.Array:
  """`token_logps(unembed(hidden), labels)` computed at most `chunk_size` positions at a time; float32 [B, T].

  A `lax.scan` over time chunks whose body is rematerialised (`jax.checkpoint`), so neither the forward nor the
  backward pass holds more than one [B, chunk_size, V] slice of logits: the backward recomputes each chunk's logits
  from the (already resident) hidden states. `unembed` maps [..., D] to logits [..., V] and applies any final
  soft-capping; it may close over model parameters (their gradients flow through the scan).
  The ceil(T / chunk_size) chunks are of equal size ceil(T / chunks), so padding is under one position per chunk:
  chunks of `chunk_size` itself padded T = 168 to 256 at chunk_size 128, 52% more work in the LM head's four
  matmuls (forward, recompute, two gradients), the largest of SmolLM2's step.
  """
  _checks.check_rank("hidden", hidden, 3, "[B, T, D]")
  _checks.check_integer("labels", labels)
  batch, length, width = hidden.shape
  if jnp.shape(labels) != (batch, length):
    raise ValueError(f"labels shape {jnp.shape(labels)} must equal hidden[B, T] = {(batch, length)}")
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  num_chunks = -(-length // min(chunk_size, length))
  chunk_size = -(-length // num_chunks)
  pad = num_chunks * chunk_size - length
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)))
  hidden_chunks = hidden.reshape(batch, num_chunks, chunk_size, width).swapaxes(0, 1)
  label_chunks = labels.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(h_chunk, l_chunk):
    return _gather_logps(unembed(h_chunk), l_chunk)

  def body(carry, chunk):
    return carry, one_chunk(*chunk)

  _, logps = jax.lax.scan(body, None, (hidden_chunks, label_chunks))
  return logps.swapaxes(0, 1).reshape(batch, num_chunks * chunk_size)[:, :length]


def model_token_logps(model: Any, tokens: jax.Array, labels: jax.Array, *, chunk_size: int,
                      **forward: jax.Array | None) -> jax.Array:
  """log π(labels | tokens) of a model with `hidden_states` and `unembed` (tregjax.models' causal LMs); float32
  [B, T], through `chunked_token_logps`. `forward`: keyword arguments of `model.hidden_states` (positions,
  segment_ids, ...). The one place the training step, the scoring pass and the demo get their token log-probs."""
  hidden = model.hidden_states(tokens, **forward)
  return chunked_token_logps(hidden, labels, model.unembed, chunk_size=chunk_size)


def next_token_labels(tokens: jax.Array, pad_id: int) -> jax.Array:
  """labels[:, t] = tokens[:, t + 1], the last position `pad_id` (mask it)."""
  return jnp.concatenate([tokens[:, 1:], jnp.full_like(tokens[:, :1], pad_id)], axis=1)


def sequence_logps(token_logps: jax.Array, mask: jax.Array, *, average: bool = False) -> jax.Array:
  """Σ_t mask·log π (DPO) or its mean over the mask (SimPO's length-normalised log-likelihood); float32 [B]."""
  _checks.check_rank("token_logps", token_logps, 2, "[B, T]")
  _checks.check_same_shape(token_logps=token_logps, mask=mask)
  token_logps = _checks.as_float(token_logps)
  mask = jnp.asarray(mask).astype(bool)
  total = jnp.sum(jnp.where(mask, token_logps, 0.0), axis=-1)
  if average:
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(total.dtype)
  return total
