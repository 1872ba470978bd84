"""ModelConfig: one frozen description of every supported decoder, with lossless HF config.json conversion.

The Llama, Mistral, Qwen and Gemma families differ only in a handful of switches (norm offset, embedding scale,
activation, soft-capping, extra norms, per-layer sliding windows), so they share one config and one set of modules;
the family is data, not a class hierarchy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# model_type -> (causal-LM class name, sequence-classification class name or None).
SUPPORTED_MODEL_TYPES: dict[str, tuple[str, str | None]] = {
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma": ("GemmaForCausalLM", "GemmaForSequenceClassification"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
}
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    name: mt for mt, names in SUPPORTED_MODEL_TYPES.items() for name in names if name is not None}
_GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
_POST_NORM_TYPES = ("gemma2", "gemma3_text")
_OUT_BIAS_TYPES = ("llama", "gemma", "gemma2", "gemma3_text", "qwen3")
_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "explicit")
# Every projection a LoRA adapter can attach to, as "<module>/<weight>" under model/layers (PEFT's module names are the
# last component), in the order that gives each adapter its dropout salt. The LM head and embeddings are not targets
# (PEFT's "all-linear" leaves the output layer out).
LORA_TARGETS = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                "mlp/down_proj")


class UnsupportedModelError(ValueError):
  """An HF config names an architecture or feature that tregjax does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and family switches of a decoder-only transformer (hashable, so it can be a static jit argument)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  model_type: str = "llama"
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 4096
  # RoPE: rope_type "default" | "linear" | "llama3" (Llama 3.1 frequency-dependent scaling).
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rope_local_theta: float | None = None  # Gemma 3: plain RoPE base of the sliding-window layers
  attention_bias: bool = False
  attention_out_bias: bool | None = None  # None: as HF's class for model_type does (Qwen 2 has no o_proj bias)
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"  # "silu" | "gelu_pytorch_tanh"
  # Attention window per layer: None = global. `layer_types` ("full_attention" | "sliding_attention") follows HF.
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  # Gemma switches.
  norm_offset: float = 0.0  # RMSNorm scale is (offset + w): 1.0 for Gemma
  scale_embeddings: bool = False  # multiply embeddings by sqrt(hidden) (Gemma)
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (default head_dim)
  post_norms: bool = False  # Gemma 2 post-attention / pre- and post-feedforward norms
  qk_norm: bool = False  # Qwen 3 / Gemma 3: RMSNorm over head_dim on q and k
  # Heads: 0 = causal LM; > 0 = sequence-classification `score` head with this many labels.
  num_labels: int = 0
  pad_token_id: int | None = None
  bos_token_id: int | list[int] | None = None
  eos_token_id: int | list[int] | None = None
  # Execution (not part of the HF checkpoint).
  remat: str = "none"
  scan_layers: bool = True
  attention_impl: str = "auto"
  # LoRA adapters (tregjax.models.lora; set only by tregjax.models.adapters.with_lora): rank r, scale lora_alpha / r,
  # the projections that carry one (LORA_TARGETS names) and the dropout on each adapter's input (PEFT's
  # lora_dropout; applied only when a forward is given a key).
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_targets: tuple[str, ...] = ()
  lora_dropout: float = 0.0

  def __post_init__(self):
    if self.attention_out_bias is None:
      object.__setattr__(self, "attention_out_bias", self.attention_bias and self.model_type in _OUT_BIAS_TYPES)
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise UnsupportedModelError(
          f"unsupported model_type {self.model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.rope_type not in _ROPE_TYPES:
      raise UnsupportedModelError(f"unsupported rope type {self.rope_type!r}; supported: {list(_ROPE_TYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if self.hidden_act not in ("silu", "gelu_pytorch_tanh"):
      raise UnsupportedModelError(f"unsupported hidden_act {self.hidden_act!r}; supported: silu, gelu_pytorch_tanh")
    if self.lora_targets:
      object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
      unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
      if unknown or self.lora_rank < 1:
        raise ValueError(f"LoRA needs lora_rank >= 1 (got {self.lora_rank}) and targets among {LORA_TARGETS}; "
                         f"unknown: {unknown}")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
      bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
      if bad:
        raise UnsupportedModelError(f"unsupported layer_types {sorted(bad)}")
      if "sliding_attention" in self.layer_types and not self.sliding_window:
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")

  @property
  def is_reward_model(self) -> bool:
    return self.num_labels > 0

  def layer_windows(self) -> tuple[int, ...]:
    """Attention window of every layer (0 = global)."""
    if self.layer_types is None:
      return (self.sliding_window or 0,) * self.num_layers
    return tuple(self.sliding_window if t == "sliding_attention" else 0 for t in self.layer_types)

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------- presets
  @classmethod
  def tiny_llama(cls, **overrides: Any) -> ModelConfig:
    """A 2-layer Llama for tests and demos (GQA, untied)."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, rope_theta=10000.0, max_position_embeddings=512)
    return cls(**(base | overrides))

  @classmethod
  def tiny_gemma2(cls, **overrides: Any) -> ModelConfig:
    base = dict(model_type="gemma2", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, hidden_act="gelu_pytorch_tanh", norm_offset=1.0,
                scale_embeddings=True, tie_word_embeddings=True, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0, query_pre_attn_scalar=16, post_norms=True, sliding_window=8,
                layer_types=("sliding_attention", "full_attention"), rms_norm_eps=1e-6, max_position_embeddings=512)
    return cls(**(base | overrides))

  @classmethod
  def llama3p2_1b(cls, **overrides: Any) -> ModelConfig:
    base = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                num_kv_heads=8, head_dim=64, rope_theta=500000.0, rope_type="llama3", rope_factor=32.0,
                rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
                tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=128000,
                eos_token_id=128001)
    return cls(**(base | overrides))

  # ---------------------------------------------------------------- HF conversion
  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Build from an HF config.json dict; unsupported architectures/features raise naming the field."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise UnsupportedModelError(
          f"{source}: model_type {model_type!r} is not supported; supported model types: "
          f"{sorted(SUPPORTED_MODEL_TYPES)}")
    for arch in archs:
      if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: architecture {arch!r} is not supported; supported architectures: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}")
    is_cls = any(a.endswith("ForSequenceClassification") for a in archs)

    def req(key):
      if key not in hf:
        raise ValueError(f"{source}: missing required field {key!r}")
      return hf[key]

    hidden, heads = req("hidden_size"), req("num_attention_heads")
    head_dim = hf.get("head_dim") or hidden // heads
    rope = _read_rope(hf, source, model_type)
    gemma = model_type in _GEMMA_TYPES
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if gemma and act == "gelu":  # HF Gemma maps legacy "gelu" to the tanh approximation
      act = "gelu_pytorch_tanh"
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
      raise UnsupportedModelError(f"{source}: partial_rotary_factor != 1 is not supported")
    num_layers = req("num_hidden_layers")
    sliding = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if model_type == "qwen2" or model_type == "qwen3":
      if not hf.get("use_sliding_window", False):
        sliding, layer_types = None, None
      elif layer_types is None:
        max_window = hf.get("max_window_layers", num_layers)
        layer_types = ["sliding_attention" if i >= max_window else "full_attention" for i in range(num_layers)]
    if model_type == "gemma2" and layer_types is None:
      layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    if model_type == "gemma3_text" and layer_types is None:
      pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
      layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if hf.get("use_bidirectional_attention"):
      raise UnsupportedModelError(f"{source}: use_bidirectional_attention is not supported (decoder-only models)")
    if model_type in ("llama", "gemma"):
      sliding, layer_types = None, None
    if layer_types is not None and "sliding_attention" not in layer_types:
      layer_types = None
      sliding = None if model_type != "mistral" else sliding
    if layer_types is not None and not sliding:
      layer_types = None
    num_labels = 0
    if is_cls:
      num_labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    attention_bias = bool(hf.get("attention_bias", model_type == "qwen2"))
    post_norm_type = model_type in _POST_NORM_TYPES
    return cls(
        model_type=model_type,
        vocab_size=req("vocab_size"),
        hidden_size=hidden,
        intermediate_size=req("intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        attention_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        hidden_act=act,
        sliding_window=sliding,
        layer_types=tuple(layer_types) if layer_types is not None else None,
        norm_offset=1.0 if gemma else 0.0,
        scale_embeddings=gemma,
        attn_logit_softcapping=hf.get("attn_logit_softcapping") if post_norm_type else None,
        final_logit_softcapping=hf.get("final_logit_softcapping") if post_norm_type else None,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if post_norm_type else None,
        post_norms=post_norm_type,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        num_labels=num_labels,
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        **rope,
    )

  def to_hf_config(self) -> dict[str, Any]:
    """The HF config.json dict; raises where HF's class for this model_type cannot express a setting."""
    mt = self.model_type
    gemma = mt in _GEMMA_TYPES

    def refuse(what):
      raise UnsupportedModelError(f"HF model_type {mt!r} cannot express {what}; choose another model_type")

    if self.norm_offset != (1.0 if gemma else 0.0):
      refuse(f"norm_offset={self.norm_offset}")
    if self.scale_embeddings != gemma:
      refuse(f"scale_embeddings={self.scale_embeddings}")
    if (self.attn_logit_softcapping or self.final_logit_softcapping or self.post_norms
        or self.query_pre_attn_scalar) and mt not in _POST_NORM_TYPES:
      refuse("soft-capping / post norms / query_pre_attn_scalar")
    if mt in _POST_NORM_TYPES and not self.post_norms:
      refuse("post_norms=False")
    if self.rope_local_theta is not None and mt != "gemma3_text":
      refuse("a separate RoPE base for sliding-window layers")
    if self.qk_norm != (mt in ("qwen3", "gemma3_text")):
      refuse(f"qk_norm={self.qk_norm}")
    if self.mlp_bias and mt != "llama":
      refuse("mlp_bias")
    if self.attention_bias and mt == "mistral":
      refuse("attention_bias")
    if mt == "qwen2" and self.attention_bias is not True:
      refuse("qkv without bias")
    if self.attention_out_bias != (self.attention_bias and mt in _OUT_BIAS_TYPES):
      refuse(f"attention_out_bias={self.attention_out_bias} with attention_bias={self.attention_bias}")
    windows = self.layer_windows()
    if any(windows) and mt in ("llama", "gemma"):
      refuse("sliding-window attention")
    if mt == "mistral" and len(set(windows)) > 1:
      refuse("per-layer sliding windows")
    if gemma and not self.tie_word_embeddings and mt == "gemma":
      refuse("untied embeddings")
    if self.hidden_act != ("gelu_pytorch_tanh" if gemma else "silu"):
      refuse(f"hidden_act={self.hidden_act}")
    if self.rope_type != "default" and mt in ("gemma", "gemma2"):
      refuse(f"rope type {self.rope_type}")

    if self.rope_type == "default":
      rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    elif self.rope_type == "linear":
      rope = {"rope_type": "linear", "rope_theta": self.rope_theta, "factor": self.rope_factor}
    else:
      rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, "factor": self.rope_factor,
              "low_freq_factor": self.rope_low_freq_factor, "high_freq_factor": self.rope_high_freq_factor,
              "original_max_position_embeddings": self.rope_original_max_position}
    if mt == "gemma3_text":  # per-layer-type RoPE (transformers v5 layout)
      local_theta = self.rope_theta if self.rope_local_theta is None else self.rope_local_theta
      rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}
    causal, seq_cls = SUPPORTED_MODEL_TYPES[mt]
    out: dict[str, Any] = {
        "architectures": [seq_cls if self.is_reward_model else causal],
        "model_type": mt,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "rope_parameters": rope,
        # Legacy (transformers < 5) spelling of the same rope settings.
        "rope_theta": self.rope_theta,
        "tie_word_embeddings": self.tie_word_embeddings,
        "pad_token_id": self.pad_token_id,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "torch_dtype": "float32",
    }
    if mt == "gemma3_text":
      del out["rope_theta"]
    elif self.rope_type != "default":
      out["rope_scaling"] = dict(rope)
    if mt in _POST_NORM_TYPES:
      out["hidden_activation"] = self.hidden_act
    else:
      out["hidden_act"] = self.hidden_act
    if mt in _OUT_BIAS_TYPES:
      out["attention_bias"] = self.attention_bias
    if mt == "llama":
      out["mlp_bias"] = self.mlp_bias
    if mt in _POST_NORM_TYPES:
      out.update(attn_logit_softcapping=self.attn_logit_softcapping,
                 final_logit_softcapping=self.final_logit_softcapping,
                 query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim)
    if any(windows):
      out["sliding_window"] = self.sliding_window
      if mt != "mistral":
        out["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]
      if mt in ("qwen2", "qwen3"):
        out["use_sliding_window"] = True
        first = next(i for i, w in enumerate(windows) if w)
        if any(not w for w in windows[first:]):
          refuse("sliding layers that are not a suffix")
        out["max_window_layers"] = first
    elif mt in ("mistral", "gemma2", "gemma3_text", "qwen2", "qwen3"):
      if mt in _POST_NORM_TYPES:
        refuse("Gemma 2/3 without sliding-window layers")
      out["sliding_window"] = None
    if self.is_reward_model:
      out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
      out["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
      out["num_labels"] = self.num_labels
    return out


def _read_rope(hf: dict[str, Any], source: str, model_type: str) -> dict[str, Any]:
  """RoPE settings from transformers v5 `rope_parameters` or legacy `rope_scaling` + `rope_theta`."""
  params = hf.get("rope_parameters")
  per_type = isinstance(params, dict) and bool(params) and all(isinstance(v, dict) for v in params.values())
  if model_type == "gemma3_text":
    # Global layers: full_attention parameters (may be scaled); sliding layers: their own plain base.
    local = (params or {}).get("sliding_attention", {}) if per_type else {}
    if local.get("rope_type", "default") != "default":
      raise UnsupportedModelError(f"{source}: scaled RoPE on sliding-window layers is not supported")
    local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    glob = dict(params["full_attention"]) if per_type else dict(params or {})
    glob.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    out = _read_rope({"rope_parameters": glob, "rope_scaling": None if per_type else hf.get("rope_scaling")},
                     source, "gemma3_global")
    return out | {"rope_local_theta": float(local_theta)}
  if per_type:
    raise UnsupportedModelError(f"{source}: per-layer-type rope_parameters are only supported for gemma3_text")
  params = dict(params or {})
  legacy = hf.get("rope_scaling") or {}
  merged = {**legacy, **params}
  theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
  if rope_type not in _ROPE_TYPES:
    raise UnsupportedModelError(
        f"{source}: rope type {rope_type!r} is not supported; supported: {list(_ROPE_TYPES)}")
  out = dict(rope_theta=float(theta), rope_type=rope_type)
  if rope_type in ("linear", "llama3"):
    out["rope_factor"] = float(merged["factor"])
  if rope_type == "llama3":
    out["rope_low_freq_factor"] = float(merged["low_freq_factor"])
    out["rope_high_freq_factor"] = float(merged["high_freq_factor"])
    out["rope_original_max_position"] = int(merged["original_max_position_embeddings"])
  return out
