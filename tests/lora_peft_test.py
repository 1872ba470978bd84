"""LoRA parity with PEFT in torch (the golden): forward, PEFT import, PEFT export, merged HF export, generation.

Every base parameter and both adapter factors are random (PEFT starts B at zero, which would hide a wrong A or
scale), on tiny Llama and Gemma 2 models. Tolerance: 1e-4 absolute on float32 logits, as the base parity tests
(the max difference reached is ~1e-6: the adapter adds two small matmuls per projection).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import models_golden as g
from tregjax import models
from tregjax.models import adapters

TOL = 1e-4
GEMMA2 = dict(model_type="gemma2", vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1, sliding_window=4,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"], attn_logit_softcapping=5.0,
              final_logit_softcapping=3.0, query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh")
BASES = {"llama": g.LLAMA, "gemma2": GEMMA2}
TARGET_SETS = {"all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               "attention": ["q_proj", "k_proj", "v_proj", "o_proj"]}
VALID = g.SEGMENTS.astype(bool)


@nnx.jit
def _forward(model, tokens, segments):
  return model(tokens, segment_ids=segments)


def _logits(model):
  return np.asarray(_forward(model, jnp.asarray(g.TOKENS), jnp.asarray(g.SEGMENTS)))


def _peft_model(base_name, tmp_path, targets, *, rank=4, alpha=12.0, seed=0):
  """(HF base dir, PEFT model on a fresh copy of the base with random A and B)."""
  hf = g.build_hf(BASES[base_name], seed=seed)
  base_dir = g.save_hf(hf, tmp_path / "base")
  conf = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGET_SETS[targets], lora_dropout=0.0)
  model = peft.get_peft_model(hf, conf)
  gen = torch.Generator().manual_seed(seed + 7)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  model.eval()
  return base_dir, model


def _peft_logits(model):
  return g.hf_logits(model, g.TOKENS, g.SEGMENTS)


@pytest.mark.parametrize("base_name", sorted(BASES))
def test_peft_adapter_loads_and_forward_matches_peft_logits(base_name, tmp_path):
  base_dir, peft_model = _peft_model(base_name, tmp_path, "all_linear")
  adapter_dir = str(tmp_path / "adapter")
  peft_model.save_pretrained(adapter_dir)
  ref = _peft_logits(peft_model)
  ours = adapters.load_adapter(models.from_pretrained(base_dir, dtype=jnp.float32), adapter_dir)
  assert ours.config.lora_rank == 4 and ours.config.lora_alpha == 12.0 and len(ours.config.lora_targets) == 7
  out = _logits(ours)
  np.testing.assert_allclose(out[VALID], ref[VALID], atol=TOL, rtol=0)
  # The adapters matter at this scale: the base alone is far from the adapted logits.
  with peft_model.disable_adapter():
    plain = _peft_logits(peft_model)
  assert np.abs(plain[VALID] - ref[VALID]).max() > 100 * TOL


@pytest.mark.parametrize("base_name", sorted(BASES))
def test_fresh_adapter_leaves_logits_unchanged(base_name, tmp_path):
  hf = g.build_hf(BASES[base_name], seed=2)
  base = models.from_pretrained(g.save_hf(hf, tmp_path / "base"), dtype=jnp.float32)
  adapted = adapters.add_adapters(base, rank=8, alpha=16, targets="all_linear", seed=3)
  a = nnx.state(adapted, nnx.LoRAParam)["model"]["layers"]["attn"]["q_proj_lora"]["lora_a"][...]
  assert float(jnp.abs(a).max()) > 0  # A is random, B is zero
  out = _logits(adapted)
  np.testing.assert_array_equal(out, _logits(base))
  np.testing.assert_allclose(out[VALID], g.hf_logits(hf, g.TOKENS, g.SEGMENTS)[VALID], atol=TOL, rtol=0)


def _random_adapters(model, *, seed):
  """`model` with its adapters' B replaced by random values (A is already random)."""
  state = nnx.state(model, nnx.LoRAParam)
  rng = np.random.default_rng(seed)
  state = nnx.from_flat_state([
      (p, v.replace(jnp.asarray(0.1 * rng.standard_normal(v.get_value().shape), jnp.float32)))
      for p, v in nnx.to_flat_state(state)])
  nnx.update(model, state)
  return model


@pytest.mark.parametrize("base_name,targets", [("llama", "all_linear"), ("gemma2", "attention")])
def test_peft_export_loads_in_peft_and_merged_export_in_transformers(base_name, targets, tmp_path):
  import transformers
  hf = g.build_hf(BASES[base_name], seed=4)
  base_dir = g.save_hf(hf, tmp_path / "base")
  ours = _random_adapters(adapters.add_adapters(models.from_pretrained(base_dir, dtype=jnp.float32), rank=3,
                                            alpha=7, targets=targets, seed=5), seed=6)
  want = _logits(ours)

  adapter_dir = adapters.save_adapter(ours, str(tmp_path / "adapter"), base_model_name_or_path=base_dir)
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    assert sorted(json.load(f)["target_modules"]) == sorted(TARGET_SETS[targets])
  loaded = peft.PeftModel.from_pretrained(g.build_hf(BASES[base_name], seed=4), adapter_dir)
  loaded.eval()
  np.testing.assert_allclose(_peft_logits(loaded)[VALID], want[VALID], atol=TOL, rtol=0)

  merged_dir = str(tmp_path / "merged")
  models.save_pretrained(adapters.merge(ours), merged_dir)
  hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager")
  np.testing.assert_allclose(g.hf_logits(hf_merged, g.TOKENS, g.SEGMENTS)[VALID], want[VALID], atol=TOL, rtol=0)


def test_adapted_model_generates_what_peft_generates(tmp_path):
  """Greedy decoding through the KV cache with adapters in the forward = PEFT's generate = our merged model's."""
  base_dir, peft_model = _peft_model("llama", tmp_path, "all_linear", seed=8)
  adapter_dir = str(tmp_path / "adapter")
  peft_model.save_pretrained(adapter_dir)
  prompt = np.array([[5, 17, 3, 250, 9]], np.int32)
  with torch.no_grad():
    ref = peft_model.generate(input_ids=torch.tensor(prompt, dtype=torch.long), max_new_tokens=6, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, prompt.shape[1]:].numpy()
  ours = adapters.load_adapter(models.from_pretrained(base_dir, dtype=jnp.float32), adapter_dir)
  from tregjax.models import decoding
  import jax
  out = decoding.generate(ours, prompt.tolist(), max_new_tokens=6, key=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out.tokens)[0, :6], ref)
  merged = decoding.generate(adapters.merge(ours), prompt.tolist(), max_new_tokens=6, key=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(merged.tokens)[0, :6], ref)


def test_adapter_config_that_is_not_plain_lora_is_refused_by_field(tmp_path):
  base_dir, peft_model = _peft_model("llama", tmp_path, "attention")
  adapter_dir = str(tmp_path / "adapter")
  peft_model.save_pretrained(adapter_dir)
  path = os.path.join(adapter_dir, "adapter_config.json")
  with open(path) as f:
    conf = json.load(f)
  with open(path, "w") as f:
    json.dump(conf | {"use_dora": True}, f)
  with pytest.raises(ValueError, match="use_dora"):
    adapters.load_adapter(models.from_pretrained(base_dir, dtype=jnp.float32), adapter_dir)


def test_target_presets_and_regex_resolve_to_projections():
  assert adapters.resolve_targets("attention") == ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj")
  assert len(adapters.resolve_targets("all_linear")) == 7
  assert adapters.resolve_targets(r"mlp/(up|down)_proj") == ("mlp/up_proj", "mlp/down_proj")
  with pytest.raises(ValueError, match="config.model.lora.targets"):
    adapters.resolve_targets("embed_tokens")
