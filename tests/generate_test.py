"""On-policy generation against independent goldens: HF transformers greedy decoding and sequence classification in
torch, a naive binarization loop, 1 vs 4 fake devices, and an uninterrupted run for resume."""

import json
import os
import re
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

sys.path.insert(0, os.path.dirname(__file__))
import data_common as dc  # noqa: E402
from conftest import REPO_ROOT, run_processes, run_with_devices, tree_bytes  # noqa: E402

from tregjax import cli, data, generate  # noqa: E402
from tregjax.data.sources import DataError  # noqa: E402

PROMPTS = ["What is two plus two?", "Explain why the sky is blue.", "def add(a, b):", "The quick brown fox",
           "Please answer helpfully."]
NEW = 8


def _llama_config(vocab, **kw):
  # A wide init (0.5) separates the random logits, so greedy argmax is not decided by float rounding.
  return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                     initializer_range=0.5, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  tok_dir = dc.byte_level_bpe(str(root / "tok"))
  hf_tok = AutoTokenizer.from_pretrained(tok_dir)
  torch.manual_seed(0)
  policy = LlamaForCausalLM(_llama_config(len(hf_tok))).eval()
  policy.save_pretrained(str(root / "policy"))
  hf_tok.save_pretrained(str(root / "policy"))
  torch.manual_seed(1)
  rm = LlamaForSequenceClassification(_llama_config(len(hf_tok), num_labels=1)).eval()
  rm.save_pretrained(str(root / "rm"))
  hf_tok.save_pretrained(str(root / "rm"))
  records = [dict(prompt=p) for p in PROMPTS[:-1]]
  records.append(dict(prompt=[{"role": "system", "content": "You are a helpful assistant."},
                              {"role": "user", "content": PROMPTS[-1]}]))
  dc.write_jsonl(str(root / "prompts.jsonl"), records)
  return dict(root=root, tok=tok_dir, hf_tok=hf_tok, policy=policy, rm=rm, records=records)


def _config(world, out, **overrides):
  root = world["root"]
  cfg = ml_collections.ConfigDict(dict(data=data.default_data_config(), generate=generate.default_generate_config(),
                                       model=dict(hf_path=str(root / "policy"), dtype="float32"),
                                       mesh=dict(data=-1, fsdp=1, tensor=1)))
  cfg.generate.update(prompt_files=[str(root / "prompts.jsonl")], output_dir=str(out), num_samples=3,
                      max_new_tokens=NEW, temperature=1.0, top_p=1.0, batch_size=8, buckets=(64,), shard_size=2,
                      reward_batch_size=8, progress_bar=False)
  cfg.generate.update(**overrides)
  return cfg


def text_length_scorer(messages, text):
  del messages
  return float(len(text))


def _records(out):
  with open(os.path.join(out, generate.RECORDS), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _golden_prompt_ids(world, messages):
  tok = world["hf_tok"]
  text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return tok(text, add_special_tokens=False)["input_ids"]


def _read(path):
  with open(path, "rb") as f:
    return f.read()


@torch.no_grad()
def _assert_transformers_greedy(world, recs, eos):
  """Every sample equals transformers' greedy decode of the same prompt ids, cut after its first EOS id."""
  for g, rec in zip(recs, world["records"]):
    messages = [{"role": "user", "content": rec["prompt"]}] if isinstance(rec["prompt"], str) else rec["prompt"]
    prompt = _golden_prompt_ids(world, messages)
    assert g["prompt_ids"] == prompt
    out = world["policy"].generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    want = want[:next((i + 1 for i, t in enumerate(want) if t in eos), len(want))]
    for ids in g["all_generated_ids"]:
      assert ids == want
    assert g["all_finished"] == [want[-1] in eos] * len(g["all_generated_ids"])


def test_temperature_to_zero_equals_greedy_equals_transformers_greedy(world, tmp_path):
  greedy = _records(generate.run(_config(world, tmp_path / "greedy", temperature=0.0), scorer=text_length_scorer))
  cold = _records(generate.run(_config(world, tmp_path / "cold", temperature=1e-6), scorer=text_length_scorer))
  tok = world["hf_tok"]
  assert len(greedy) == len(PROMPTS)
  assert [c["all_generated_ids"] for c in cold] == [g["all_generated_ids"] for g in greedy]
  _assert_transformers_greedy(world, greedy, [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")])
  # Per-row EOS: make the third greedy token of prompt 0 the end-of-turn token; that row stops there, others go on.
  stop = greedy[0]["all_generated_ids"][0][2]
  cfg = _config(world, tmp_path / "eos", temperature=0.0)
  cfg.data.end_of_turn_token = tok.convert_ids_to_tokens(stop)
  early = _records(generate.run(cfg, scorer=text_length_scorer))
  _assert_transformers_greedy(world, early, [stop, tok.convert_tokens_to_ids("<|endoftext|>")])
  lengths = [len(r["all_generated_ids"][0]) for r in early]
  assert lengths[0] <= 3 and early[0]["all_finished"][0] and max(lengths) > 3


def test_same_seed_same_samples_on_one_and_four_devices(world, tmp_path):
  one = generate.run(_config(world, tmp_path / "one"), scorer=text_length_scorer)
  cfg = _config(world, tmp_path / "four")
  run_with_devices(f"""
      import json, jax, ml_collections
      from tregjax import generate
      assert jax.device_count() == 4
      cfg = ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))
      generate.run(cfg, scorer=lambda messages, text: float(len(text)))
      """, 4)
  four = str(tmp_path / "four")
  recs = _records(one)
  assert _read(os.path.join(one, generate.RECORDS)) == _read(os.path.join(four, generate.RECORDS))
  assert _read(os.path.join(one, generate.PAIRS)) == _read(os.path.join(four, generate.PAIRS))
  # Sampling really samples: the samples of a prompt are not all the same.
  assert any(len({tuple(ids) for ids in r["all_generated_ids"]}) > 1 for r in recs)


@torch.no_grad()
def test_reward_model_scores_equal_transformers_sequence_classification(world, tmp_path):
  out = generate.run(_config(world, tmp_path / "rm", reward_model=str(world["root"] / "rm")))
  recs = _records(out)
  checked = 0
  for rec in recs:
    prompt = _golden_prompt_ids(world, rec["prompt"])
    assert rec["prompt_ids"] == prompt
    for ids, score in zip(rec["all_generated_ids"], rec["all_rm_scores"]):
      want = world["rm"](torch.tensor([prompt + ids])).logits[0, 0].item()
      np.testing.assert_allclose(score, want, atol=1e-4, rtol=1e-5)
      checked += 1
  assert checked == len(PROMPTS) * 3
  assert len({round(s, 6) for r in recs for s in r["all_rm_scores"]}) > 3  # scores differ between samples


def tie_scorer(messages, text):
  """Ties by construction: every sample of the 'fox' prompt scores 1; otherwise the length parity."""
  if "fox" in messages[-1]["content"]:
    return 1.0
  return float(len(text) % 2)


def test_binarized_pairs_pick_first_max_and_first_min_and_skip_ties(world, tmp_path):
  out = generate.run(_config(world, tmp_path / "bin", num_samples=4), scorer=tie_scorer)
  recs = _records(out)
  want, all_equal, skipped, tied_best = [], 0, 0, 0
  for rec in recs:  # the naive loop
    scores, texts = rec["all_rm_scores"], rec["all_generated_responses"]
    hi = lo = 0
    for i in range(len(scores)):
      if scores[i] > scores[hi]:
        hi = i
      if scores[i] < scores[lo]:
        lo = i
    tied_best += sum(s == scores[hi] for s in scores) > 1
    if scores[hi] == scores[lo]:
      all_equal += 1
    elif texts[hi].strip() and texts[lo].strip() and texts[hi] != texts[lo]:
      want.append((rec["prompt"], texts[hi], texts[lo]))
    else:
      skipped += 1
  with open(os.path.join(out, generate.PAIRS), encoding="utf-8") as f:
    got = [json.loads(line) for line in f]
  assert [(p["prompt"], p["chosen"], p["rejected"]) for p in got] == want
  with open(os.path.join(out, generate.SUMMARY)) as f:
    summary = json.load(f)
  assert all_equal >= 1 and len(want) >= 1
  assert summary["all_equal"] == all_equal and summary["pairs"] == len(want)
  assert sum(summary["skipped"].values()) == skipped and summary["tied_best"] == tied_best
  assert summary["samples"] == 4 * len(PROMPTS)
  # The pairs file is a schema (a) dataset for the data pipeline.
  cfg = ml_collections.ConfigDict(dict(data=data.default_data_config(), model=dict(hf_path=world["tok"])))
  cfg.data.update(train_files=[os.path.join(out, generate.PAIRS)], dataset_dir=str(tmp_path / "ds"), schema="pair")
  from tregjax.data import tfds_builder
  assert len(tfds_builder.data_source(data.build_dataset(cfg), "train")) == len(want)


def test_bad_prompts_file_error_names_file_line_and_field(world, tmp_path):
  bad = tmp_path / "bad.jsonl"
  dc.write_jsonl(str(bad), [dict(prompt="fine"), dict(question="no prompt field"), dict(prompt="x")])
  with pytest.raises(DataError, match=r"bad\.jsonl:line 2: field 'prompt': missing field"):
    generate.run(_config(world, tmp_path / "o1", prompt_files=[str(bad)]), scorer=text_length_scorer)
  dc.write_jsonl(str(bad), [dict(prompt="fine"), dict(prompt=[{"role": "user"}])])
  with pytest.raises(DataError, match=r"bad\.jsonl:line 2: field 'prompt\[0\]'"):
    generate.run(_config(world, tmp_path / "o2", prompt_files=[str(bad)]), scorer=text_length_scorer)
  # The command line: a clear message and the bad-record exit status, no traceback.
  dc.write_jsonl(str(bad), [dict(prompt="fine"), "{not json"])
  cfg_file = tmp_path / "cfg.py"
  cfg = _config(world, tmp_path / "o3", prompt_files=[str(bad)], scorer="tests.generate_test:text_length_scorer")
  cfg_file.write_text(textwrap.dedent(f"""
      import json, ml_collections
      def get_config():
        return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))
      """))
  proc = subprocess.run([sys.executable, "-m", "tregjax.generate", f"--config={cfg_file}"], capture_output=True,
                        text=True, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT), timeout=300)
  assert proc.returncode == cli.EXIT_BAD_RECORD, proc.stderr[-2000:]
  assert f"{bad}:line 2: malformed JSON" in proc.stderr and "Traceback" not in proc.stderr


def test_two_processes_split_the_shards_and_write_the_bytes_of_one(world, tmp_path):
  """`python -m tregjax.generate` as 2 processes of one job (gloo): each samples and scores its own shards (not all of
  them, as a process that believes it is alone would), process 0 assembles, and the output is byte-identical to one
  process's (a shard's samples depend on its index, never on which process ran it)."""
  outputs = {}
  for n in (1, 2):
    cfg = _config(world, tmp_path / f"p{n}", reward_model=str(world["root"] / "rm"))  # 5 prompts: shards of 2, 2, 1
    cfg_file = tmp_path / f"cfg{n}.py"
    cfg_file.write_text(textwrap.dedent(f"""
        import json, ml_collections
        def get_config():
          return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))
        """))
    args = ["-m", "tregjax.generate", f"--config={cfg_file}"]
    if n == 1:
      procs = [subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                              env=dict(os.environ, PYTHONPATH=REPO_ROOT), timeout=600)]
    else:
      procs = run_processes(args, 2)
    for i, proc in enumerate(procs):
      assert proc.returncode == 0, f"{n} process(es), process {i}:\n{proc.stderr[-3000:]}"
    done = sorted(int(m) for proc in procs for m in re.findall(r"generated (\d+) prompts x", proc.stderr))
    assert done == {1: [5], 2: [2, 3]}[n], done  # shard k on process k % 2: shards 0 and 2 (3 prompts), shard 1 (2)
    outputs[n] = tree_bytes(tmp_path / f"p{n}")
  assert sorted(outputs[1]) == sorted(outputs[2])
  assert [k for k in outputs[1] if outputs[1][k] != outputs[2][k]] == []
  assert len(_records(tmp_path / "p2")) == len(PROMPTS)


def test_reward_model_applies_its_activation_sharding_inside_the_mesh(world, tmp_path):
  """The reward model's activation constraints (`parallel.constrain`) reach XLA: the scorer traces inside its mesh."""
  cfg = _config(world, tmp_path / "out", reward_model=str(world["root"] / "rm"))
  run_with_devices(f"""
      import json, jax, ml_collections
      from tregjax import generate, parallel
      from tregjax.data import build as data_build
      from tregjax.data.tokenize import ChatTokenizer
      assert jax.device_count() == 2
      cfg = ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))
      constraints = []
      plain = jax.lax.with_sharding_constraint
      jax.lax.with_sharding_constraint = lambda x, s: constraints.append(s) or plain(x, s)
      tok = ChatTokenizer(data_build.tokenizer_path(cfg), cfg.data.end_of_turn_token)
      mesh = parallel.mesh_from_config(cfg, per_process=True)
      scorer = generate.RewardScorer(cfg, generate.generate_section(cfg), mesh, tok)
      scores = scorer([[5, 6, 7], [8, 9, 10, 11, 12]])
      assert len(scores) == 2 and constraints and all(s.mesh.size == 2 for s in constraints), constraints
      """, 2)


class FlakyScorer:
  """Scores by text length; raises after `fail_after` calls (an interruption mid-run)."""

  def __init__(self, fail_after=None):
    self.calls, self.fail_after = 0, fail_after

  def __call__(self, messages, text):
    self.calls += 1
    if self.fail_after is not None and self.calls > self.fail_after:
      raise KeyboardInterrupt("interrupted")
    return float(len(text) % 3)


def test_resume_after_interruption_yields_identical_output(world, tmp_path):
  whole = generate.run(_config(world, tmp_path / "whole"), scorer=FlakyScorer())
  part = tmp_path / "part"
  with pytest.raises(KeyboardInterrupt):
    generate.run(_config(world, part), scorer=FlakyScorer(fail_after=2 * 3 + 1))  # dies inside the second shard
  assert sorted(os.listdir(part / "work")) == ["shard-00000.json"] and not (part / generate.SUMMARY).exists()
  (part / "work" / "shard-00001.json.tmp.123").write_text("{torn")  # a write killed before its rename
  shard0 = _read(part / "work" / "shard-00000.json")
  resumed = FlakyScorer()
  generate.run(_config(world, part), scorer=resumed)
  assert resumed.calls == (len(PROMPTS) - 2) * 3  # only the unfinished shards were generated
  assert _read(part / "work" / "shard-00000.json") == shard0
  for name in (generate.RECORDS, generate.PAIRS, generate.SUMMARY):
    assert _read(os.path.join(whole, name)) == _read(part / name), name
  assert sorted(os.listdir(part / "work")) == ["shard-00000.json", "shard-00001.json", "shard-00002.json"]


def test_samples_do_not_depend_on_the_batch_size(world, tmp_path):
  """Per-row keys (fold_in(shard key, row index)): batch 8, batch 2 (a prompt's samples split over batches, with
  finished-row compaction) and batch_size=0 (probed) sample the same responses."""
  runs = [_records(generate.run(_config(world, tmp_path / f"b{b}", batch_size=b, top_p=0.9),
                                scorer=text_length_scorer)) for b in (8, 2, 0)]
  ids = [[r["all_generated_ids"] for r in recs] for recs in runs]
  assert ids[0] == ids[1] == ids[2]
  assert len({tuple(x) for r in ids[0] for x in r}) > len(PROMPTS)  # samples of a prompt differ: it samples


def test_top_p_nucleus_is_the_smallest_sorted_prefix_reaching_top_p():
  """The sampler's bisection nucleus against the textbook definition: sort, cumulative mass, first prefix >= top_p."""
  import jax
  import jax.numpy as jnp
  from tregjax.models import decoding
  nucleus = jax.jit(decoding.nucleus_mask)
  rng = np.random.default_rng(0)
  for trial in range(40):
    vocab = (7, 333)[trial % 2]  # two shapes: two compiles
    logits = rng.normal(size=(3, vocab)) * rng.uniform(0.1, 8.0)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    top_p = float(rng.uniform(0.01, 0.999))
    got = np.asarray(nucleus(jnp.asarray(probs), top_p))
    for row in range(3):
      order = np.argsort(-probs[row], kind="stable")
      k = int(np.searchsorted(np.cumsum(probs[row][order].astype(np.float64)), top_p)) + 1
      want = np.zeros(vocab, bool)
      want[order[:k]] = True
      np.testing.assert_array_equal(got[row], want, err_msg=f"trial {trial} row {row} top_p {top_p}")
