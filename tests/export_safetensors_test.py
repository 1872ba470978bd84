"""The streaming safetensors writer (tregjax.models.safetensors.write: header from shapes and dtypes first, then each
tensor's bytes as its thunk produces it) writes the bytes of safetensors' own `save_file`, the golden, for a small
Llama-shaped model of mixed dtypes, and calls each thunk once, in order, only when its bytes are due."""

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from tregjax.models import safetensors as st

V, D, F, L = 96, 32, 64, 2
# safetensors' `Dtype` enum (safetensors/src/tensor.rs), in declaration order
SAFETENSORS_DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                           "F64", "I64", "U64"]


def _model(rng) -> dict[str, np.ndarray]:
  bf16 = lambda *s: rng.standard_normal(s).astype(ml_dtypes.bfloat16)  # noqa: E731
  out = {"model.embed_tokens.weight": bf16(V, D), "lm_head.weight": bf16(V, D),
         "model.norm.weight": rng.standard_normal(D).astype(np.float32)}
  for i in range(L):
    p = f"model.layers.{i}."
    out.update({p + "self_attn.q_proj.weight": bf16(D, D), p + "self_attn.k_proj.weight": bf16(D // 2, D),
                p + "self_attn.v_proj.weight": bf16(D // 2, D), p + "self_attn.o_proj.weight": bf16(D, D),
                p + "mlp.gate_proj.weight": bf16(F, D), p + "mlp.up_proj.weight": bf16(F, D),
                p + "mlp.down_proj.weight": rng.standard_normal((D, F)).astype(np.float16),
                p + "input_layernorm.weight": rng.standard_normal(D).astype(np.float32),
                p + "post_attention_layernorm.weight": rng.standard_normal(D).astype(np.float32)})
  out["rotary.inv_freq_steps"] = np.arange(D // 2, dtype=np.int64)
  return out


def test_streamed_writer_writes_the_bytes_of_safetensors_save_file(tmp_path):
  tensors = _model(np.random.default_rng(0))
  golden = tmp_path / "golden.safetensors"
  save_file(tensors, str(golden), metadata={"format": "pt"})
  # safetensors lays tensors out by its Dtype enum, last first (I64, F32, BF16, F16 here), then by name: the writer
  # takes any order, so give it that one; each thunk is called when its bytes are due and only then
  order = sorted(tensors, key=lambda n: (-SAFETENSORS_DTYPE_ORDER.index(st.NAMES[tensors[n].dtype]), n))
  called = []

  def thunk(name):
    def produce():
      called.append(name)
      return tensors[name]
    return produce

  items = [(n, tensors[n].shape, tensors[n].dtype, thunk(n)) for n in order]
  ours = tmp_path / "ours.safetensors"
  st.write(str(ours), items, metadata={"format": "pt"})
  assert called == order
  assert ours.read_bytes() == golden.read_bytes()


def test_any_order_reads_back_through_safetensors(tmp_path):
  tensors = _model(np.random.default_rng(1))
  path = tmp_path / "layer_order.safetensors"  # the export's order: layer by layer, as the checkpoint is read
  st.write(str(path), [(n, x.shape, x.dtype, lambda x=x: x) for n, x in tensors.items()])
  back = load_file(str(path))
  assert sorted(back) == sorted(tensors)
  for n, x in tensors.items():
    assert back[n].dtype == x.dtype and np.array_equal(back[n].view(np.uint8), x.view(np.uint8)), n
