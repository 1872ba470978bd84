"""The Qwen2.5-Coder GGUF path (#28) against transformers' own GGUF loader (torch, float32) as the golden.

The real files are 0.5-1.1 GB: loading one into both frameworks takes minutes and ~9 GiB, so the real-file parity
(every dequantized tensor, float32 logits, greedy tokens on chat prompts) is bench/gguf_parity.py. Here: a tiny
qwen2 GGUF written with the `gguf` package in the storage types of the real 0.5B (Q5_0, Q8_0, Q6_K, Q4_K, F32: its
Q4_K_M-style mix), with q/k/v biases and an untied head, through the same checks; a file tregjax cannot read is one
line naming it; and the real 0.5B's metadata (what `python -m tregjax.assets qwen2.5-coder-0.5b` caches).
"""

import numpy as np
import pytest

from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from tregjax import assets
from tregjax.models import gguf as tj_gguf

import gguf_test  # the tiny-GGUF writer (llama.cpp's layout, K-quant blocks) shared with the GGUF import tests

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# The real 0.5B's mix (tensor_types() of the file: F32 121, Q4_K 12, Q5_0 133, Q6_K 12, Q8_0 13) on the tiny model.
QWEN_TYPES = {
    "token_embd.weight": T.Q8_0, "output.weight": T.Q6_K,
    "blk.0.attn_q.weight": T.Q5_0, "blk.0.attn_k.weight": T.Q5_0, "blk.0.attn_v.weight": T.Q8_0,
    "blk.0.attn_output.weight": T.Q5_0, "blk.0.ffn_gate.weight": T.Q5_0, "blk.0.ffn_up.weight": T.Q4_K,
    "blk.0.ffn_down.weight": T.Q6_K, "blk.1.attn_q.weight": T.Q4_K, "blk.1.attn_k.weight": T.Q5_0,
    "blk.1.attn_v.weight": T.Q6_K, "blk.1.attn_output.weight": T.Q8_0, "blk.1.ffn_gate.weight": T.Q5_0,
    "blk.1.ffn_up.weight": T.Q5_0, "blk.1.ffn_down.weight": T.Q4_K,
}


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
  path = tmp_path_factory.mktemp("qwen") / "qwen2.gguf"
  gguf_test.write_tiny_gguf(path, arch="qwen2", types=QWEN_TYPES)
  ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                          local_files_only=True).eval()
  return path, ref


def test_tiny_qwen2_in_the_real_files_quant_types_equals_transformers(tiny_qwen):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top
  from tregjax.models import decoding  # pylint: disable=g-import-not-at-top
  path, ref = tiny_qwen
  src = tj_gguf.GGUFSource(path)
  assert src.tensor_types() == {"F32": 11, "Q4_K": 3, "Q5_0": 7, "Q6_K": 3, "Q8_0": 3}
  state = ref.state_dict()
  assert set(src.keys()) == set(state) and not src.config["tie_word_embeddings"] and src.config["attention_bias"]
  for name in src.keys():  # dequantized tensors: equal to transformers' (both use the gguf package's numpy code)
    np.testing.assert_array_equal(src.get(name), state[name].numpy(), err_msg=name)
  model = models.from_pretrained(str(path), dtype=jnp.float32)
  vocab = src.config["vocab_size"]
  tokens = np.random.default_rng(3).integers(0, vocab, size=(2, 24))
  with torch.no_grad():
    expected = ref(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens, jnp.int32))), expected, rtol=0, atol=2e-4)
  # Greedy tokens through tregjax's KV-cache decoder (rows of two prompt lengths in one batch) vs transformers'.
  prompts = [tokens[0, :5].tolist(), tokens[1, :11].tolist()]
  ours = decoding.generate(model, prompts, max_new_tokens=12, key=jax.random.key(0), pad_id=0)
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      golden = ref.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                            pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert np.asarray(ours.tokens)[row].tolist() == golden, row


def _write(path, arch: str, tensors: dict) -> None:
  writer = GGUFWriter(str(path), arch)
  writer.add_block_count(1)
  writer.add_embedding_length(8)
  writer.add_feed_forward_length(16)
  writer.add_head_count(2)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_vocab_size(4)
  for name, w in tensors.items():
    writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_a_file_tregjax_cannot_read_is_one_line_naming_it(tmp_path):
  f64 = tmp_path / "f64.gguf"  # a storage type the gguf package does not dequantize
  _write(f64, "qwen2", {"token_embd.weight": np.zeros((4, 8), np.float64),
                        "output_norm.weight": np.ones(8, np.float32)})
  with pytest.raises(tj_gguf.GGUFError) as e:
    tj_gguf.GGUFSource(f64)
  assert str(e.value).startswith(f"{f64}: tensor type F64 (e.g. tensor 'token_embd.weight') cannot be dequantized")
  assert "\n" not in str(e.value)
  bert = tmp_path / "bert.gguf"
  _write(bert, "bert", {"token_embd.weight": np.zeros((4, 8), np.float32)})
  with pytest.raises(tj_gguf.GGUFError, match=r"bert\.gguf: general\.architecture='bert' is not supported"):
    tj_gguf.GGUFSource(bert)


def test_real_qwen_05b_file_metadata():
  """The cached 0.5B (fetched once; ~490 MB): the architecture and tensor types #28 states, read by tregjax."""
  path = assets.fetch("qwen2.5-coder-0.5b")
  assert assets.sha256_of(path) == assets.ASSETS["qwen2.5-coder-0.5b"].sha256
  src = tj_gguf.GGUFSource(path)
  assert src.tensor_types() == {"F32": 121, "Q4_K": 12, "Q5_0": 133, "Q6_K": 12, "Q8_0": 13}
  cfg = src.config
  assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
          cfg["num_key_value_heads"], cfg["vocab_size"]) == ("qwen2", 24, 896, 14, 2, 151936)
  tok = transformers.AutoTokenizer.from_pretrained(path.parent / "tokenizer", local_files_only=True)
  assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg["eos_token_id"] == 151645
  text = tok.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}], tokenize=False,
                                 add_generation_prompt=True)
  assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n")
