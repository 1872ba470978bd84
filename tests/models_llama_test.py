"""Llama-family parity with Hugging Face transformers (torch golden), import/export round trips and errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers
from flax import nnx

import models_golden as g
from tregjax import models
from tregjax.models import config as config_lib

TOL = 1e-4  # float32; the max abs difference reached is ~1e-6

VARIANTS = {
    # Llama 2: 6 heads over 3 kv heads (odd), head_dim 12 != 48/6.
    "llama2": dict(g.LLAMA),
    # Llama 3: MQA-like GQA with a single kv head, large rope base.
    "llama3": g.LLAMA | dict(num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    # Llama 3.1: frequency-dependent `llama3` rope scaling with a short original context so every band is hit.
    "llama3p1": g.LLAMA | dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    # Llama 3.2: tied input/output embeddings.
    "llama3p2_tied": g.LLAMA | dict(tie_word_embeddings=True, num_key_value_heads=2),
    "biases": g.LLAMA | dict(attention_bias=True, mlp_bias=True),
    "linear_rope": g.LLAMA | dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}),
    # Mistral: sliding window (4) shorter than the test sequence (12).
    "mistral_window": g.LLAMA | dict(model_type="mistral", sliding_window=4),
    "qwen2_qkv_bias": g.LLAMA | dict(model_type="qwen2"),
    "qwen3_qk_norm": g.LLAMA | dict(model_type="qwen3", attention_bias=False),
}


def _load(path, **kw):
  return models.from_pretrained(path, dtype=jnp.float32, **kw)


@nnx.jit
def _forward(model, tokens, positions, segments):
  return model(tokens, positions=positions, segment_ids=segments)


def _logits(model, tokens=g.TOKENS, segments=g.SEGMENTS, positions=None):
  tokens = np.asarray(tokens)
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
  segments = np.ones_like(tokens) if segments is None else segments
  return np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers_on_padded_batch(name, tmp_path):
  hf = g.build_hf(VARIANTS[name])
  path = g.save_hf(hf, tmp_path / "hf", max_shard_size="40KB")  # force several shards + index.json
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  ref = g.hf_logits(hf, g.TOKENS, g.SEGMENTS)
  out = _logits(_load(path))
  valid = g.SEGMENTS.astype(bool)
  np.testing.assert_allclose(out[valid], ref[valid], atol=TOL, rtol=0)


def test_single_file_checkpoint_without_index_loads(tmp_path):
  hf = g.build_hf(g.LLAMA)
  path = g.save_hf(hf, tmp_path / "hf")
  assert not os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  valid = g.SEGMENTS.astype(bool)
  np.testing.assert_allclose(_logits(_load(path))[valid], g.hf_logits(hf, g.TOKENS, g.SEGMENTS)[valid], atol=TOL)


@pytest.mark.parametrize("name", ["llama3p2_tied", "biases", "qwen2_qkv_bias"])
def test_save_pretrained_round_trips_through_transformers(name, tmp_path):
  hf = g.build_hf(VARIANTS[name], seed=3)
  ours = _load(g.save_hf(hf, tmp_path / "hf"))
  out_dir = str(tmp_path / "ours")
  models.save_pretrained(ours, out_dir, max_shard_size=30_000)
  assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype="float32", attn_implementation="eager")
  valid = g.SEGMENTS.astype(bool)
  np.testing.assert_allclose(g.hf_logits(reloaded, g.TOKENS, g.SEGMENTS)[valid],
                             g.hf_logits(hf, g.TOKENS, g.SEGMENTS)[valid], atol=TOL)
  if VARIANTS[name].get("tie_word_embeddings"):
    with open(os.path.join(out_dir, "model.safetensors.index.json")) as f:
      assert "lm_head.weight" not in json.load(f)["weight_map"]


def test_packed_row_equals_separate_rows():
  cfg = models.ModelConfig.tiny_llama(sliding_window=3, model_type="mistral")
  model = models.from_config(cfg, 0)
  a, b = np.array([5, 9, 13, 2, 7]), np.array([100, 3, 42, 8])
  packed = np.concatenate([a, b, [0, 0, 0]])[None]
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 3])
  positions = np.array([list(range(5)) + list(range(4)) + [0, 0, 0]])
  out = _logits(model, packed, segments, positions)
  np.testing.assert_allclose(out[0, :5], _logits(model, a[None], None)[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 5:9], _logits(model, b[None], None)[0], atol=1e-5)


def test_unstacked_and_remat_variants_compute_the_same_function():
  cfg = models.ModelConfig.tiny_llama()
  tokens = jnp.asarray(g.TOKENS % cfg.vocab_size)
  base = models.from_config(cfg, 0)

  def loss(model):
    return jnp.mean(model(tokens, segment_ids=jnp.asarray(g.SEGMENTS))[..., :7] ** 2)

  value_and_grad = nnx.jit(nnx.value_and_grad(loss))
  ref_val, ref_grad = value_and_grad(base)
  assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(nnx.state(ref_grad)))  # every parameter gets a gradient
  for overrides in (dict(remat="full"), dict(remat="dots", scan_layers=False)):
    other = models.from_config(cfg.replace(**overrides), 0)
    val, grad = value_and_grad(other)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(nnx.state(grad)), jax.tree.leaves(nnx.state(ref_grad))):
      np.testing.assert_allclose(x, y, atol=1e-6)


def test_legacy_rope_scaling_reads_like_rope_parameters():
  new = dict(g.LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
  legacy = {k: v for k, v in g.LLAMA.items() if k != "rope_parameters"}
  legacy |= dict(rope_theta=5e5, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  a, b = models.ModelConfig.from_hf_config(new), models.ModelConfig.from_hf_config(legacy)
  assert a == b
  assert (a.rope_type, a.rope_factor, a.rope_original_max_position, a.rope_theta) == ("llama3", 8.0, 64, 5e5)


def test_to_hf_config_refuses_what_hf_cannot_express():
  with pytest.raises(config_lib.UnsupportedModelError, match="soft-capping"):
    models.ModelConfig.tiny_llama(attn_logit_softcapping=30.0).to_hf_config()
  with pytest.raises(config_lib.UnsupportedModelError, match="sliding"):
    models.ModelConfig.tiny_llama(sliding_window=8).to_hf_config()


# ------------------------------------------------------------------ errors


@pytest.fixture(scope="module")
def single_file_checkpoint(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt"))
  g.build_hf(g.LLAMA).save_pretrained(path)
  return path


def _rewrite(path, dst, mutate_tensors=None, mutate_config=None):
  os.makedirs(dst)
  tensors = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  if mutate_tensors:
    mutate_tensors(tensors)
  if mutate_config:
    mutate_config(cfg)
  safetensors.numpy.save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(dst)


def test_unknown_model_type_is_an_error_listing_supported(single_file_checkpoint, tmp_path):
  path = _rewrite(single_file_checkpoint, tmp_path / "x", mutate_config=lambda c: c.update(model_type="bert"))
  with pytest.raises(config_lib.UnsupportedModelError, match=r"'bert'.*supported.*'gemma2'.*'llama'"):
    _load(path)


def test_unknown_architecture_is_an_error_listing_supported(single_file_checkpoint, tmp_path):
  path = _rewrite(single_file_checkpoint, tmp_path / "x",
                  mutate_config=lambda c: c.update(architectures=["LlamaForTokenClassification"]))
  with pytest.raises(config_lib.UnsupportedModelError, match=r"LlamaForTokenClassification.*LlamaForCausalLM"):
    _load(path)


def test_missing_tensor_is_named(single_file_checkpoint, tmp_path):
  path = _rewrite(single_file_checkpoint, tmp_path / "x",
                  mutate_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(expected shape "
                                       r"\(80, 48\)\)"):
    _load(path)


def test_unexpected_tensor_is_named(single_file_checkpoint, tmp_path):
  path = _rewrite(single_file_checkpoint, tmp_path / "x",
                  mutate_tensors=lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((80, 48))}))
  with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.2\.mlp\.up_proj\.weight"):
    _load(path)


def test_shape_mismatch_names_tensor_and_both_shapes(single_file_checkpoint, tmp_path):
  def shrink(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:24]

  path = _rewrite(single_file_checkpoint, tmp_path / "x", mutate_tensors=shrink)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(24, 48\), "
                                       r"expected \(36, 48\)"):
    _load(path)


def test_pickle_checkpoints_are_refused(tmp_path):
  os.makedirs(tmp_path / "p")
  with open(tmp_path / "p" / "config.json", "w") as f:
    json.dump(g.LLAMA, f)
  (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(FileNotFoundError, match="pickle checkpoints are refused"):
    _load(str(tmp_path / "p"))


def test_tokenizer_larger_than_embedding_is_refused():
  cfg = models.ModelConfig.tiny_llama()
  models.check_tokenizer_vocab(cfg.vocab_size, cfg)  # equal is fine
  with pytest.raises(ValueError, match=r"tokenizer has 300 tokens .* vocab_size=256"):
    models.check_tokenizer_vocab(list(range(300)), cfg)


def test_bfloat16_compute_keeps_float32_params_and_logits(tmp_path):
  hf = g.build_hf(g.LLAMA)
  path = g.save_hf(hf, tmp_path / "hf")
  bf16 = models.from_pretrained(path)  # default: bfloat16 compute, float32 parameters
  assert bf16.model.layers.attn.q_proj[...].dtype == jnp.float32
  hidden = nnx.jit(lambda m, t: m.hidden_states(t))(bf16, jnp.asarray(g.TOKENS))
  assert hidden.dtype == jnp.bfloat16
  out = _logits(bf16)
  assert out.dtype == np.float32
  ref = g.hf_logits(hf, g.TOKENS, g.SEGMENTS)
  valid = g.SEGMENTS.astype(bool)
  err = np.abs(out[valid] - ref[valid]).max()
  assert 1e-4 < err < 0.05 * np.abs(ref[valid]).max()  # bf16 rounding is visible but small


def test_bare_tokenizers_tokenizer_is_saved_and_checked(tmp_path):
  import tokenizers  # pylint: disable=import-outside-toplevel
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
  model = models.from_config(models.ModelConfig.tiny_llama(vocab_size=320), 0)
  models.check_tokenizer_vocab(tok, model)
  models.save_pretrained(model, str(tmp_path / "m"), tokenizer=tok)
  assert tokenizers.Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json")).get_vocab_size() == 300
  assert models.load_config(str(tmp_path / "m")).vocab_size == 320
  with pytest.raises(ValueError, match="tokenizer has 300 tokens"):
    models.check_tokenizer_vocab(tok, models.ModelConfig.tiny_llama())


def test_attention_implementations_agree():
  """The explicit-softmax fallback and a cuDNN request (falls back to XLA off-GPU) match the fused XLA path."""
  cfg = models.ModelConfig.tiny_llama(model_type="mistral", sliding_window=5)
  ref = _logits(models.from_config(cfg.replace(attention_impl="xla"), 0))
  for impl in ("explicit", "cudnn"):
    out = _logits(models.from_config(cfg.replace(attention_impl=impl), 0))
    np.testing.assert_allclose(out[g.SEGMENTS.astype(bool)], ref[g.SEGMENTS.astype(bool)], atol=1e-5)


def test_models_package_never_imports_torch():
  code = ("import sys; from tregjax import models; from tregjax.models import hf_io, decoding, transformer; "
          "models.ModelConfig.tiny_llama(); assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
