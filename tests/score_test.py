"""The scoring pass against independent goldens: HF transformers in torch, a naive per-prefix reward-model loop."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only contend on the shared CI cores
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

sys.path.insert(0, os.path.dirname(__file__))
import data_common as dc  # noqa: E402
from conftest import run_processes, tree_bytes  # noqa: E402

from tregjax import data, errors, score  # noqa: E402
from tregjax.data import scored_cache, tfds_builder  # noqa: E402
from tregjax.data.tokenize import ChatTokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BETTER, WORSE = "Be helpful, correct, coherent and concise.", "Be unhelpful, incorrect, incoherent and verbose."
N_PAIRS = 6


def _llama_config(vocab, **kw):
  return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("score")
  tok_dir = dc.byte_level_bpe(str(root / "tok"))
  hf_tok = AutoTokenizer.from_pretrained(tok_dir)
  models = {}
  for name, seed, cls in (("ref", 0, LlamaForCausalLM), ("dpo", 1, LlamaForCausalLM),
                          ("rm", 2, LlamaForSequenceClassification)):
    torch.manual_seed(seed)
    m = cls(_llama_config(len(hf_tok), **({"num_labels": 1} if name == "rm" else {}))).eval()
    m.save_pretrained(str(root / name))
    hf_tok.save_pretrained(str(root / name))
    models[name] = m
  records = dc.pair_records(N_PAIRS, seed=9)
  dc.write_jsonl(str(root / "a.jsonl"), records)
  return dict(root=root, tok=tok_dir, hf_tok=hf_tok, models=models, records=records)


def _config(world, cache, source="contrastive", **score_overrides):
  root = world["root"]
  cfg = ml_collections.ConfigDict(dict(data=data.default_data_config(), score=score.default_score_config(),
                                       model=dict(hf_path=str(root / "ref"), dtype="float32"),
                                       mesh=dict(data=-1, fsdp=1, tensor=1)))
  cfg.data.update(train_files=[str(root / "a.jsonl")], dataset_dir=str(root / "ds"), cache_dir=str(cache),
                  max_prompt_length=64, max_length=128)
  cfg.score.update(dict(dict(better_instruction=BETTER, worse_instruction=WORSE, instruction_role="system",
                             batch_size=32, shard_size=4, buckets=(32, 64, 128), progress_bar=False),
                        **score_overrides))
  cfg.score.token_reward.source = source
  cfg.score.token_reward.beta = 0.5
  cfg.score.token_reward.dpo_checkpoint = str(root / "dpo")
  cfg.score.token_reward.reward_model = str(root / "rm")
  return cfg


def _golden_ids(world, rec, side, instruction=None):
  """Prompt ids (HF chat template) and response ids (tokenized alone + <|im_end|>), built without tregjax."""
  tok = world["hf_tok"]
  messages = [{"role": "user", "content": rec["prompt"]}]
  if instruction:
    messages = [{"role": "system", "content": instruction}] + messages
  prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
  response = tok(rec[side], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
  return prompt, response


@torch.no_grad()
def _torch_response_logps(model, prompt, response):
  ids = torch.tensor([prompt + response])
  logps = torch.log_softmax(model(ids).logits.float(), -1)[0]
  n = len(prompt)
  return np.array([logps[n - 1 + j, response[j]].item() for j in range(len(response))], np.float32)


def _cache_records(cache):
  src = tfds_builder.data_source(cache, "train")
  return [src[i] for i in range(len(src))]


@pytest.fixture(scope="module")
def contrastive_cache(world):
  return score.run(_config(world, world["root"] / "contrastive_cache"))


def test_contrastive_rewards_and_ref_logps_equal_transformers(world, contrastive_cache):
  got = _cache_records(contrastive_cache)
  assert len(got) == N_PAIRS
  ref = world["models"]["ref"]
  for rec, out in zip(world["records"], got):
    for side in ("chosen", "rejected"):
      prompt, response = _golden_ids(world, rec, side)
      np.testing.assert_array_equal(out[f"{side}_ids"], response)
      np.testing.assert_array_equal(out["prompt_ids"], prompt)
      plain = _torch_response_logps(ref, prompt, response)
      better = _torch_response_logps(ref, _golden_ids(world, rec, side, BETTER)[0], response)
      worse = _torch_response_logps(ref, _golden_ids(world, rec, side, WORSE)[0], response)
      np.testing.assert_allclose(out[f"ref_{side}_token_logps"], plain, atol=1e-4, rtol=0)
      np.testing.assert_allclose(out[f"ref_{side}_logps"], plain.sum(), atol=1e-3, rtol=1e-5)
      want = 1 / (1 + np.exp(-(better.astype(np.float64) - worse))) - 0.5
      np.testing.assert_allclose(out[f"{side}_token_rewards"], want, atol=1e-4, rtol=0)
      assert np.abs(want).max() > 1e-4  # the contexts really differ
    assert out["token_reward_source"] == b"contrastive"


def test_dpo_implicit_rewards_equal_beta_times_logp_difference(world, tmp_path):
  got = _cache_records(score.run(_config(world, tmp_path / "cache", source="dpo_implicit")))
  for rec, out in zip(world["records"], got):
    prompt, response = _golden_ids(world, rec, "chosen")
    ref = _torch_response_logps(world["models"]["ref"], prompt, response)
    dpo = _torch_response_logps(world["models"]["dpo"], prompt, response)
    np.testing.assert_allclose(out["chosen_token_rewards"], 0.5 * (dpo - ref), atol=1e-4, rtol=0)


def test_confidence_rewards_come_from_the_plain_forward_of_transformers(world, tmp_path):
  """source="confidence": r̂_t = σ(log π_ref(y_t) − log mean_s π_ref(y_s)) − 0.5, from transformers' log-probs."""
  got = _cache_records(score.run(_config(world, tmp_path / "cache", source="confidence")))
  for rec, out in zip(world["records"], got):
    for side in ("chosen", "rejected"):
      prompt, response = _golden_ids(world, rec, side)
      plain = _torch_response_logps(world["models"]["ref"], prompt, response).astype(np.float64)
      want = 1 / (1 + np.exp(-(plain - np.log(np.mean(np.exp(plain)))))) - 0.5
      np.testing.assert_allclose(out[f"{side}_token_rewards"], want, atol=1e-4, rtol=0)
      assert (want > 0).any() and (want < 0).any()
    assert out["token_reward_source"] == b"confidence"


def _parity_oracle(prompt_messages, response_ids):
  """A hand-checkable oracle: +0.5 on even token ids, -0.5 on odd ones, 0 on the end-of-turn token (the last)."""
  assert prompt_messages[-1]["role"] == "user"
  out = np.where(np.asarray(response_ids) % 2 == 0, 0.5, -0.5).astype(np.float32)
  out[-1] = 0.0
  return out


def test_oracle_rewards_are_the_callables_and_ref_logps_equal_transformers(world, tmp_path):
  cfg = _config(world, tmp_path / "cache", source="oracle")
  cfg.score.token_reward.oracle_id = "parity-v1"
  got = _cache_records(score.run(cfg, oracle=_parity_oracle))
  for rec, out in zip(world["records"], got):
    for side in ("chosen", "rejected"):
      prompt, response = _golden_ids(world, rec, side)
      want = [0.5 if t % 2 == 0 else -0.5 for t in response[:-1]] + [0.0]
      np.testing.assert_array_equal(out[f"{side}_token_rewards"], np.asarray(want, np.float32))
      plain = _torch_response_logps(world["models"]["ref"], prompt, response)
      np.testing.assert_allclose(out[f"ref_{side}_token_logps"], plain, atol=1e-4, rtol=0)
    assert out["token_reward_source"] == b"oracle"
  # The oracle's identity is part of the cache hash; a CLI config names it as "pkg.module:function".
  other = _config(world, tmp_path / "cache", source="oracle")
  other.score.token_reward.oracle_id = "parity-v2"
  assert scored_cache.cache_hash(other) != scored_cache.cache_hash(cfg)
  cfg.score.token_reward.oracle = "score_test:_parity_oracle"
  assert score.resolve_oracle(score.score_section(cfg), None) is _parity_oracle


def test_oracle_of_the_wrong_length_is_a_clear_error(world, tmp_path):
  cfg = _config(world, tmp_path / "cache", source="oracle")
  with pytest.raises(ValueError,
                     match=r"train record 0: field 'chosen_token_rewards': the oracle returned shape \(2,\)"):
    score.run(cfg, oracle=lambda messages, ids: np.zeros(2, np.float32))
  with pytest.raises(ValueError, match="score.token_reward.oracle='pkg.module:function'"):
    score.run(_config(world, tmp_path / "cache2", source="oracle"))


@torch.no_grad()
def test_r3hf_one_pass_equals_per_prefix_reward_model_loop(world, tmp_path):
  got = _cache_records(score.run(_config(world, tmp_path / "cache", source="r3hf")))
  rm = world["models"]["rm"]

  def reward(ids):  # the sequence reward of one unpadded sequence: score at its last token
    return rm(torch.tensor([ids])).logits[0, 0].item()

  for rec, out in zip(world["records"], got):
    for side in ("chosen", "rejected"):
      prompt, response = _golden_ids(world, rec, side)
      prefix_rewards = [reward(prompt)] + [reward(prompt + response[:t + 1]) for t in range(len(response))]
      want = np.diff(np.asarray(prefix_rewards, np.float64))
      np.testing.assert_allclose(out[f"{side}_token_rewards"], want, atol=1e-4, rtol=0)
      np.testing.assert_allclose(out[f"ref_{side}_token_logps"],
                                 _torch_response_logps(world["models"]["ref"], prompt, response), atol=1e-4)


@pytest.mark.parametrize("kind", ["bpe", "metaspace"])
def test_response_ids_identical_across_plain_better_worse_contexts(tmp_path, kind):
  tok_dir = (dc.byte_level_bpe if kind == "bpe" else dc.metaspace_unigram)(str(tmp_path / kind))
  hf = AutoTokenizer.from_pretrained(tok_dir)
  s = score.default_score_config()
  s.update(better_instruction=BETTER, worse_instruction=WORSE)
  contexts = score.Contexts(ChatTokenizer(tok_dir), s)
  assert contexts.role == "system"  # both templates render a system turn
  eot = hf.convert_tokens_to_ids("<|im_end|>" if kind == "bpe" else "</s>")
  for rec in dc.pair_records(5, seed=4):
    messages = [{"role": "user", "content": rec["prompt"]}]
    prompt = hf(hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
    record = dict(prompt_ids=prompt, prompt_messages=json.dumps(messages),
                  chosen_ids=hf(rec["chosen"], add_special_tokens=False)["input_ids"] + [eot],
                  rejected_ids=hf(rec["rejected"], add_special_tokens=False)["input_ids"] + [eot])
    for side, unit in zip(("chosen", "rejected"), score.units_of(record, contexts)):
      assert len(unit.rows) == 3
      for row, start, instruction in zip(unit.rows, unit.prompt_lens, (None, BETTER, WORSE)):
        assert row[start:] == list(record[f"{side}_ids"])  # same ids in every context
        msgs = ([{"role": "system", "content": instruction}] if instruction else []) + messages
        want_prompt = hf(hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
        assert row[:start] == want_prompt


def test_killed_scoring_resumes_to_byte_identical_output(world, tmp_path):
  n_pairs = 8
  root = world["root"]
  dc.write_jsonl(str(tmp_path / "big.jsonl"), dc.pair_records(n_pairs, seed=21))

  def config(cache):
    cfg = _config(world, cache, shard_size=1, batch_size=8, buckets=(32, 64, 128))
    cfg.data.train_files = [str(tmp_path / "big.jsonl")]
    cfg.data.dataset_dir = str(tmp_path / "ds")
    return cfg

  config_file = tmp_path / "cfg.py"
  config_file.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import score_test, pathlib
      def get_config():
        w = dict(root=pathlib.Path({str(root)!r}))
        cfg = score_test._config(w, {str(tmp_path / 'killed')!r}, shard_size=1, batch_size=8, buckets=(32, 64, 128))
        cfg.data.train_files = [{str(tmp_path / 'big.jsonl')!r}]
        cfg.data.dataset_dir = {str(tmp_path / 'ds')!r}
        return cfg
      """))
  cmd = [sys.executable, "-m", "tregjax.score", f"--config={config_file}"]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  work = tmp_path / "killed" / "work"
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 600  # a wait for the first shard, not a timing check: CI cores may be shared
  while not (work.exists() and any(n.endswith(".safetensors") for n in os.listdir(work))):
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.time() < deadline
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = [n for n in os.listdir(work) if n.endswith(".safetensors")]
  assert 1 <= len(done) < n_pairs  # really interrupted
  assert not (tmp_path / "killed" / scored_cache.CACHE_META).exists()
  rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  straight = score.run(config(tmp_path / "straight"))
  a, b = tree_bytes(tmp_path / "killed"), tree_bytes(straight)
  assert sorted(a) == sorted(b)
  assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
  assert len(_cache_records(straight)) == n_pairs


def test_stale_or_unfinished_cache_is_refused(world, tmp_path):
  cfg = _config(world, tmp_path / "cache", source="none")
  with pytest.raises(errors.StaleCacheError, match="not a finished scored cache"):
    scored_cache.check_cache(str(tmp_path / "cache"), scored_cache.cache_hash(cfg))
  cache = score.run(cfg)
  assert scored_cache.check_cache(cache, scored_cache.cache_hash(cfg))["records"] == {"train": N_PAIRS}
  training = _config(world, tmp_path / "cache", source="none")
  training.model.dtype = "bfloat16"  # training-only settings do not make the cache stale
  assert scored_cache.check_cache(cache, scored_cache.cache_components(training))["dtype"] == "float32"
  other = _config(world, tmp_path / "cache", source="contrastive")
  with pytest.raises(errors.StaleCacheError, match="changed inputs: prompts, source"):
    scored_cache.check_cache(cache, scored_cache.cache_components(other))
  with pytest.raises(errors.StaleCacheError, match="already holds a scored cache of other inputs"):
    score.run(other)
  other_model = _config(world, tmp_path / "cache", source="none")
  other_model.model.hf_path = str(world["root"] / "dpo")
  with pytest.raises(errors.StaleCacheError, match="changed inputs: model"):
    scored_cache.check_cache(cache, scored_cache.cache_components(other_model))
  # `python -m tregjax.score` (run_command) moves the cache of other inputs aside and scores these; nothing is lost.
  before = scored_cache.check_cache(cache, scored_cache.cache_hash(cfg))
  assert score.run_command(other) == cache
  assert scored_cache.check_cache(cache, scored_cache.cache_components(other))["token_reward_source"] == "contrastive"
  aside = f"{cache}.h{before['hash'][:16]}"
  assert scored_cache.check_cache(aside, scored_cache.cache_hash(cfg)) == before


def test_data_parallel_scoring_on_two_devices_matches_one(world, contrastive_cache, tmp_path, devices_runner):
  one = _cache_records(contrastive_cache)
  devices_runner(f"""
      import sys, pathlib
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import jax, score_test
      from tregjax import score
      assert jax.device_count() == 2
      constraints = []  # the model's activation constraints reach XLA only inside the Scorer's mesh
      plain = jax.lax.with_sharding_constraint
      jax.lax.with_sharding_constraint = lambda x, s: constraints.append(s) or plain(x, s)
      cfg = score_test._config(dict(root=pathlib.Path({str(world['root'])!r})), {str(tmp_path / 'two')!r})
      score.run(cfg)
      assert constraints and all(s.mesh.size == 2 for s in constraints), constraints
      """, num_devices=2)
  two = _cache_records(str(tmp_path / "two"))
  for a, b in zip(one, two):
    for key in ("ref_chosen_token_logps", "chosen_token_rewards", "ref_rejected_token_logps", "rejected_token_rewards"):
      np.testing.assert_allclose(a[key], b[key], atol=1e-5, rtol=0)
    np.testing.assert_allclose(a["ref_chosen_logps"], b["ref_chosen_logps"], atol=1e-4, rtol=1e-6)


def test_two_processes_split_the_shards_and_write_the_bytes_of_one(world, tmp_path):
  """`python -m tregjax.score` as 2 processes of one job (gloo): each scores its own shards (not all of them, as a
  process that believes it is alone would), process 0 assembles, and the cache is byte-identical to one process's."""
  config_file = tmp_path / "cfg.py"
  config_file.write_text(textwrap.dedent(f"""
      import sys, pathlib
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import score_test
      def get_config():
        return score_test._config(dict(root=pathlib.Path({str(world['root'])!r})), {str(tmp_path / 'two')!r},
                                  shard_size=1)
      """))
  procs = run_processes(["-m", "tregjax.score", f"--config={config_file}"], 2)
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, f"process {i}:\n{proc.stderr[-3000:]}"
  scored = [int(m) for proc in procs for m in re.findall(r"scored (\d+) pairs", proc.stderr)]
  assert sorted(scored) == [N_PAIRS // 2, N_PAIRS // 2], scored  # shard n on process n % 2: 3 pairs each
  one = score.run(_config(world, tmp_path / "one", shard_size=1))
  a, b = tree_bytes(tmp_path / "two"), tree_bytes(one)
  assert sorted(a) == sorted(b)
  assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
  assert len(_cache_records(one)) == N_PAIRS


def test_damaged_work_shard_is_recomputed(world, tmp_path):
  cfg = _config(world, tmp_path / "cache", source="none")
  want = tree_bytes(score.run(cfg))
  shard = tmp_path / "cache" / "work" / "train-00001.safetensors"
  (tmp_path / "cache" / scored_cache.CACHE_META).unlink()
  shard.write_bytes(shard.read_bytes()[:50])  # e.g. a disk that lost the tail of a file
  score.run(cfg)
  assert tree_bytes(tmp_path / "cache") == want


def test_score_chunks_pad_to_fitted_buckets():
  """Hand-worked, one row per chunk (batch_size 1): rows of 100, 150, 170 and 201 tokens under buckets (64, 128, 256):
  100 -> 112 (bucket 128 fitted to its longest row, 100, rounded up to 128/8 = 16), the 256 bucket's rows -> 224 (its
  longest, 201, rounded up to 32); unfitted, 128 and 256."""
  import types  # pylint: disable=g-import-not-at-top
  lengths = [150, 100, 201, 170]
  for fit, want in ((True, {0: 224, 1: 112, 2: 224, 3: 224}), (False, {0: 256, 1: 128, 2: 256, 3: 256})):
    fake = types.SimpleNamespace(ways=1, batch_tokens=10**6,
                                 s=ml_collections.ConfigDict(dict(batch_size=1, buckets=(64, 128, 256),
                                                                  fit_buckets=fit)))
    chunks = score.Scorer.chunk_rows(fake, lengths)
    got = {i: t for rows, t, _ in chunks for i in rows}
    assert got == want, (fit, chunks)
    assert all(max(lengths[i] for i in rows) <= t for rows, t, _ in chunks)
