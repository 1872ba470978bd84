"""Gemma 1 / Gemma 2 parity with Hugging Face transformers (torch golden) and a Gemma 2 round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import models_golden as g
from tregjax import models
from tregjax.models import decoding

TOL = 1e-4

GEMMA = dict(model_type="gemma", vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
             rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=2, eos_token_id=1)
# Gemma 2: sliding window 4 shorter than the 12-token test rows; 3 layers so both layer kinds repeat.
GEMMA2 = GEMMA | dict(model_type="gemma2", num_hidden_layers=3, num_key_value_heads=2, sliding_window=4,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                      attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=24,
                      hidden_activation="gelu_pytorch_tanh")

VARIANTS = {"gemma": GEMMA, "gemma2": GEMMA2, "gemma2_untied": GEMMA2 | dict(tie_word_embeddings=False)}


@nnx.jit
def _forward(model, tokens, segments):
  return model(tokens, segment_ids=segments)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers_on_padded_batch(name, tmp_path):
  hf = g.build_hf(VARIANTS[name])
  ref = g.hf_logits(hf, g.TOKENS, g.SEGMENTS)
  ours = models.from_pretrained(g.save_hf(hf, tmp_path / "hf", max_shard_size="40KB"), dtype=jnp.float32)
  out = np.asarray(_forward(ours, jnp.asarray(g.TOKENS), jnp.asarray(g.SEGMENTS)))
  valid = g.SEGMENTS.astype(bool)
  np.testing.assert_allclose(out[valid], ref[valid], atol=TOL, rtol=0)
  if name.startswith("gemma2"):  # final soft-capping really bounds the logits
    assert np.abs(out).max() < 3.0


def test_gemma2_round_trips_through_transformers(tmp_path):
  hf = g.build_hf(GEMMA2, seed=5)
  ours = models.from_pretrained(g.save_hf(hf, tmp_path / "hf"), dtype=jnp.float32)
  models.save_pretrained(ours, str(tmp_path / "ours"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype="float32",
                                                           attn_implementation="eager")
  valid = g.SEGMENTS.astype(bool)
  np.testing.assert_allclose(g.hf_logits(back, g.TOKENS, g.SEGMENTS)[valid],
                             g.hf_logits(hf, g.TOKENS, g.SEGMENTS)[valid], atol=TOL)


def test_gemma2_kv_cache_greedy_matches_transformers_generate(tmp_path):
  """Sliding-window + soft-capped attention through the cache, against HF's own cached greedy generate."""
  hf = g.build_hf(GEMMA2, seed=9)
  ours = models.from_pretrained(g.save_hf(hf, tmp_path / "hf"), dtype=jnp.float32)
  prompt = [2, 17, 3, 250, 9, 44]
  out = decoding.generate(ours, [prompt], max_new_tokens=8, key=jax.random.key(0))
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
  assert np.asarray(out.tokens[0]).tolist() == ref


# Gemma 3 (text): q/k norms, 5:1 local/global layers with separate RoPE bases, linear scaling on global layers.
GEMMA3 = GEMMA | dict(model_type="gemma3_text", num_hidden_layers=3, num_key_value_heads=2, sliding_window=4,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                      query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh",
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                                          "factor": 8.0}})


def test_gemma3_text_logits_match_transformers_and_round_trip(tmp_path):
  hf = g.build_hf(GEMMA3)
  ref = g.hf_logits(hf, g.TOKENS, g.SEGMENTS)
  ours = models.from_pretrained(g.save_hf(hf, tmp_path / "hf"), dtype=jnp.float32)
  assert ours.config.rope_local_theta == 10000.0 and ours.config.rope_type == "linear"
  valid = g.SEGMENTS.astype(bool)
  out = np.asarray(_forward(ours, jnp.asarray(g.TOKENS), jnp.asarray(g.SEGMENTS)))
  np.testing.assert_allclose(out[valid], ref[valid], atol=TOL, rtol=0)
  models.save_pretrained(ours, str(tmp_path / "ours"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype="float32",
                                                           attn_implementation="eager")
  np.testing.assert_allclose(g.hf_logits(back, g.TOKENS, g.SEGMENTS)[valid], ref[valid], atol=TOL)
