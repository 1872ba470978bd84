"""Reward model (HF *ForSequenceClassification `score` head): per-position and last-token parity with transformers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import models_golden as g
from tregjax import models

TOL = 1e-4


def _hf_position_scores(hf, tokens, mask):
  """HF's own backbone + score head applied at every position (what R3HF needs)."""
  with torch.no_grad():
    h = hf.model(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
    return hf.score(h)[..., 0].numpy()


def _hf_pooled(hf, tokens, mask):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(tokens, dtype=torch.long),
              attention_mask=torch.tensor(mask, dtype=torch.long)).logits[:, 0].numpy()


@nnx.jit
def _scores(model, tokens, segments):
  return model.scores(tokens, segment_ids=segments), model.sequence_scores(tokens, segment_ids=segments)


def test_reward_scores_match_transformers_sequence_classification(tmp_path):
  # pad_token_id=0 never occurs among real tokens, so HF's pad-based pooling finds the same last token as ours.
  hf = g.build_hf(g.LLAMA | dict(num_labels=1, num_key_value_heads=2), seq_cls=True)
  path = g.save_hf(hf, tmp_path / "rm", max_shard_size="40KB")
  rm = models.from_pretrained(path, dtype=jnp.float32)
  assert isinstance(rm, models.RewardModel) and rm.config.num_labels == 1
  per_pos, pooled = _scores(rm, jnp.asarray(g.TOKENS), jnp.asarray(g.SEGMENTS))
  valid = g.SEGMENTS.astype(bool)
  np.testing.assert_allclose(np.asarray(per_pos)[valid], _hf_position_scores(hf, g.TOKENS, g.SEGMENTS)[valid],
                             atol=TOL)
  np.testing.assert_allclose(np.asarray(pooled), _hf_pooled(hf, g.TOKENS, g.SEGMENTS), atol=TOL)
  # The pooled score is the per-position score at the last real token (index 11 and 4).
  np.testing.assert_allclose(np.asarray(pooled), np.asarray(per_pos)[[0, 1], [11, 4]], atol=1e-6)


def test_reward_model_round_trips_through_transformers(tmp_path):
  cfg = models.ModelConfig.tiny_llama(num_labels=1, pad_token_id=0)
  rm = models.from_config(cfg, 1)
  models.save_pretrained(rm, str(tmp_path / "rm"))
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), dtype="float32")
  _, pooled = _scores(rm, jnp.asarray(g.TOKENS), jnp.asarray(g.SEGMENTS))
  np.testing.assert_allclose(_hf_pooled(hf, g.TOKENS, g.SEGMENTS), np.asarray(pooled), atol=TOL)


@pytest.mark.parametrize("tied", [False, True])  # tied: no lm_head tensor in the checkpoint (SmolLM2, Gemma)
def test_causal_lm_checkpoint_loads_as_reward_model_with_new_head(tmp_path, tied):
  hf = g.build_hf(dict(g.LLAMA, tie_word_embeddings=tied))
  path = g.save_hf(hf, tmp_path / "lm")
  rm = models.from_pretrained(path, dtype=jnp.float32, config_overrides={"num_labels": 1})
  assert isinstance(rm, models.RewardModel)
  score = np.asarray(rm.score[...])
  assert score.shape == (48, 1) and 0.01 < score.std() < 0.04  # fresh N(0, 0.02) head
  # The backbone is the checkpoint's: per-position scores = HF hidden states @ our head.
  with torch.no_grad():
    h = hf.model(input_ids=torch.tensor(g.TOKENS, dtype=torch.long),
                 attention_mask=torch.tensor(g.SEGMENTS, dtype=torch.long)).last_hidden_state.numpy()
  per_pos, _ = _scores(rm, jnp.asarray(g.TOKENS), jnp.asarray(g.SEGMENTS))
  valid = g.SEGMENTS.astype(bool)
  np.testing.assert_allclose(np.asarray(per_pos)[valid], (h @ score)[..., 0][valid], atol=TOL)


def test_export_takes_pad_id_from_tokenizer_so_transformers_scores_padded_batches(tmp_path):
  import data_common  # pylint: disable=import-outside-toplevel
  tok = transformers.AutoTokenizer.from_pretrained(data_common.byte_level_bpe(str(tmp_path / "tok")))
  cfg = models.ModelConfig.tiny_llama(num_labels=1, vocab_size=len(tok))  # a random-init preset: pad_token_id None
  assert cfg.pad_token_id is None
  rm = models.from_config(cfg, 2)
  models.save_pretrained(rm, str(tmp_path / "rm"), tokenizer=tok)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), dtype="float32")
  assert hf.config.pad_token_id == tok.pad_token_id
  enc = tok(["What is two plus two?", "Be concise."], padding=True, return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  assert mask.min() == 0  # the batch really is padded
  _, pooled = _scores(rm, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(_hf_pooled(hf, ids, mask), np.asarray(pooled), atol=TOL)
