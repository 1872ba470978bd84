"""Building blocks shared by every supported decoder: norms, RoPE, masks, attention, MLP, one decoder layer.

Parameters are created with a leading `layers` axis by `DecoderLayer(..., num_stacked=L)`, so one module object holds
all L layers and `scan_layers` runs them with `jax.lax.scan` (compile time independent of depth). Everything that
differs between Llama / Mistral / Qwen / Gemma is a `ModelConfig` switch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tregjax import parallel
from tregjax.models import lora
from tregjax.models.config import LORA_TARGETS, ModelConfig

_INIT_STD = 0.02  # HF `initializer_range` default.


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], dtype, init: str = "normal"
           ) -> nnx.Param:
  """A parameter with logical axis names; `init` is "normal" (std 0.02, as HF), "zeros" or "ones"."""
  if init == "normal":
    value = _INIT_STD * jax.random.normal(rngs.params(), tuple(shape), dtype)
  elif init == "zeros":
    value = jnp.zeros(tuple(shape), dtype)
  else:
    value = jnp.ones(tuple(shape), dtype)
  return nnx.Param(value, axes=tuple(axes))


def _stack(num_stacked: int | None, shape: Sequence[int], axes: Sequence[str | None]):
  if num_stacked is None:
    return tuple(shape), tuple(axes)
  return (num_stacked, *shape), ("layers", *axes)


def attach_adapters(module: nnx.Module, cfg: ModelConfig, group: str, in_ndims: dict[str, int]) -> None:
  """LoRA adapters on `module`'s (the layers' `attn` or `mlp`) projections that cfg.lora_targets names;
  `in_ndims`: how many of a projection weight's dims (after the layer axis) are its input (1 if not listed)."""
  for target in cfg.lora_targets:
    g, name = target.split("/")
    if g == group:
      lora.attach(module, name, in_ndim=in_ndims.get(name, 1), rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                  dropout=cfg.lora_dropout, salt=LORA_TARGETS.index(target))


# ------------------------------------------------------------------ norms


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32; Llama multiplies by w in the compute dtype, Gemma by (1 + w) in float32 (as HF)."""

  def __init__(self, dim: int, *, eps: float, offset: float, param_dtype, num_stacked: int | None = None,
               rngs: nnx.Rngs | None = None):
    shape, axes = _stack(num_stacked, (dim,), ("norm",))
    self.scale = param(rngs, shape, axes, param_dtype, "zeros" if offset else "ones")
    self.eps = eps
    self.offset = offset

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
    return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


# ------------------------------------------------------------------ RoPE


def rope_inv_freq(cfg: ModelConfig, *, local: bool = False) -> np.ndarray:
  """Inverse frequencies (float32, as HF computes them) incl. linear and Llama-3.1 (`llama3`) scaling.

  `local=True` gives Gemma 3's sliding-window layers their own plain RoPE base (`rope_local_theta`).
  """
  dim = cfg.head_dim
  theta = cfg.rope_local_theta if local else cfg.rope_theta
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv_freq = inv_freq.astype(np.float32)
  if local:
    return inv_freq
  if cfg.rope_type == "linear":
    inv_freq = inv_freq / np.float32(cfg.rope_factor)
  elif cfg.rope_type == "llama3":
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_position
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos/sin [B, T, head_dim/2] in float32 for integer positions [B, T]."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE (HF layout) on x [B, T, heads, head_dim], computed in float32."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# ------------------------------------------------------------------ masks and attention


def attention_mask(q_segment: jax.Array, kv_segment: jax.Array, q_index: jax.Array, kv_index: jax.Array
                   ) -> jax.Array:
  """bool [B, 1, T, S]: same non-zero segment and causal (kv index <= query index)."""
  same = (q_segment[:, :, None] == kv_segment[:, None, :]) & (q_segment[:, :, None] != 0)
  causal = kv_index[:, None, :] <= q_index[:, :, None]
  return (same & causal)[:, None]


def window_mask(q_index: jax.Array, kv_index: jax.Array, window: jax.Array) -> jax.Array:
  """bool [B, 1, T, S]: kv within `window` positions of the query (HF: kv > q - window); window 0 = global."""
  dist = q_index[:, :, None] - kv_index[:, None, :]
  return ((dist < window) | (window == 0))[:, None]


def resolve_attention_impl(cfg: ModelConfig, dtype) -> str:
  """The fused kernel where it supports the model (cuDNN wants 16-bit inputs), else XLA; soft-capping → explicit."""
  if cfg.attn_logit_softcapping:
    return "explicit"
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
                          softcap: float | None, impl: str) -> jax.Array:
  """q [B,T,N,H], k/v [B,S,K,H] (GQA: K divides N), mask bool [B,1,T,S] -> [B,T,N,H]."""
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):
      impl = "xla"  # a shape/dtype cuDNN does not take (checked while tracing): same math through XLA
  if impl == "xla" and not softcap:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
  # Explicit softmax: needed for Gemma 2 logit soft-capping, which the fused kernels do not implement.
  return cached_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask, scale=scale, softcap=softcap)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
                     softcap: float | None) -> jax.Array:
  """Explicit-softmax attention of q [B,T,N,H] over keys/values in [B,K,S,H] layout (a KV cache, or the
  soft-capping path), mask bool [B,1,T,S] -> [B,T,N,H].

  With (batch, kv head) leading, the score and value contractions are plain batched matmuls; the [B,S,K,H] layout
  made XLA transpose the whole cache of every layer at every decode step (3x slower steps at S=1024 on CPU).
  """
  b, t, n, h = q.shape
  kh = k.shape[1]
  qg = q.reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("btkgh,bksh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  # Contract in (b, k, g, t, h) order, then move t: asking for "btkgh" directly let XLA:CPU pick an [.., h, g]
  # output layout, a slow strided dot plus a transposing copy of o_proj in every layer of every decode step.
  out = jnp.einsum("bkgts,bksh->bkgth", probs, v, preferred_element_type=jnp.float32)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


class Attention(nnx.Module):
  """Multi-head attention with GQA/MQA, optional q/k/v(/o) biases and q/k norms; weights as [D, heads, head_dim]."""

  def __init__(self, cfg: ModelConfig, *, param_dtype, num_stacked: int | None, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    s = num_stacked

    def p(shape, axes, init="normal"):
      return param(rngs, *_stack(s, shape, axes), param_dtype, init)

    self.q_proj = p((d, n, h), ("embed", "heads", "head_dim"))
    self.k_proj = p((d, k, h), ("embed", "kv_heads", "head_dim"))
    self.v_proj = p((d, k, h), ("embed", "kv_heads", "head_dim"))
    self.o_proj = p((n, h, d), ("heads", "head_dim", "embed"))
    if cfg.attention_bias:
      self.q_bias = p((n, h), ("heads", "head_dim"), "zeros")
      self.k_bias = p((k, h), ("kv_heads", "head_dim"), "zeros")
      self.v_bias = p((k, h), ("kv_heads", "head_dim"), "zeros")
    if cfg.attention_out_bias:
      self.o_bias = p((d,), ("embed",), "zeros")
    if cfg.qk_norm:
      norm = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype, num_stacked=s, rngs=rngs)
      self.q_norm = RMSNorm(h, **norm)
      self.k_norm = RMSNorm(h, **norm)
    attach_adapters(self, cfg, "attn", {"o_proj": 2})  # o_proj reads [heads, head_dim]
    self.cfg = cfg

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, *, impl: str,
               cache: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x [B,T,D]; `cache` = (k [L,B,K,S,H], v, layer): new k/v go to layer `layer` at per-row slots
    cache_index[b] + t, and attention reads that layer's cache. `dropout_key`: the layer's LoRA dropout key."""
    cfg, dt, key = self.cfg, x.dtype, dropout_key
    q = lora.apply(self, "q_proj", x, jnp.einsum("btd,dnh->btnh", x, self.q_proj[...].astype(dt)), key)
    k = lora.apply(self, "k_proj", x, jnp.einsum("btd,dkh->btkh", x, self.k_proj[...].astype(dt)), key)
    v = lora.apply(self, "v_proj", x, jnp.einsum("btd,dkh->btkh", x, self.v_proj[...].astype(dt)), key)
    if cfg.attention_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = parallel.constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
    k = parallel.constrain(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", None))
    v = parallel.constrain(v, ("batch", "length", "act_kv_heads", None))
    new_cache = None
    if cache is not None:
      # The whole stacked cache [L, B, K, S, H] is threaded through the layer loop and only the new tokens are
      # scattered into it (in place), instead of every layer re-emitting its full cache slice per step.
      k_all, v_all, layer = cache
      b, t = k.shape[:2]
      rows = jnp.arange(b)[:, None]
      slots = cache_index[:, None] + jnp.arange(t)
      k_all = k_all.at[layer, rows, :, slots].set(k.astype(k_all.dtype))  # cache is [L, B, K, S, H]
      v_all = v_all.at[layer, rows, :, slots].set(v.astype(v_all.dtype))
      new_cache = (k_all, v_all)
      k = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False).astype(dt)
      v = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False).astype(dt)
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
    if cache is not None:
      out = cached_attention(q, k, v, mask, scale=scale, softcap=cfg.attn_logit_softcapping)
    else:
      out = dot_product_attention(q, k, v, mask, scale=scale, softcap=cfg.attn_logit_softcapping, impl=impl)
    # dot_general, not einsum: jnp.einsum lists the contracting dims as (h, n), which makes XLA transpose both
    # the activations and o_proj of every layer (a copy of the weight per call; seen on XLA:CPU).
    out = lora.apply(self, "o_proj", out, jax.lax.dot_general(out, self.o_proj[...].astype(dt),
                                                              (((2, 3), (0, 1)), ((), ()))), key)
    if cfg.attention_out_bias:
      out = out + self.o_bias[...].astype(dt)
    return out, new_cache


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)), act = SiLU (Llama) or tanh-GELU (Gemma GeGLU)."""

  def __init__(self, cfg: ModelConfig, *, param_dtype, num_stacked: int | None, rngs: nnx.Rngs):
    d, f, s = cfg.hidden_size, cfg.intermediate_size, num_stacked
    self.gate_proj = param(rngs, *_stack(s, (d, f), ("embed", "mlp")), param_dtype)
    self.up_proj = param(rngs, *_stack(s, (d, f), ("embed", "mlp")), param_dtype)
    self.down_proj = param(rngs, *_stack(s, (f, d), ("mlp", "embed")), param_dtype)
    if cfg.mlp_bias:
      self.gate_bias = param(rngs, *_stack(s, (f,), ("mlp",)), param_dtype, "zeros")
      self.up_bias = param(rngs, *_stack(s, (f,), ("mlp",)), param_dtype, "zeros")
      self.down_bias = param(rngs, *_stack(s, (d,), ("embed",)), param_dtype, "zeros")
    attach_adapters(self, cfg, "mlp", {})
    self.cfg = cfg

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    dt, key = x.dtype, dropout_key
    gate = lora.apply(self, "gate_proj", x, x @ self.gate_proj[...].astype(dt), key)
    up = lora.apply(self, "up_proj", x, x @ self.up_proj[...].astype(dt), key)
    if self.cfg.mlp_bias:
      gate, up = gate + self.gate_bias[...].astype(dt), up + self.up_bias[...].astype(dt)
    if self.cfg.hidden_act == "silu":
      act = jax.nn.silu(gate)
    else:
      act = jax.nn.gelu(gate, approximate=True)
    h = parallel.constrain(act * up, ("batch", "length", "act_mlp"))
    out = lora.apply(self, "down_proj", h, h @ self.down_proj[...].astype(dt), key)
    if self.cfg.mlp_bias:
      out = out + self.down_bias[...].astype(dt)
    return out


class DecoderLayer(nnx.Module):
  """Pre-norm residual block; Gemma 2 adds post-attention and pre/post-feedforward norms."""

  def __init__(self, cfg: ModelConfig, *, param_dtype, num_stacked: int | None, rngs: nnx.Rngs):
    norm = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=param_dtype, num_stacked=num_stacked,
                rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
    self.attn = Attention(cfg, param_dtype=param_dtype, num_stacked=num_stacked, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
    if cfg.post_norms:
      self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm)
      self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm)
    self.mlp = MLP(cfg, param_dtype=param_dtype, num_stacked=num_stacked, rngs=rngs)
    self.cfg = cfg

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, *, impl: str,
               cache=None, cache_index=None, dropout_key: jax.Array | None = None):
    """`dropout_key`: this layer's LoRA dropout key (each adapter folds in its own projection index)."""
    h, new_cache = self.attn(self.input_layernorm(x), cos, sin, mask, impl=impl, cache=cache,
                             cache_index=cache_index, dropout_key=dropout_key)
    if self.cfg.post_norms:
      x = x + self.post_attention_layernorm(h)
      x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), dropout_key))
    else:
      x = x + h
      x = x + self.mlp(self.post_attention_layernorm(x), dropout_key)
    return parallel.constrain(x, ("batch", "length", "act_embed")), new_cache
