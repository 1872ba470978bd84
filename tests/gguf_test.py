"""GGUF import against transformers' own GGUF loader (torch, float32) as the golden.

The real model is SmolLM2-135M-Instruct (Q4_1/Q8_0/F32 tensors) fetched by `tregjax.assets`; a tiny random
Llama written with the `gguf` package's writer covers the other tensor types (F16, BF16, Q4_0, Q8_0, K-quants),
an untied output head and the bad-input errors. Both heavy goldens (transformers' model and tokenizer) are
loaded once per session.
"""

import math

import numpy as np
import pytest

from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf import quants as gguf_quants

from tregjax import assets
from tregjax.models import gguf as tj_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "What is 17 + 25?",
    "Write a haiku about the sea.",
    "Hello world!\n\nHow are   you?  Résumé, naïve café, 東京 🙂",
    "  leading spaces, x=3.14159; y = 1e-5\tTab <|im_start|> inline",
]
CHATS = [
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}],
]


@pytest.fixture(scope="session")
def smollm2_path():
  return assets.fetch("smollm2")


@pytest.fixture(scope="session")
def hf_gguf_model(smollm2_path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(smollm2_path):
  return transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def tj_tokenizer(smollm2_path):
  return tj_gguf.tokenizer_from_gguf(smollm2_path)


@pytest.fixture(scope="session")
def source(smollm2_path):
  return tj_gguf.GGUFSource(smollm2_path)


# ---------------------------------------------------------------------------------------------------------------
# The real file: tensors, config, tokenizer


def test_smollm2_tensors_equal_transformers_gguf_loader(source, hf_gguf_model):
  state = hf_gguf_model.state_dict()
  # transformers lists the tied head as its own key; the file (and a safetensors export) does not.
  assert set(state) - set(source.keys()) == {"lm_head.weight"}
  assert set(source.keys()) <= set(state)
  types = {source.tensor_type(k) for k in source.keys()}
  assert types == {"Q4_1", "Q8_0", "F32"}
  for name in source.keys():
    ours, ref = source.get(name), state[name].numpy()
    assert ours.dtype == np.float32 and ours.shape == ref.shape, name
    np.testing.assert_array_equal(ours, ref, err_msg=name)


def test_smollm2_config_matches_transformers(source, hf_gguf_model):
  ref = hf_gguf_model.config.to_dict()
  cfg = source.config
  for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "vocab_size",
              "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id"):
    assert cfg[key] == ref[key], key
  assert cfg["rope_parameters"]["rope_theta"] == ref["rope_parameters"]["rope_theta"] == 100000.0
  assert cfg["architectures"] == ["LlamaForCausalLM"]
  assert not any("quant" in k for k in cfg)
  # The config is a plain HF config: transformers builds the same architecture from it.
  rebuilt = transformers.LlamaConfig(**cfg)
  assert rebuilt.num_key_value_heads == 3 and rebuilt.tie_word_embeddings


def test_smollm2_tokenizer_ids_equal_transformers_gguf_tokenizer(tj_tokenizer, hf_gguf_tokenizer):
  ours = tj_tokenizer
  for prompt in PROMPTS:
    ids = ours(prompt)["input_ids"]
    assert ids == hf_gguf_tokenizer(prompt)["input_ids"], prompt
    assert ours.decode(ids) == hf_gguf_tokenizer.decode(ids) == prompt
  # SmolLM's pre-tokenizer puts every digit in its own token (llama.cpp "smollm": \p{N} first).
  assert ours.convert_ids_to_tokens(ours("x 2024")["input_ids"]) == ["x", "Ġ", "2", "0", "2", "4"]
  for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
    assert getattr(ours, attr) == getattr(hf_gguf_tokenizer, attr), attr
  assert ours.eos_token == "<|im_end|>"
  # Control tokens stay whole and are dropped by skip_special_tokens, as in transformers.
  text = "<|im_start|>user\nhi <repo_name> there<|im_end|>\n<|endoftext|>"
  ids = ours(text)["input_ids"]
  assert ids == hf_gguf_tokenizer(text)["input_ids"] and ids[:3] == [1, 4093, 198]
  assert ours.decode(ids, skip_special_tokens=True) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=True)


def test_smollm2_chat_template_renders_identically(smollm2_path, tj_tokenizer, hf_gguf_tokenizer, tmp_path):
  ours = tj_tokenizer
  for chat in CHATS:
    text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == hf_gguf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = ours.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == hf_gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
  assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and text.endswith("<|im_start|>assistant\n")
  # The saved directory is a normal HF tokenizer directory.
  saved = transformers.AutoTokenizer.from_pretrained(tj_gguf.save_tokenizer_from_gguf(smollm2_path, tmp_path))
  assert saved(PROMPTS[2])["input_ids"] == hf_gguf_tokenizer(PROMPTS[2])["input_ids"]
  assert saved.apply_chat_template(CHATS[1], tokenize=False) == hf_gguf_tokenizer.apply_chat_template(
      CHATS[1], tokenize=False)


def _byte_level_gguf(path, pre, extra_tokens, merges, **flags):
  from transformers.convert_slow_tokenizer import bytes_to_unicode  # pylint: disable=g-import-not-at-top
  tokens = [bytes_to_unicode()[b] for b in range(256)] + extra_tokens + ["<|begin_of_text|>"]
  writer = GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types([1] * (len(tokens) - 1) + [3])
  writer.add_token_merges(merges)
  writer.add_bos_token_id(len(tokens) - 1)
  for key, value in flags.items():
    getattr(writer, f"add_{key}")(value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return tokens


def test_llama3_pre_tokenizer_takes_whole_vocabulary_words_before_merges(tmp_path):
  """llama.cpp's LLAMA3 pre-types (llama-bpe, llama3) set ignore_merges (llama-vocab.cpp): a split that is itself a
  vocabulary token is emitted whole even when no merge builds it (Llama 3's tokenizer.json: "ignore_merges": true),
  and BOS is added unless the file says otherwise. Other pre-types merge as usual."""
  extra, merges = ["ab", "abc", "\u0120a"], ["\u0120 a", "a b"]
  tokens = _byte_level_gguf(tmp_path / "l3.gguf", "llama-bpe", extra, merges)
  ids = {t: i for i, t in enumerate(tokens)}
  ours = tj_gguf.tokenizer_from_gguf(tmp_path / "l3.gguf")
  # "abc" is a token no merge makes; " abc" is not a token, so it is merged: \u0120a, b, c.
  assert ours("abc abc")["input_ids"] == [ids["<|begin_of_text|>"], ids["abc"], ids["\u0120a"], ids["b"], ids["c"]]
  _byte_level_gguf(tmp_path / "plain.gguf", "llama-bpe", extra, merges, add_bos_token=False)
  assert tj_gguf.tokenizer_from_gguf(tmp_path / "plain.gguf")("abc")["input_ids"] == [ids["abc"]]
  _byte_level_gguf(tmp_path / "gpt2.gguf", "gpt2", extra, merges)
  assert tj_gguf.tokenizer_from_gguf(tmp_path / "gpt2.gguf")("abc")["input_ids"] == [ids["ab"], ids["c"]]


# ---------------------------------------------------------------------------------------------------------------
# A tiny random Llama written as GGUF: every tensor type transformers can also read, untied head


TINY = dict(hidden=256, inter=512, heads=4, kv_heads=2, layers=2, vocab=320)
GEMMA2_WINDOW = 8


def _dims(arch):
  # transformers reads no head_dim for qwen3 GGUFs and no query_pre_attn_scalar for gemma2 ones, falling back to
  # the config defaults 128 and 256 (right for the real models); head_dim here is chosen to agree with them.
  return {"qwen3": dict(TINY, heads=2, kv_heads=1), "gemma2": dict(TINY, hidden=512, heads=2, kv_heads=1)}.get(
      arch, TINY)
# Random bytes are valid blocks for these K-quants once their float16 scale fields hold sane numbers.
_K_SCALE_BYTES = {T.Q2_K: (80, 84), T.Q3_K: (108, 110), T.Q4_K: (0, 4), T.Q5_K: (0, 4), T.Q6_K: (208, 210)}
TINY_TYPES = {
    "token_embd.weight": T.Q8_0, "output.weight": T.Q6_K,
    "blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_k.weight": T.Q4_1, "blk.0.attn_v.weight": T.F16,
    "blk.0.attn_output.weight": T.BF16, "blk.0.ffn_gate.weight": T.Q4_K, "blk.0.ffn_up.weight": T.Q8_0,
    "blk.0.ffn_down.weight": T.Q5_K, "blk.1.attn_q.weight": T.F32, "blk.1.attn_k.weight": T.Q3_K,
    "blk.1.attn_v.weight": T.Q2_K,
}


def _llama_cpp_permute(w, n_head):
  # convert_hf_to_gguf.py LlamaModel.permute: interleave the two rotary halves of every head.
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_tensors(rng, arch="llama"):
  """GGUF name -> float32 weight in HF layout (before llama.cpp's permutation / norm offset)."""
  d = _dims(arch)
  h, f, v, hd = d["hidden"], d["inter"], d["vocab"], d["hidden"] // d["heads"]
  out = {"token_embd.weight": rng.normal(size=(v, h)), "output_norm.weight": 1 + 0.1 * rng.normal(size=(h,))}
  if arch != "gemma2":  # Gemma ties the head to the embedding
    out["output.weight"] = rng.normal(size=(v, h)) * 0.05
  for i in range(d["layers"]):
    if arch == "qwen2":
      out |= {f"blk.{i}.attn_q.bias": 0.1 * rng.normal(size=(h,)),
              f"blk.{i}.attn_k.bias": 0.1 * rng.normal(size=(d["kv_heads"] * hd,)),
              f"blk.{i}.attn_v.bias": 0.1 * rng.normal(size=(d["kv_heads"] * hd,))}
    if arch == "qwen3":
      out |= {f"blk.{i}.attn_q_norm.weight": 1 + 0.1 * rng.normal(size=(hd,)),
              f"blk.{i}.attn_k_norm.weight": 1 + 0.1 * rng.normal(size=(hd,))}
    if arch == "gemma2":  # HF Gemma norms are zero-centred (the model multiplies by 1 + w)
      out |= {f"blk.{i}.post_attention_norm.weight": 0.1 * rng.normal(size=(h,)),
              f"blk.{i}.post_ffw_norm.weight": 0.1 * rng.normal(size=(h,))}
    out |= {f"blk.{i}.attn_norm.weight": 1 + 0.1 * rng.normal(size=(h,)),
            f"blk.{i}.ffn_norm.weight": 1 + 0.1 * rng.normal(size=(h,)),
            f"blk.{i}.attn_q.weight": rng.normal(size=(h, h)) * 0.05,
            f"blk.{i}.attn_k.weight": rng.normal(size=(d["kv_heads"] * hd, h)) * 0.05,
            f"blk.{i}.attn_v.weight": rng.normal(size=(d["kv_heads"] * hd, h)) * 0.05,
            f"blk.{i}.attn_output.weight": rng.normal(size=(h, h)) * 0.05,
            f"blk.{i}.ffn_gate.weight": rng.normal(size=(f, h)) * 0.05,
            f"blk.{i}.ffn_up.weight": rng.normal(size=(f, h)) * 0.05,
            f"blk.{i}.ffn_down.weight": rng.normal(size=(h, f)) * 0.05}
  return {k: w.astype(np.float32) for k, w in out.items()}


def write_tiny_gguf(path, *, arch="llama", types=None, rope_freqs=None):
  rng = np.random.default_rng(0)
  types = (TINY_TYPES if arch == "llama" else {"blk.0.attn_q.weight": T.Q8_0}) if types is None else types
  tensors = _tiny_tensors(rng, arch)
  d = _dims(arch)
  writer = GGUFWriter(str(path), arch)
  writer.add_block_count(d["layers"])
  writer.add_context_length(512)
  writer.add_embedding_length(d["hidden"])
  writer.add_feed_forward_length(d["inter"])
  writer.add_head_count(d["heads"])
  writer.add_head_count_kv(d["kv_heads"])
  writer.add_rope_freq_base(50000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_rope_dimension_count(d["hidden"] // d["heads"])
  writer.add_vocab_size(d["vocab"])
  if arch == "gemma2":
    writer.add_key_length(d["hidden"] // d["heads"])
    writer.add_value_length(d["hidden"] // d["heads"])
    writer.add_sliding_window(GEMMA2_WINDOW)
    writer.add_attn_logit_softcapping(50.0)
    writer.add_final_logit_softcapping(30.0)
  for name, w in tensors.items():
    if arch == "gemma2" and name.endswith("norm.weight"):
      w = w + 1  # convert_hf_to_gguf.py Gemma2Model: norms stored as w + 1
    if arch == "llama" and name.endswith("attn_q.weight"):  # only LlamaModel permutes
      w = _llama_cpp_permute(w, d["heads"])
    elif arch == "llama" and name.endswith("attn_k.weight"):
      w = _llama_cpp_permute(w, d["kv_heads"])
    qtype = types.get(name, T.F32)
    if qtype in _K_SCALE_BYTES or qtype == T.Q8_K:
      block, size = gguf_quants.GGML_QUANT_SIZES[qtype]
      raw = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
      lo, hi = _K_SCALE_BYTES.get(qtype, (0, 0))
      raw[..., lo:hi] = np.frombuffer(np.full((hi - lo) // 2, 0.002, np.float16).tobytes(), np.uint8)
      writer.add_tensor(name, raw.reshape(w.shape[0], -1), raw_dtype=qtype)
    elif qtype == T.F32:
      writer.add_tensor(name, w)
    else:
      writer.add_tensor(name, gguf_quants.quantize(w, qtype), raw_dtype=qtype)
  if rope_freqs is not None:
    writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
  return path, write_tiny_gguf(path)


def test_tiny_all_types_equal_transformers_gguf_loader(tiny_gguf):
  path, _ = tiny_gguf
  ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
  state = ref.state_dict()
  src = tj_gguf.GGUFSource(path)
  assert not src.config["tie_word_embeddings"] and "lm_head.weight" in src.keys()
  assert set(src.keys()) == set(state)
  assert {src.tensor_type(k) for k in src.keys()} == {t.name for t in TINY_TYPES.values()} | {"F32"}
  for name in src.keys():
    np.testing.assert_allclose(src.get(name), state[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
  cfg = ref.config.to_dict()
  for key in ("hidden_size", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings"):
    assert src.config[key] == cfg[key], key
  assert src.config["rope_parameters"]["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 50000.0


def test_rotary_permutation_is_undone_exactly(tiny_gguf):
  # blk.1.attn_q is stored in F32, so the only change between the HF weight and the file is llama.cpp's permute.
  path, original = tiny_gguf
  src = tj_gguf.GGUFSource(path)
  np.testing.assert_array_equal(src.get("model.layers.1.self_attn.q_proj.weight"), original["blk.1.attn_q.weight"])
  np.testing.assert_array_equal(src.get("model.layers.0.mlp.gate_proj.weight").shape, (TINY["inter"], TINY["hidden"]))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma2"])
def test_other_architectures_match_transformers_gguf_loader(arch, tmp_path):
  """Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma2 (norms stored +1, post-norms, tied, soft-capping, sliding
  window): tensors equal transformers' GGUF loader, and our model's logits equal transformers' model from the file."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top
  path = tmp_path / f"{arch}.gguf"
  original = write_tiny_gguf(path, arch=arch)
  ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
  ref.eval()
  state = ref.state_dict()
  src = tj_gguf.GGUFSource(path)
  assert set(src.keys()) == set(state) - ({"lm_head.weight"} if src.config["tie_word_embeddings"] else set())
  for name in src.keys():
    np.testing.assert_allclose(src.get(name), state[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
  # No permutation outside Llama; Gemma's +1 undone exactly (F32 tensors).
  np.testing.assert_allclose(src.get("model.layers.1.self_attn.k_proj.weight"), original["blk.1.attn_k.weight"],
                             rtol=0, atol=1e-7)
  np.testing.assert_allclose(src.get("model.norm.weight"), original["output_norm.weight"], rtol=0, atol=1e-6)
  model = models.from_pretrained(str(path), dtype=jnp.float32)
  tokens = np.random.default_rng(1).integers(0, TINY["vocab"], size=(2, 3 * GEMMA2_WINDOW))
  with torch.no_grad():
    expected = ref(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens, jnp.int32))), expected, rtol=0, atol=2e-4)


GEMMA1 = dict(model_type="gemma", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
              hidden_act="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=2, eos_token_id=1)


def test_gemma1_gguf_with_sentencepiece_vocab_matches_the_hf_model_it_was_written_from(tmp_path):
  """Gemma 1 (head_dim 32 x 4 heads != width 64, GeGLU-tanh, norms stored +1, tied, embeddings x sqrt(width)) with
  a Gemma SentencePiece vocabulary, end to end: GGUF -> our model + tokenizer -> HF directory -> transformers.

  transformers' GGUF loader refuses architecture "gemma", so the golden is the HF GemmaForCausalLM the file is
  written from, the way llama.cpp's GemmaModel converter writes it: llama.cpp's own tensor-name map, norms + 1,
  lm_head dropped, head_dim as key/value_length, no rope_freq_base and no vocab_size (the token list gives it).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import gguf  # pylint: disable=g-import-not-at-top
  import gguf_spm_test  # pylint: disable=g-import-not-at-top
  import models_golden  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top
  tokens, scores, types = gguf_spm_test.spm_vocab(gguf_spm_test.GEMMA_HEAD)
  hf = models_golden.build_hf(GEMMA1 | {"vocab_size": len(tokens)}, seed=3)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA, GEMMA1["num_hidden_layers"])
  path = tmp_path / "gemma.gguf"
  writer = GGUFWriter(str(path), "gemma")
  for name, w in state.items():
    if name != "lm_head.weight":
      writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), w + 1 if name.endswith("norm.weight") else w)
  writer.add_context_length(256)
  writer.add_embedding_length(64)
  writer.add_block_count(2)
  writer.add_feed_forward_length(96)
  writer.add_head_count(4)
  writer.add_head_count_kv(2)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_key_length(32)
  writer.add_value_length(32)
  writer.add_tokenizer_model("llama")
  writer.add_token_list(tokens)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_unk_token_id(3)
  writer.add_pad_token_id(0)
  writer.add_add_space_prefix(False)
  writer.add_chat_template(gguf_spm_test.GEMMA_TEMPLATE)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  src = tj_gguf.GGUFSource(path)
  assert set(src.keys()) == set(state) - {"lm_head.weight"} and src.config["tie_word_embeddings"]
  for name in src.keys():
    np.testing.assert_allclose(src.get(name), state[name], rtol=0, atol=1e-6, err_msg=name)
  hf_config = hf.config.to_dict()
  for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "hidden_act", "bos_token_id", "eos_token_id",
              "pad_token_id"):
    assert src.config[key] == hf_config[key], key
  assert src.config["rms_norm_eps"] == pytest.approx(hf_config["rms_norm_eps"], rel=1e-6)  # stored as float32
  assert src.config["rope_parameters"]["rope_theta"] == hf_config["rope_parameters"]["rope_theta"] == 10000.0
  model = models.from_pretrained(str(path), dtype=jnp.float32)
  tok = tj_gguf.tokenizer_from_gguf(path)
  chat = [{"role": "user", "content": "Which answer is chosen?  東京"}]
  rows = [tok(t)["input_ids"] for t in ("The reward model scores the chosen answer.", "two  spaces\nand 🙂")]
  rows.append(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"])
  width = max(len(r) for r in rows)
  tokens_np = np.asarray([r + [0] * (width - len(r)) for r in rows], np.int32)
  segments = np.asarray([[1] * len(r) + [0] * (width - len(r)) for r in rows], np.int32)
  expected = models_golden.hf_logits(hf, tokens_np, segments)
  ours = np.asarray(model(jnp.asarray(tokens_np), segment_ids=jnp.asarray(segments)))
  valid = segments.astype(bool)
  np.testing.assert_allclose(ours[valid], expected[valid], rtol=0, atol=2e-5)
  # Saved with its tokenizer: a plain HF Gemma directory that transformers loads to the same ids and logits.
  out = tmp_path / "hf"
  models.save_pretrained(model, str(out), tokenizer=tok)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(back).__name__ == "GemmaForCausalLM"
  np.testing.assert_allclose(models_golden.hf_logits(back, tokens_np, segments)[valid], expected[valid], rtol=0,
                             atol=2e-5)
  back_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert back_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"] == rows[2]
  assert [back_tok(t)["input_ids"] for t in ("The reward model scores the chosen answer.", "two  spaces\nand 🙂")] \
      == rows[:2]
  assert back_tok.decode(rows[1], skip_special_tokens=True) == "two  spaces\nand 🙂"


# Gemma 3 text, tiny: 6 layers so llama.cpp's fixed pattern gives 5 sliding layers and a global one; window 4 shorter
# than the 12-token rows; head_dim 256 x 2 heads != width 64 (transformers' GGUF loader assumes query_pre_attn_scalar
# 256, the default); linear RoPE scaling on the global layers (4B and larger), plain base 10000 on the sliding ones.
GEMMA3 = dict(model_type="gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
              num_attention_heads=2, num_key_value_heads=1, head_dim=256, max_position_embeddings=256,
              rms_norm_eps=1e-6, sliding_window=4, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
              pad_token_id=0, bos_token_id=2, eos_token_id=1,
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}})


def _write_gemma3_gguf(path, state, *, rope_scaling=True):
  """The file llama.cpp's Gemma3Model converter writes for a text-only Gemma 3: its tensor-name map, every norm
  (q/k norms too) + 1, lm_head dropped, head_dim as key/value_length, sliding window, linear scaling if any."""
  import gguf  # pylint: disable=g-import-not-at-top
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, GEMMA3["num_hidden_layers"])
  writer = GGUFWriter(str(path), "gemma3")
  for name, w in state.items():
    if name != "lm_head.weight":
      writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), w + 1 if name.endswith("norm.weight") else w)
  writer.add_context_length(GEMMA3["max_position_embeddings"])
  writer.add_embedding_length(GEMMA3["hidden_size"])
  writer.add_block_count(GEMMA3["num_hidden_layers"])
  writer.add_feed_forward_length(GEMMA3["intermediate_size"])
  writer.add_head_count(GEMMA3["num_attention_heads"])
  writer.add_head_count_kv(GEMMA3["num_key_value_heads"])
  writer.add_layer_norm_rms_eps(GEMMA3["rms_norm_eps"])
  writer.add_key_length(GEMMA3["head_dim"])
  writer.add_value_length(GEMMA3["head_dim"])
  writer.add_rope_freq_base(1e6)
  writer.add_sliding_window(GEMMA3["sliding_window"])
  if rope_scaling:
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(8.0)
  writer.add_vocab_size(GEMMA3["vocab_size"])
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_pad_token_id(0)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gemma3_gguf_matches_the_hf_model_it_was_written_from_and_transformers_gguf_loader(tmp_path):
  """Gemma 3 text (q/k norms, norms stored +1, 5:1 sliding/global layers with their own RoPE bases, linear scaling
  on the global ones, tied): tensors and padded-batch logits equal the HF Gemma3ForCausalLM the file was written
  from; tensors and config also equal transformers' own GGUF loader."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import models_golden  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top
  hf = models_golden.build_hf(GEMMA3, seed=5)
  assert type(hf).__name__ == "Gemma3ForCausalLM"
  assert hf.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  path = tmp_path / "gemma3.gguf"
  _write_gemma3_gguf(path, state)
  src = tj_gguf.GGUFSource(path)
  assert set(src.keys()) == set(state) - {"lm_head.weight"} and src.config["tie_word_embeddings"]
  for name in src.keys():  # F32 tensors: the +1 is undone exactly up to float32 rounding
    np.testing.assert_allclose(src.get(name), state[name], rtol=0, atol=1e-6, err_msg=name)
  hf_config = hf.config.to_dict()
  for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "hidden_activation", "sliding_window", "layer_types",
              "query_pre_attn_scalar", "rope_parameters", "attn_logit_softcapping", "final_logit_softcapping",
              "bos_token_id", "eos_token_id", "pad_token_id"):
    assert src.config[key] == hf_config[key], key
  assert src.config["rms_norm_eps"] == pytest.approx(hf_config["rms_norm_eps"], rel=1e-6)  # stored as float32
  # The config is a plain HF config: transformers builds the same Gemma 3 from it.
  rebuilt = transformers.Gemma3TextConfig(**src.config)
  assert rebuilt.layer_types == hf.config.layer_types and rebuilt.rope_parameters == hf.config.rope_parameters
  model = models.from_pretrained(str(path), dtype=jnp.float32)
  assert model.config.rope_local_theta == 10000.0 and model.config.rope_type == "linear"
  expected = models_golden.hf_logits(hf, models_golden.TOKENS, models_golden.SEGMENTS)
  ours = np.asarray(model(jnp.asarray(models_golden.TOKENS), segment_ids=jnp.asarray(models_golden.SEGMENTS)))
  valid = models_golden.SEGMENTS.astype(bool)
  np.testing.assert_allclose(ours[valid], expected[valid], rtol=0, atol=2e-5)
  # transformers' GGUF loader: same tensors, head_dim, window and layer pattern (it reads no RoPE scaling, so its
  # logits are compared on a file without scaling).
  ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
  ref_state = ref.state_dict()
  assert set(src.keys()) == set(ref_state) - {"lm_head.weight"}
  for name in src.keys():
    np.testing.assert_allclose(src.get(name), ref_state[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
  for key in ("head_dim", "sliding_window", "layer_types", "query_pre_attn_scalar"):
    assert getattr(ref.config, key) == src.config[key], key
  plain = tmp_path / "plain" / "gemma3.gguf"
  plain.parent.mkdir()
  _write_gemma3_gguf(plain, state, rope_scaling=False)
  ref = transformers.AutoModelForCausalLM.from_pretrained(plain.parent, gguf_file=plain.name, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
  ours = np.asarray(models.from_pretrained(str(plain), dtype=jnp.float32)(
      jnp.asarray(models_golden.TOKENS), segment_ids=jnp.asarray(models_golden.SEGMENTS)))
  expected_plain = models_golden.hf_logits(ref, models_golden.TOKENS, models_golden.SEGMENTS)
  np.testing.assert_allclose(ours[valid], expected_plain[valid], rtol=0, atol=2e-5)
  assert np.abs(expected_plain[valid] - expected[valid]).max() > 1e-3  # the scaling did matter above


@pytest.mark.parametrize("layers,hidden,heads,head_dim,scalar", [(62, 5376, 32, 128, 168), (48, 3840, 16, 256, 256)])
def test_gemma3_query_scale_follows_llama_cpp_per_size(layers, hidden, heads, head_dim, scalar, tmp_path):
  """llama.cpp scales Gemma 3 queries by 1/sqrt(head_dim) except for the 27B (62 layers): 1/sqrt(hidden/heads).
  Golden: query_pre_attn_scalar in the released google/gemma-3-27b and -12b config.json (168 and 256)."""
  path = tmp_path / "meta.gguf"
  writer = GGUFWriter(str(path), "gemma3")
  writer.add_block_count(layers)
  writer.add_embedding_length(hidden)
  writer.add_feed_forward_length(4 * hidden)
  writer.add_head_count(heads)
  writer.add_head_count_kv(heads // 2)
  writer.add_key_length(head_dim)
  writer.add_value_length(head_dim)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_vocab_size(262208)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  config = tj_gguf.GGUFSource(path).config
  assert config["query_pre_attn_scalar"] == scalar
  assert config["layer_types"].count("full_attention") == layers // 6 and config["layer_types"][5] == "full_attention"
  assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1e6  # Gemma3Model's default rope_theta


def _llama_cpp_llama3_rope_freqs(head_dim, theta, factor=8.0, low=1.0, high=4.0, old_len=8192):
  # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, written out as a loop as there.
  factors = []
  for freq in 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
    wavelen = 2 * math.pi / freq
    if wavelen < old_len / high:
      factors.append(1.0)
    elif wavelen > old_len / low:
      factors.append(factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(factors, np.float32)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
  """Llama 3.1/3.2 GGUFs keep "llama3" RoPE scaling only as rope_freqs.weight; the config must say llama3 again and
  the logits must equal transformers' LlamaForCausalLM with that rope_parameters and the same weights."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top
  path = tmp_path / "llama31.gguf"
  head_dim = TINY["hidden"] // TINY["heads"]
  write_tiny_gguf(path, types={}, rope_freqs=_llama_cpp_llama3_rope_freqs(head_dim, 50000.0, factor=32.0))
  # (transformers' own GGUF loader ignores rope_freqs.weight, so the golden is its Llama built from our config.)
  src = tj_gguf.GGUFSource(path)
  assert "rope_freqs.weight" not in src.keys()
  assert src.config["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 32.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**src.config)).eval()
  ref.load_state_dict({k: torch.from_numpy(np.array(src.get(k))) for k in src.keys()}, strict=True)
  plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(src.config | {
      "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}))).eval()
  plain.load_state_dict(ref.state_dict())
  tokens = np.random.default_rng(2).integers(0, TINY["vocab"], size=(1, 16))
  positions = 6000 + np.arange(16)[None]  # far out, where the scaled low frequencies matter
  with torch.no_grad():
    expected = ref(torch.from_numpy(tokens), position_ids=torch.from_numpy(positions)).logits.numpy()
    unscaled = plain(torch.from_numpy(tokens), position_ids=torch.from_numpy(positions)).logits.numpy()
  model = models.from_pretrained(str(path), dtype=jnp.float32)
  ours = np.asarray(model(jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(positions, jnp.int32)))
  np.testing.assert_allclose(ours, expected, rtol=0, atol=5e-5)
  # The scaling is visible at these positions (small random weights: attention is nearly uniform).
  assert np.abs(ours - unscaled).max() > 1e-3


def test_rope_freqs_of_another_scaling_are_refused(tmp_path):
  path = tmp_path / "odd.gguf"
  head_dim = TINY["hidden"] // TINY["heads"]
  write_tiny_gguf(path, types={}, rope_freqs=_llama_cpp_llama3_rope_freqs(head_dim, 50000.0, high=2.0))
  with pytest.raises(tj_gguf.GGUFError, match=r"odd\.gguf: tensor 'rope_freqs\.weight' does not match Llama-3 RoPE"):
    tj_gguf.GGUFSource(path)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the file and the tensor or field


def test_truncated_file_names_file_and_tensor(tiny_gguf, tmp_path):
  path, _ = tiny_gguf
  cut = tmp_path / "cut.gguf"
  data = path.read_bytes()
  cut.write_bytes(data[: len(data) - 1000])
  with pytest.raises(tj_gguf.GGUFError, match=r"cut\.gguf.*tensor 'blk\.1\.ffn_down\.weight'.*truncated"):
    tj_gguf.GGUFSource(cut)
  cut.write_bytes(data[:40])
  with pytest.raises(tj_gguf.GGUFError, match=r"cut\.gguf: not a readable GGUF file"):
    tj_gguf.GGUFSource(cut)


def test_corrupt_magic_is_refused(tmp_path):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"NOPE" + bytes(200))
  with pytest.raises(tj_gguf.GGUFError, match=r"bad\.gguf: not a readable GGUF file.*magic"):
    tj_gguf.GGUFSource(bad)


def test_unsupported_architecture_names_field(tmp_path):
  path = tmp_path / "falcon.gguf"
  write_tiny_gguf(path, arch="falcon", types={})
  with pytest.raises(tj_gguf.GGUFError, match=r"falcon\.gguf: general\.architecture='falcon' is not supported"):
    tj_gguf.GGUFSource(path)


def test_undequantizable_tensor_type_names_tensor(tmp_path):
  path = tmp_path / "q8k.gguf"
  write_tiny_gguf(path, types={"output.weight": T.Q8_K})  # gguf has no numpy dequantization for Q8_K
  # Refused when the file is opened (before any model is built), naming the file, the type and a tensor of it.
  with pytest.raises(tj_gguf.GGUFError, match=r"q8k\.gguf: tensor type Q8_K \(e\.g\. tensor 'output\.weight'\) cannot "
                                              r"be dequantized by the gguf package"):
    tj_gguf.GGUFSource(path)


def test_missing_metadata_field_is_named(tmp_path):
  path = tmp_path / "nohead.gguf"
  writer = GGUFWriter(str(path), "llama")
  writer.add_block_count(1)
  writer.add_embedding_length(64)
  writer.add_feed_forward_length(128)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_vocab_size(32)
  writer.add_tensor("token_embd.weight", np.zeros((32, 64), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(tj_gguf.GGUFError, match=r"nohead\.gguf: metadata field 'llama\.attention\.head_count'"):
    tj_gguf.GGUFSource(path)


# ---------------------------------------------------------------------------------------------------------------
# The tregjax model loaded from the GGUF file against transformers' GGUF model, float32


@pytest.fixture(scope="session")
def tj_model(smollm2_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top
  return models.from_pretrained(str(smollm2_path), dtype=jnp.float32, param_dtype=jnp.float32)


@pytest.fixture(scope="session")
def chat_ids(tj_tokenizer):
  """Token ids of real chat-formatted prompts of different lengths."""
  tok = tj_tokenizer
  chats = CHATS + [[{"role": "user", "content": PROMPTS[1]}]]
  texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
  return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _hf_logits(model, rows):
  """Right-padded batch through transformers with an attention mask; returns [B, T, V] numpy."""
  width = max(len(r) for r in rows)
  ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
  mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask).logits.numpy()


def test_smollm2_logits_match_transformers_batched_and_single(tj_model, hf_gguf_model, chat_ids):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  lengths = [len(r) for r in chat_ids]
  assert len(set(lengths)) == len(lengths)  # different lengths, so the batch is really padded
  width = max(lengths)
  tokens = jnp.asarray([r + [0] * (width - len(r)) for r in chat_ids], jnp.int32)
  segment_ids = jnp.asarray([[1] * len(r) + [0] * (width - len(r)) for r in chat_ids], jnp.int32)
  ours_batched = np.asarray(tj_model(tokens, segment_ids=segment_ids))
  ref_batched = _hf_logits(hf_gguf_model, chat_ids)
  worst = 0.0
  for i, n in enumerate(lengths):
    ours_single = np.asarray(tj_model(jnp.asarray([chat_ids[i]], jnp.int32)))[0]
    ref_single = _hf_logits(hf_gguf_model, [chat_ids[i]])[0]
    for ours, ref in ((ours_batched[i, :n], ref_batched[i, :n]), (ours_single, ref_single)):
      worst = max(worst, float(np.abs(ours - ref).max()))
      # Reached: max |diff| ~1.2e-4 over 30 layers in float32 (logits of magnitude ~20); argmax agrees everywhere.
      np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)
      np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
  print(f"max |logits - transformers| = {worst:.2e}")


def test_save_pretrained_of_gguf_model_loads_in_transformers(tj_model, hf_gguf_model, tj_tokenizer,
                                                             hf_gguf_tokenizer, chat_ids, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from tregjax import models  # pylint: disable=g-import-not-at-top
  out = tmp_path / "smollm2-hf"
  models.save_pretrained(tj_model, str(out), tokenizer=tj_tokenizer)
  config_text = (out / "config.json").read_text()
  assert not any(w in config_text.lower() for w in ("quant", "gguf")), config_text
  assert json.loads(config_text)["tie_word_embeddings"] is True
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert not hasattr(reloaded.config, "quantization_config")
  rows = chat_ids[:2]
  np.testing.assert_allclose(_hf_logits(reloaded, rows), _hf_logits(hf_gguf_model, rows), rtol=0, atol=1e-5)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  hf_tok = hf_gguf_tokenizer
  assert tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True) == \
      hf_tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
  assert tok(PROMPTS[2])["input_ids"] == hf_tok(PROMPTS[2])["input_ids"]


def test_smollm2_greedy_kv_cache_decoding_equals_transformers_generate(tj_model, hf_gguf_model, chat_ids):
  import jax  # pylint: disable=g-import-not-at-top
  from tregjax.models import decoding  # pylint: disable=g-import-not-at-top
  new = 32
  eos = hf_gguf_model.config.eos_token_id
  out = decoding.generate(tj_model, chat_ids, max_new_tokens=new, key=jax.random.key(0), temperature=0.0,
                          eos_ids=(eos,), pad_id=eos)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for i, prompt in enumerate(chat_ids):
    with torch.no_grad():
      ref = hf_gguf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    ref_new = ref[0, len(prompt):].tolist()
    assert lengths[i] == len(ref_new), (i, lengths[i], ref_new)
    assert tokens[i, :lengths[i]].tolist() == ref_new, i
    assert (tokens[i, lengths[i]:] == eos).all()
