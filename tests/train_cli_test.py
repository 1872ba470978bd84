"""End to end through the real pipeline and CLIs: JSONL pairs → `tregjax.score` → `tregjax.train` (DPO-REG on the
scored cache, eval split, TensorBoard + JSONL metrics) → `tregjax.export` → transformers logits equal tregjax's;
a stale cache is refused before anything compiles."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import data_common as dc  # noqa: E402
import train_common as tc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  tok_dir = dc.byte_level_bpe(str(root / "tok"))
  tok = AutoTokenizer.from_pretrained(tok_dir)
  torch.manual_seed(0)
  ref = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     pad_token_id=0)).eval()
  ref.save_pretrained(str(root / "ref"))
  tok.save_pretrained(str(root / "ref"))
  dc.write_jsonl(str(root / "pairs.jsonl"), dc.pair_records(20, seed=3))
  return root


def _flags(world, **extra):
  flags = {
      "model.hf_path": str(world / "ref"), "data.train_files": f"('{world / 'pairs.jsonl'}',)",
      "data.validation_fraction": "0.2", "data.dataset_dir": str(world / "ds"), "data.cache_dir": str(world / "cache"),
      "data.batch_size": "4", "data.buckets": "(64,128)", "data.eval_split": "validation",
      "score.batch_size": "4", "score.buckets": "(64,128)", "score.progress_bar": "False",
      "train.steps": "3", "train.log_every": "1", "checkpoint.every": "2", "logging.progress_bar": "False",
      "optimizer.lr": "0.01", "optimizer.warmup_ratio": "0.0",
  }
  flags.update(extra)
  return [f"--config.{k}={v}" for k, v in flags.items()]


def _cli(module, *args, expect_ok=True):
  env = tc.worker_env()
  proc = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  if expect_ok:
    assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def test_score_train_export_round_trip_matches_transformers(world, tmp_path):
  config = os.path.join(ROOT, "configs", "tiny_dpo.py")
  _cli("tregjax.score", f"--config={config}", *_flags(world))
  workdir = str(tmp_path / "run")
  _cli("tregjax.train", f"--config={config}", *_flags(world), f"--workdir={workdir}")

  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in records if "loss/total" in r]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert all(np.isfinite(r["loss/total"]) and r["loss/regularizer"] != 0 for r in train)  # T-REG is on
  evals = [r for r in records if "eval/loss/total" in r]
  assert len(evals) == 1 and 0 <= evals[0]["eval/rewards/accuracy"] <= 1
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]

  out = str(tmp_path / "hf")
  _cli("tregjax.export", f"--workdir={workdir}", f"--out={out}")
  hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(str(world / "ref")).get_vocab()
  from tregjax import training  # the checkpoint restored by tregjax, run by tregjax
  import jax.numpy as jnp
  model, step = training.load_model(workdir)
  assert step == 3
  tokens = np.random.default_rng(0).integers(1, hf.config.vocab_size, (2, 24))
  with torch.no_grad():
    want = hf(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  ref = AutoModelForCausalLM.from_pretrained(str(world / "ref"), dtype=torch.float32)
  moved = (hf.model.layers[0].mlp.down_proj.weight - ref.model.layers[0].mlp.down_proj.weight).detach().abs().max()
  assert float(moved) > 1e-4  # the export holds the trained weights, not the reference

  # A cache train is pointed at (no data.train_files: it does not make the cache) from other inputs is never used:
  # one line naming the cache and what changed, the stale-output exit status, no traceback. (With data.train_files
  # the command makes its own cache: tests/my_data_test.py, edited data rescored and the old cache kept.)
  stale = _cli("tregjax.train", f"--config={config}",
               *_flags(world, **{"score.better_instruction": "Be terse.", "data.train_files": "()"}),
               f"--workdir={tmp_path / 'stale'}", expect_ok=False)
  from tregjax import cli
  assert stale.returncode == cli.EXIT_STALE, stale.stderr[-3000:]
  assert "tregjax.train: error: scored cache" in stale.stderr and "changed inputs: prompts" in stale.stderr
  assert "Traceback" not in stale.stderr


def test_library_modules_import_together_without_flag_clashes():
  """`tregjax.export.export` is a library function: importing it next to `tregjax.train` (both CLIs take
  --workdir) must not raise absl's DuplicateFlagError, as it did when export defined its flags at import."""
  proc = subprocess.run([sys.executable, "-c", "import tregjax.train, tregjax.score, tregjax.generate, tregjax.export"],
                        env=tc.worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
