"""llama.cpp GGUF files as a tensor source and a tokenizer, torch-free.

`GGUFSource(path)` presents a GGUF file the way a Hugging Face checkpoint looks: `.config` is the
`config.json` dict built from the GGUF metadata, `.keys()` are HF tensor names and `.get(name)` is a
float32 numpy array in HF layout (Linear weights [out, in]). It implements the `TensorSource` protocol of
`tregjax/models/hf_io.py`, so `models.from_pretrained("x.gguf")` loads through the same declarative table
as safetensors. Architectures (`general.architecture`): llama (Llama 2/3, Mistral, SmolLM), qwen2, qwen3,
gemma (Gemma 1), gemma2 and gemma3 (Gemma 3 text). Dequantization is the `gguf` package's numpy code; the
transforms undo what llama.cpp's converter did: the rotary row permutation of Llama's Q and K projections (it
interleaves the two rotary halves of every head; HF keeps them as [first half | second half]) and Gemma's norms
stored as w + 1;
Llama 3.1/3.2's "llama3" RoPE scaling, which a GGUF keeps only as the `rope_freqs.weight` factors, is
recovered (and verified) into the config.

`tokenizer_from_gguf(path)` builds the tokenizer and chat template the file carries into a
`transformers.PreTrainedTokenizerFast` with the `tokenizers` library only (transformers' own GGUF tokenizer
path goes through its model loader). Tokenizer kinds (`tokenizer.ggml.model`): "gpt2", byte-level BPE with
the file's merges and `tokenizer.ggml.pre` split (SmolLM, Llama 3, Qwen); "llama", SentencePiece BPE with
byte fallback, merges derived from the piece scores or, for Gemma, the piece order (Llama 1/2, Mistral v0.1,
Gemma 1/2/3). Others (bert, t5, rwkv, ...) are refused with an error naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES
from gguf import quants as gguf_quants
from gguf.quants import dequantize


class GGUFError(ValueError):
  """A GGUF file that is corrupt, truncated or holds something we cannot convert."""


# --------------------------------------------------------------------------------------------------
# Reading


class _CheckedReader(GGUFReader):
  """GGUFReader that names the tensor whose data lies past the end of a truncated file.

  It also parses ~3x faster: the reader slices its `np.memmap` some 10^6 times for the vocabulary
  strings, and every memmap slice pays `memmap.__array_finalize__`; a plain ndarray view of the same
  mapping (no copy, the mapping stays alive as its base) does not.
  """

  @property
  def data(self) -> np.ndarray:
    return self._mapped

  @data.setter
  def data(self, value: np.ndarray) -> None:
    self._mapped = value.view(np.ndarray) if isinstance(value, np.memmap) else value

  def _build_tensors(self, start_offs, fields):  # pylint: disable=arguments-renamed
    size = len(self.data)
    for field in fields:
      _, name_data, _, dims, raw_dtype, offset = field.parts
      name = bytes(name_data).decode("utf-8", "replace")
      try:
        qtype = GGMLQuantizationType(int(raw_dtype[0]))
      except ValueError:
        raise GGUFError(f"tensor {name!r}: unknown GGML tensor type {int(raw_dtype[0])}") from None
      block, type_size = GGML_QUANT_SIZES[qtype]
      n_bytes = int(np.prod(dims)) * type_size // block
      end = int(start_offs + offset[0]) + n_bytes
      if end > size:
        raise GGUFError(f"tensor {name!r} ({qtype.name}, shape {tuple(int(d) for d in dims)}) needs bytes up to "
                        f"{end} but the file has {size}: truncated file")
    super()._build_tensors(start_offs, fields)


def open_reader(path: str | os.PathLike) -> GGUFReader:
  """The file's header, metadata and tensor table, checked (every tensor's storage type known and its bytes inside
  the file; a bad one is a GGUFError naming the file); the tensor data stay memory-mapped, nothing is dequantized."""
  try:
    return _CheckedReader(path)
  except GGUFError as e:
    raise GGUFError(f"{path}: {e}") from None
  except FileNotFoundError:
    raise
  except Exception as e:  # the reader raises IndexError/ValueError/struct errors on garbage
    raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt): {type(e).__name__}: {e}") from e


def _field_value(field) -> Any:
  """A metadata value as a Python scalar, string or list."""
  value = field.contents()
  if field.types and field.types[0] == GGUFValueType.ARRAY:
    return list(value)
  return value


def read_metadata(reader: GGUFReader, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
  """GGUF key/value metadata (all of it, or `keys`), skipping the reader's GGUF.* header pseudo-fields."""
  names = [k for k in reader.fields if not k.startswith("GGUF.")] if keys is None else keys
  return {k: _field_value(reader.fields[k]) for k in names if k in reader.fields}


# --------------------------------------------------------------------------------------------------
# Model config and tensor names

# llama.cpp block tensor suffix -> HF name inside `model.layers.N.`, shared by the dense decoders.
_DENSE_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


@dataclasses.dataclass(frozen=True)
class _Arch:
  """How llama.cpp's converter stored one HF architecture (convert_hf_to_gguf.py), so we can undo it."""

  model_type: str
  hf_class: str
  block: dict[str, str]
  permute_qk: bool = False  # LlamaModel.permute of the Q/K rows
  norm_plus_one: bool = False  # Gemma: every *norm.weight stored as w + 1


_ARCHITECTURES = {
    "llama": _Arch("llama", "LlamaForCausalLM", _DENSE_BLOCK, permute_qk=True),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", _DENSE_BLOCK | {
        "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias"}),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", _DENSE_BLOCK | {
        "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}),
    # Gemma 1: GemmaModel writes head_dim as key_length, norms as w + 1, no output.weight (tied), no permute.
    "gemma": _Arch("gemma", "GemmaForCausalLM", _DENSE_BLOCK, norm_plus_one=True),
    "gemma2": _Arch("gemma2", "Gemma2ForCausalLM", _DENSE_BLOCK | {
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}, norm_plus_one=True),
    # Gemma 3 text: Gemma 2's blocks plus q/k norms (also stored as w + 1), no soft-capping.
    "gemma3": _Arch("gemma3_text", "Gemma3ForCausalLM", _DENSE_BLOCK | {
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
        "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"},
        norm_plus_one=True),
}

# Types the gguf package dequantizes in numpy (checked up front so the error names the tensor).
DEQUANTIZABLE = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                           *getattr(gguf_quants, "_type_traits", {})})


def _gguf_version() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version("gguf")
  except metadata.PackageNotFoundError:
    return "(version unknown)"


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
  """The HF tensor name for a llama.cpp tensor name of architecture `arch` (None: no HF counterpart)."""
  if name in _GLOBAL:
    return _GLOBAL[name]
  block = _ARCHITECTURES[arch].block
  m = _BLOCK_RE.fullmatch(name)
  if m and m.group(2) in block:
    return f"model.layers.{m.group(1)}.{block[m.group(2)]}"
  return None


def unpermute_rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's `permute` of Q/K rows (convert_hf_to_gguf.py, LlamaModel.permute).

  llama.cpp stores, per head, the rows of the two rotary halves interleaved (GPT-J style rotary);
  HF keeps [first half | second half] (rotate_half). Rows are [n_head * head_dim, ...].
  """
  head_dim = w.shape[0] // n_head
  if n_head * head_dim != w.shape[0] or head_dim % 2:
    raise GGUFError(f"cannot unpermute rotary rows: {w.shape[0]} rows for {n_head} heads")
  return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float = 1.0,
                        high_freq_factor: float = 4.0, original_max_position: int = 8192) -> np.ndarray:
  """The `rope_freqs.weight` llama.cpp writes for HF "llama3" RoPE scaling (LlamaModel.generate_extra_tensors):
  per rotary pair, the divisor of its inverse frequency."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  wavelen = 2 * np.pi / inv_freq
  low_wavelen, high_wavelen = original_max_position / low_freq_factor, original_max_position / high_freq_factor
  smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  out = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor,
                                                      1 / ((1 - smooth) / factor + smooth)))
  return out.astype(np.float32)


def _rope_parameters(path, arch: str, meta: dict[str, Any], theta: float, head_dim: int,
                     rope_freqs: np.ndarray | None) -> dict[str, Any]:
  """HF `rope_parameters` from `{arch}.rope.scaling.*` and llama.cpp's `rope_freqs.weight` tensor.

  A GGUF keeps Llama 3.1/3.2's "llama3" scaling only as the per-pair factors; we take the released
  settings (factor = the largest factor, low 1, high 4, original context 8192, which is also what
  llama.cpp's converter assumes) and accept them only if they reproduce the stored factors exactly.
  """
  scaling = meta.get(f"{arch}.rope.scaling.type")
  params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
  if scaling == "linear":
    params = {"rope_type": "linear", "rope_theta": theta, "factor": float(meta[f"{arch}.rope.scaling.factor"])}
  elif scaling not in (None, "none"):
    raise GGUFError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported (supported: linear, and "
                    f"llama3 scaling through rope_freqs.weight)")
  if rope_freqs is not None:
    if scaling not in (None, "none"):
      raise GGUFError(f"{path}: both {arch}.rope.scaling.type and rope_freqs.weight are set")
    guess = dict(factor=float(rope_freqs.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position=8192)
    expected = llama3_rope_factors(head_dim, theta, **guess)
    if expected.shape != rope_freqs.shape or not np.allclose(expected, rope_freqs, rtol=1e-5, atol=1e-6):
      raise GGUFError(f"{path}: tensor 'rope_freqs.weight' does not match Llama-3 RoPE scaling with factor "
                      f"{guess['factor']}, low/high frequency factors 1/4 and original context 8192; other "
                      f"RoPE scalings are not supported")
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": guess["factor"], "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  return params


def _hf_config(path: str | os.PathLike, meta: dict[str, Any], tensor_names: set[str],
               rope_freqs: np.ndarray | None = None) -> dict[str, Any]:
  arch = meta.get("general.architecture")
  if arch not in _ARCHITECTURES:
    raise GGUFError(f"{path}: general.architecture={arch!r} is not supported (supported: {sorted(_ARCHITECTURES)})")
  spec = _ARCHITECTURES[arch]

  def need(key: str):
    full = f"{arch}.{key}"
    if full not in meta:
      raise GGUFError(f"{path}: metadata field {full!r} is missing")
    return meta[full]

  n_heads = int(need("attention.head_count"))
  hidden = int(need("embedding_length"))
  n_kv = meta.get(f"{arch}.attention.head_count_kv", n_heads)
  if isinstance(n_kv, list):
    raise GGUFError(f"{path}: per-layer {arch}.attention.head_count_kv is not supported")
  head_dim = int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", hidden // n_heads)))
  if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
    raise GGUFError(f"{path}: partial rotary ({arch}.rope.dimension_count != head dim {head_dim}) is not supported")
  vocab = meta.get(f"{arch}.vocab_size")
  if vocab is None:
    if "tokenizer.ggml.tokens" not in meta:
      raise GGUFError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    vocab = len(meta["tokenizer.ggml.tokens"])
  # Gemma3Model writes HF's rope_theta, whose default there is 1e6.
  rope_theta = float(meta.get(f"{arch}.rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10000.0))
  config = {
      "architectures": [spec.hf_class],
      "model_type": spec.model_type,
      "hidden_size": hidden,
      "intermediate_size": int(need("feed_forward_length")),
      "num_hidden_layers": int(need("block_count")),
      "num_attention_heads": n_heads,
      "num_key_value_heads": int(n_kv),
      "head_dim": head_dim,
      "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
      "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
      "rope_theta": rope_theta,
      "rope_parameters": _rope_parameters(path, arch, meta, rope_theta, head_dim, rope_freqs),
      "vocab_size": int(vocab),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "hidden_act": "silu",
      "attention_bias": any(n.endswith(".attn_q.bias") for n in tensor_names),
      "mlp_bias": False,
  }
  if arch == "qwen2":
    config["use_sliding_window"] = False  # llama.cpp runs Qwen2 with full attention in every layer
  if arch == "gemma":  # llama.cpp runs Gemma's GeGLU with ggml_gelu, the tanh approximation
    config["hidden_act"] = "gelu_pytorch_tanh"
  if arch == "gemma2":
    config |= _gemma2_config(meta, config)
  if arch == "gemma3":
    config |= _gemma3_config(meta, config)
  for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id")):
    if f"tokenizer.ggml.{gguf_key}" in meta:
      config[hf_key] = int(meta[f"tokenizer.ggml.{gguf_key}"])
  return config


def _gemma2_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
  # llama.cpp (src/models/gemma2*.cpp) scales queries by 1/sqrt(head_dim), except 27B (46 layers):
  # 1/sqrt(hidden/heads), which is what HF's query_pre_attn_scalar says for each released size.
  scalar = (config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 46
            else config["head_dim"])
  window = meta.get("gemma2.attention.sliding_window", 4096)
  return {
      "hidden_act": "gelu_pytorch_tanh",
      "hidden_activation": "gelu_pytorch_tanh",
      "attn_logit_softcapping": float(meta.get("gemma2.attn_logit_softcapping", 50.0)),
      "final_logit_softcapping": float(meta.get("gemma2.final_logit_softcapping", 30.0)),
      "query_pre_attn_scalar": scalar,
      "sliding_window": int(window),
      "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                      for i in range(config["num_hidden_layers"])],
  }


def _gemma3_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
  """What llama.cpp hard-codes for Gemma 3 (src/llama-model.cpp, src/models/gemma3*.cpp), in HF terms.

  Every 6th layer is global ((i + 1) % 6 == 0, HF's sliding_window_pattern 6), the others attend within
  `attention.sliding_window`; sliding layers use plain RoPE with base 10000, global ones `rope.freq_base` and
  the file's scaling; queries are scaled by 1/sqrt(head_dim), except 27B (62 layers): 1/sqrt(hidden/heads),
  HF's query_pre_attn_scalar for each released size. No soft-capping.
  """
  n_layers = config["num_hidden_layers"]
  scalar = config["hidden_size"] // config["num_attention_heads"] if n_layers == 62 else config["head_dim"]
  return {
      "hidden_act": "gelu_pytorch_tanh",
      "hidden_activation": "gelu_pytorch_tanh",
      "query_pre_attn_scalar": scalar,
      "sliding_window": int(meta.get("gemma3.attention.sliding_window", 4096)),
      "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)],
      "rope_parameters": {"full_attention": config["rope_parameters"],
                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
      "attn_logit_softcapping": None,
      "final_logit_softcapping": None,
  }


class GGUFSource:
  """A GGUF file as a TensorSource: HF config dict, HF tensor names, float32 HF-layout arrays.

  Tensors are read (memory-mapped) and dequantized one at a time in `get`, so peak host memory is
  one tensor, not the model.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"GGUF file not found: {self.path}")
    self._reader = open_reader(self.path)
    meta_keys = tuple(k for k in self._reader.fields if not k.startswith("GGUF.") and k not in
                      ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                       "tokenizer.ggml.scores"))
    self.metadata = read_metadata(self._reader, meta_keys)
    if f"{self.metadata.get('general.architecture')}.vocab_size" not in self.metadata:
      self.metadata.update(read_metadata(self._reader, ("tokenizer.ggml.tokens",)))
    self._tensors = {t.name: t for t in self._reader.tensors}
    rope_freqs = self._tensors.pop("rope_freqs.weight", None)  # not a weight: llama3 RoPE scaling, in the config
    if rope_freqs is not None:
      rope_freqs = np.asarray(dequantize(rope_freqs.data, rope_freqs.tensor_type), np.float32).reshape(-1)
    self.config = _hf_config(self.path, self.metadata, set(self._tensors), rope_freqs)
    self._arch = _ARCHITECTURES[self.metadata["general.architecture"]]
    self._names: dict[str, str] = {}  # HF name -> GGUF name
    for name in self._tensors:
      hf = gguf_to_hf_name(name, self.metadata["general.architecture"])
      if hf is None:
        raise GGUFError(f"{self.path}: tensor {name!r} has no counterpart in the HF "
                        f"{self.config['architectures'][0]} layout")
      self._names[hf] = name
    # Every tensor's storage type is checked up front, so that a file tregjax cannot read fails when it is opened
    # (one line naming the file, a tensor and its type), not halfway through loading a model.
    unreadable = sorted({t.tensor_type.name: n for n, t in self._tensors.items()
                         if t.tensor_type not in DEQUANTIZABLE}.items())
    if unreadable:
      kinds = ", ".join(f"{kind} (e.g. tensor {name!r})" for kind, name in unreadable)
      raise GGUFError(f"{self.path}: tensor type {kinds} cannot be dequantized by the gguf package "
                      f"{_gguf_version()}; readable: {sorted(q.name for q in DEQUANTIZABLE)}")

  def tensor_types(self) -> dict[str, int]:
    """How many tensors of each GGML storage type the file holds (e.g. {"Q5_0": 120, "Q8_0": 24, ...})."""
    out: dict[str, int] = {}
    for tensor in self._tensors.values():
      out[tensor.tensor_type.name] = out.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(out.items()))

  def keys(self) -> list[str]:
    """HF tensor names present in the file (no lm_head.weight when the embeddings are tied)."""
    return list(self._names)

  def __contains__(self, name: str) -> bool:
    return name in self._names

  def gguf_name(self, name: str) -> str:
    return self._names[name]

  def tensor_type(self, name: str) -> str:
    """The GGML storage type of HF tensor `name` (e.g. "Q4_1")."""
    return self._tensors[self._names[name]].tensor_type.name

  def get(self, name: str) -> np.ndarray:
    """HF tensor `name` as float32 numpy in HF layout."""
    if name not in self._names:
      raise KeyError(f"{self.path}: no tensor {name!r} (GGUF holds {len(self._names)} tensors)")
    tensor = self._tensors[self._names[name]]
    if tensor.tensor_type not in DEQUANTIZABLE:
      raise GGUFError(f"{self.path}: tensor {tensor.name!r} ({name}) has type {tensor.tensor_type.name}, which "
                      f"the gguf package cannot dequantize")
    try:
      w = dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError) as e:
      raise GGUFError(f"{self.path}: tensor {tensor.name!r} ({name}, {tensor.tensor_type.name}): "
                      f"dequantization failed: {e}") from e
    w = np.asarray(w, dtype=np.float32)
    expected = tuple(int(d) for d in reversed(tensor.shape))
    if w.shape != expected:
      raise GGUFError(f"{self.path}: tensor {tensor.name!r} dequantized to shape {w.shape}, expected {expected}")
    if self._arch.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
      w = unpermute_rotary_rows(w, self.config["num_attention_heads"])
    elif self._arch.permute_qk and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
      w = unpermute_rotary_rows(w, self.config["num_key_value_heads"])
    if self._arch.norm_plus_one and tensor.name.endswith("norm.weight"):
      w = w - np.float32(1.0)
    return w

  def __repr__(self) -> str:
    return f"GGUFSource({str(self.path)!r}, {len(self._names)} tensors)"


# --------------------------------------------------------------------------------------------------
# Tokenizer

# llama.cpp `tokenizer.ggml.pre` -> how text is split before byte-level BPE (llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The pre-types llama.cpp runs as LLAMA3 (Llama 3 split, ignore_merges, BOS by default).
_LLAMA3_PRE = frozenset({"llama-bpe", "llama3", "llama-v3"})


def _pre_tokenizer(pre: str | None, path):
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=g-import-not-at-top

  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if pre in (None, "default", "gpt2", "gpt-2"):
    return byte_level
  if pre == "smollm":
    # llama.cpp: "\p{N}" (every digit alone), then the GPT-2 regex; HF SmolLM: Digits + ByteLevel.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  splits = {**dict.fromkeys(_LLAMA3_PRE, _LLAMA3_SPLIT), "qwen2": _QWEN2_SPLIT}
  if pre in splits:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
  raise GGUFError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported "
                  f"(supported: default, gpt2, smollm, llama-bpe, llama3, llama-v3, qwen2)")


# llama.cpp token types (tokenizer.ggml.token_type), SentencePiece's piece types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# SentencePiece vocabularies that transformers rebuilds the Gemma way (see `_sentencepiece_bpe`).
_GEMMA_SPM_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})
_METASPACE = "\u2581"


def _parse_merges(path, merges: list[str]) -> list[tuple[str, str]]:
  out = []
  for line_no, merge in enumerate(merges):
    pair = merge.split(" ")
    if len(pair) != 2:
      raise GGUFError(f"{path}: tokenizer.ggml.merges[{line_no}] = {merge!r} is not two space-separated tokens")
    out.append((pair[0], pair[1]))
  return out


def _byte_level_bpe(path, meta: dict[str, Any], arch: str):
  """GPT-2-style byte-level BPE ("gpt2"): vocabulary and merges as stored, the `tokenizer.ggml.pre` split."""
  del arch
  from tokenizers import Tokenizer, decoders, models  # pylint: disable=g-import-not-at-top
  from transformers.convert_slow_tokenizer import bytes_to_unicode  # pylint: disable=g-import-not-at-top

  if "tokenizer.ggml.merges" not in meta:
    raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.merges' is missing")
  alphabet = set(bytes_to_unicode().values())
  byte_spelling = bytes_to_unicode()

  def spell(token: str) -> str:
    # Byte-level vocabularies spell every token in the 256-character byte alphabet; respell any that is not.
    return token if set(token) <= alphabet else "".join(byte_spelling[b] for b in token.encode("utf-8"))

  tokens = [spell(t) for t in meta["tokenizer.ggml.tokens"]]
  pre = meta.get("tokenizer.ggml.pre")
  # llama.cpp's LLAMA3 pre-tokenizer types take a split that is a whole vocabulary token as it is, before any
  # merge (as Llama 3's tokenizer.json says with "ignore_merges"), and add BOS unless the file says otherwise.
  llama3 = pre in _LLAMA3_PRE
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                             merges=_parse_merges(path, meta["tokenizer.ggml.merges"]), dropout=None,
                             continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                             ignore_merges=llama3))
  tok.pre_tokenizer = _pre_tokenizer(pre, path)
  tok.decoder = decoders.ByteLevel()
  # A control token spelled outside the byte alphabet is a llama.cpp mislabel, not a token (transformers agrees).
  return tok, lambda t: set(t) <= alphabet, llama3


def _sentencepiece_bpe(path, meta: dict[str, Any], arch: str):
  """SentencePiece BPE with byte fallback ("llama": Llama 1/2, Mistral v0.1, Gemma 1/2/3 files).

  The pieces spell a space as "\u2581"; characters outside the vocabulary become their UTF-8 byte pieces
  <0xXX>. A GGUF has no merges for these, only piece scores, so the merges are derived from the scores
  (transformers' `generate_merges`, torch-free). Gemma files get transformers' two Gemma fixes: whitespace-only
  pieces stored with real spaces are respelled with "\u2581", and the merge priority is the order of the pieces in the file (Gemma's
  scores do not follow it). `tokenizer.ggml.add_space_prefix` (llama.cpp's default: on; Gemma files: off)
  prepends "\u2581" the way llama.cpp and SentencePiece do: to every stretch of text, at the start of the input and
  after each control or user-defined token, also when the text already starts with a space (" a" -> "\u2581\u2581a").
  transformers' GGUF Llama tokenizer (Metaspace, prepend_scheme "first") differs there: it adds no prefix after a
  special token, nor to text that starts with a space (which then does not survive decode(encode(x))).
  """
  from tokenizers import Tokenizer, decoders, models, normalizers  # pylint: disable=g-import-not-at-top
  # Every split of every piece into two pieces, ranked by the piece's priority (ties: longer left, longer right):
  # SentencePiece BPE as ranked merges. transformers' converter module imports no torch.
  from transformers.convert_slow_tokenizer import generate_merges  # pylint: disable=g-import-not-at-top

  tokens = list(meta["tokenizer.ggml.tokens"])
  gemma = arch in _GEMMA_SPM_ARCHS
  if gemma:
    tokens = [_METASPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
  vocab = {t: i for i, t in enumerate(tokens)}
  if "tokenizer.ggml.merges" in meta:
    merges = _parse_merges(path, meta["tokenizer.ggml.merges"])
  elif gemma:
    merges = generate_merges(vocab, {t: -float(i) for i, t in enumerate(tokens)})
  else:
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
      raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.scores' is missing (a SentencePiece vocabulary "
                      f"without merges needs its piece scores)")
    if len(scores) != len(tokens):
      raise GGUFError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    merges = generate_merges(vocab, dict(zip(tokens, (float(x) for x in scores))))
  unk_id = meta.get("tokenizer.ggml.unknown_token_id")
  unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                             dropout=None))
  prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not gemma))
  # Normalizers run on each stretch of text between added tokens, so the prefix lands where llama.cpp puts it.
  replace = normalizers.Replace(" ", _METASPACE)
  tok.normalizer = normalizers.Sequence([normalizers.Prepend(_METASPACE), replace]) if prefix else replace
  steps = [decoders.Replace(_METASPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
  return tok, lambda t: True, True


# `tokenizer.ggml.model` -> builder(path, metadata, architecture) returning (tokenizers.Tokenizer, which control
# tokens to keep, llama.cpp's add_bos default).
_TOKENIZER_MODELS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def tokenizer_from_gguf(path: str | os.PathLike):
  """The file's tokenizer and chat template as a `transformers.PreTrainedTokenizerFast`.

  Byte-level BPE (`tokenizer.ggml.model` "gpt2") and SentencePiece BPE with byte fallback ("llama"); other
  tokenizer models (bert, t5, rwkv, ...) raise a GGUFError naming the file and the field.
  """
  from tokenizers import AddedToken, processors  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  reader = open_reader(path)
  meta = read_metadata(reader, tuple(k for k in reader.fields if k.startswith("tokenizer.")))
  if "tokenizer.ggml.model" not in meta:
    raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.model' is missing (the file carries no tokenizer)")
  kind = meta["tokenizer.ggml.model"]
  if kind not in _TOKENIZER_MODELS:
    raise GGUFError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (supported: 'gpt2', byte-level BPE; "
                    f"'llama', SentencePiece BPE)")
  if "tokenizer.ggml.tokens" not in meta:
    raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.tokens' is missing")
  tok, keep_control, add_bos_default = _TOKENIZER_MODELS[kind](path, meta, _arch(reader))
  tokens = meta["tokenizer.ggml.tokens"]  # as the file spells them, like transformers' special/added tokens
  types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
  if len(types) != len(tokens):
    raise GGUFError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
  vocab = tok.get_vocab()
  # Control tokens match whole and are special; user-defined ones match whole and are not special (those the
  # vocabulary spells differently, e.g. Gemma's whitespace runs, are left to the merges, as in transformers).
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
                          if ty == _CONTROL and keep_control(t)])
  tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
                  if ty == _USER_DEFINED and t in vocab])

  def special(key: str) -> str | None:
    idx = meta.get(f"tokenizer.ggml.{key}")
    return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

  bos, eos = special("bos_token_id"), special("eos_token_id")
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
  single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
  pair = single + [s.replace("$A", "$B").replace(":0", ":1") for s in single]
  specials = sorted({(t, vocab[t]) for t in (bos if add_bos else None, eos if add_eos else None) if t})
  tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
  kwargs = dict(bos_token=bos, eos_token=eos, unk_token=special("unknown_token_id"),
                pad_token=special("padding_token_id"), add_bos_token=add_bos, add_eos_token=add_eos,
                clean_up_tokenization_spaces=False)
  if "tokenizer.chat_template" in meta:
    kwargs["chat_template"] = meta["tokenizer.chat_template"]
  ctx = reader.fields.get(f"{_arch(reader)}.context_length")
  if ctx is not None:
    kwargs["model_max_length"] = int(ctx.contents())
  return PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in kwargs.items() if v is not None})


def _arch(reader: GGUFReader) -> str:
  field = reader.fields.get("general.architecture")
  return field.contents() if field is not None else ""


def save_tokenizer_from_gguf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
  """Writes the file's tokenizer as a HF tokenizer directory (tokenizer.json, tokenizer_config.json, ...)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tokenizer_from_gguf(path).save_pretrained(out)
  return out


__all__ = ["GGUFError", "GGUFSource", "gguf_to_hf_name", "read_metadata",
           "save_tokenizer_from_gguf", "tokenizer_from_gguf", "unpermute_rotary_rows", "DEQUANTIZABLE"]
