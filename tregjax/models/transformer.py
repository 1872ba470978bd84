"""Decoder backbone, causal-LM and reward-model heads.

The backbone mirrors HF's `model.*` subtree (embed_tokens, layers, norm), so the HF name table is a short list of
patterns. All L layers live in one `DecoderLayer` whose parameters carry a leading `layers` axis; the forward runs
them with `jax.lax.scan` (or a Python loop when `scan_layers=False`, only for comparison), with an optional remat
policy around each layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tregjax import parallel
from tregjax.models import layers
from tregjax.models.config import ModelConfig

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Backbone(nnx.Module):
  """Embedding, the stacked decoder layers and the final norm (HF `model.*`)."""

  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.embed_tokens = layers.param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
    self.layers = layers.DecoderLayer(cfg, param_dtype=param_dtype, num_stacked=cfg.num_layers, rngs=rngs)
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=cfg.norm_offset,
                               param_dtype=param_dtype, rngs=rngs)

  def embed(self, tokens: jax.Array) -> jax.Array:
    x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)
    if self.cfg.scale_embeddings:  # Gemma: sqrt(hidden) rounded to the compute dtype, as HF does
      x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), self.dtype)
    return parallel.constrain(x, ("batch", "length", "act_embed"))

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states [B, T, D] in the compute dtype."""
    b, t = tokens.shape
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = index if positions is None else positions
    segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    mask = layers.attention_mask(segment_ids, segment_ids, index, index)
    x, _ = self.run_layers(self.embed(tokens), positions, mask, index, index, dropout_key=dropout_key)
    return self.norm(x)

  def run_layers(self, x: jax.Array, positions: jax.Array, mask: jax.Array, q_index: jax.Array,
                 kv_index: jax.Array, cache: tuple[jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | None = None, per_layer_state: Sequence[nnx.State] | None = None,
                 dropout_key: jax.Array | None = None):
    """Apply all layers -> (x, cache); `cache` is (k, v) stacked [L, B, K, S, H], carried through the layer
    loop and returned with the new tokens written (None without a cache). `dropout_key` (training steps of a LoRA
    run with dropout) gives layer i the key fold_in(dropout_key, i).

    `per_layer_state` (from `unstack_layers`) runs an unrolled loop over separate per-layer weight buffers instead
    of slicing the stacked ones: on XLA:CPU every slice of a stacked weight is a copy, which tripled the memory
    traffic of a batch-8 decode step (weight-bandwidth bound)."""
    cfg = self.cfg
    rope = layers.rope_angles(positions, layers.rope_inv_freq(cfg))
    # Gemma 3: sliding-window layers rotate with their own base; pick per layer inside the scan.
    local_rope = None
    if cfg.rope_local_theta is not None:
      local_rope = layers.rope_angles(positions, layers.rope_inv_freq(cfg, local=True))
    impl = layers.resolve_attention_impl(cfg, self.dtype)
    if cache is not None and impl == "cudnn":
      impl = "xla"  # one-token decode steps against a long cache: the flash kernel buys nothing there
    windows = jnp.asarray(cfg.layer_windows(), jnp.int32)
    graphdef, state = nnx.split(self.layers)

    def body(carry, xs):
      x, kv = carry
      layer_state, window, index = xs
      layer = nnx.merge(graphdef, layer_state)
      layer_mask = mask & layers.window_mask(q_index, kv_index, window) if any(cfg.layer_windows()) else mask
      cos, sin = rope
      if local_rope is not None:
        cos, sin = (jnp.where(window > 0, a, b) for a, b in zip(local_rope, rope))
      layer_cache = None if kv is None else (*kv, index)
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
      x, kv = layer(x, cos, sin, layer_mask, impl=impl, cache=layer_cache, cache_index=cache_index,
                    dropout_key=key)
      return (x, kv), None

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    carry = (x, cache)
    xs = (state, windows, jnp.arange(cfg.num_layers, dtype=jnp.int32))
    if per_layer_state is not None:
      for i, layer_state in enumerate(per_layer_state):
        carry, _ = body(carry, (layer_state, windows[i], jnp.int32(i)))
    elif cfg.scan_layers:
      carry, _ = jax.lax.scan(body, carry, xs)
    else:
      for layer_xs in _split_layers(xs, cfg.num_layers):
        carry, _ = body(carry, layer_xs)
    return carry

  def unstack_layers(self) -> list[nnx.State]:
    """The stacked layer weights as L separate per-layer states (new buffers) for `run_layers(per_layer_state=)`."""
    _, state = nnx.split(self.layers)
    return _unstack(state, self.cfg.num_layers)


def _split_layers(tree: Any, num_layers: int) -> list[Any]:
  """The stacked [L, ...] leaves of `tree` as L per-layer trees, through one `lax.split` per leaf.

  Not `a[i]`: the transpose of L slices is L zero-padded [L, ...] gradients summed, which XLA:CPU fused into one
  pass that evaluates all L pads per element (0.76 s of a 10.3 s SmolLM2 training step, bench/RESULTS.md
  `train_step_profile_smollm2_cpu_before`); the transpose of a split is one concatenate.
  """
  leaves, treedef = jax.tree.flatten(tree)
  pieces = [jax.lax.split(a, (1,) * num_layers, axis=0) for a in leaves]
  return [treedef.unflatten([jnp.squeeze(p[i], 0) for p in pieces]) for i in range(num_layers)]


_unstack = jax.jit(_split_layers, static_argnums=1)  # one dispatch for the decoder's per-layer copies


class CausalLM(nnx.Module):
  """A decoder-only language model (HF *ForCausalLM)."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = cfg
    self.model = Backbone(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)

  def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
    """[B, T, D] after the final norm, in the compute dtype; `dropout_key` turns on LoRA dropout (training)."""
    return self.model(tokens, positions=positions, segment_ids=segment_ids, dropout_key=dropout_key)

  def unembed(self, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V] (tied or untied head, Gemma 2 final soft-capping)."""
    cfg = self.config
    h = hidden.astype(self.model.dtype)
    if cfg.tie_word_embeddings:
      logits = jnp.einsum("...d,vd->...v", h, self.model.embed_tokens[...].astype(h.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(h.dtype), preferred_element_type=jnp.float32)
    if cfg.final_logit_softcapping:
      cap = cfg.final_logit_softcapping
      logits = cap * jnp.tanh(logits / cap)
    return logits

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """float32 logits [B, T, V]. Training/scoring should use hidden_states + chunked log-probs instead."""
    logits = self.unembed(self.hidden_states(tokens, positions=positions, segment_ids=segment_ids))
    return parallel.constrain(logits, ("batch", "length", "act_vocab"))


class RewardModel(nnx.Module):
  """HF *ForSequenceClassification: a linear `score` head on the backbone, read at every position or the last."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if cfg.num_labels < 1:
      raise ValueError("RewardModel needs cfg.num_labels >= 1")
    self.config = cfg
    self.model = Backbone(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.score = layers.param(rngs, (cfg.hidden_size, cfg.num_labels), ("embed", "classes"), param_dtype)

  def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    return self.model(tokens, positions=positions, segment_ids=segment_ids)

  def scores(self, tokens: jax.Array, *, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None) -> jax.Array:
    """float32 scores at every position: [B, T] (num_labels == 1) or [B, T, C]."""
    h = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids)
    out = jnp.einsum("btd,dc->btc", h, self.score[...].astype(h.dtype), preferred_element_type=jnp.float32)
    return out[..., 0] if self.config.num_labels == 1 else out

  def sequence_scores(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None) -> jax.Array:
    """Score at the last non-padding token (segment_ids != 0) of each row: [B] (or [B, C])."""
    per_position = self.scores(tokens, positions=positions, segment_ids=segment_ids)
    t = tokens.shape[1]
    if segment_ids is None:
      last = jnp.full((tokens.shape[0],), t - 1)
    else:
      last = jnp.max(jnp.where(segment_ids != 0, jnp.arange(t), 0), axis=1)
    return jnp.take_along_axis(per_position, last.reshape((-1,) + (1,) * (per_position.ndim - 1)), axis=1)[:, 0]

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    return self.scores(tokens, positions=positions, segment_ids=segment_ids)


Model = CausalLM | RewardModel


def model_class(cfg: ModelConfig) -> type:
  return RewardModel if cfg.is_reward_model else CausalLM


def from_config(cfg: ModelConfig, rngs: nnx.Rngs | int = 0, *, dtype: Any = jnp.float32,
                param_dtype: Any = jnp.float32) -> Model:
  """Random init (HF-style N(0, 0.02)); a RewardModel when `cfg.num_labels > 0`."""
  if isinstance(rngs, int):
    rngs = nnx.Rngs(rngs)
  return model_class(cfg)(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def abstract_model(cfg: ModelConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Model:
  """Shapes/dtypes/metadata only (no allocation): the target for streaming imports."""
  return nnx.eval_shape(lambda: from_config(cfg, nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
