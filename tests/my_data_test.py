"""configs/my_data.py, the user's path, end to end on a tiny JSONL and a tiny HF model: ONE train command tokenizes,
scores and trains; export gives a directory transformers loads, holding trained weights. And the start-up checks:
a config naming something the run would miss later (a file, a split, a mesh, a tokenizer) stops in one line before
anything is built."""

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

from tregjax import cli, errors  # noqa: E402
from tregjax.training import config as config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, "configs", "my_data.py")
# What a laptop run changes on the template (the template's sizes are a real model's): CPU numerics, short rows.
TINY = {"model.dtype": "float32", "model.remat": "none", "data.batch_size": "4", "data.buckets": "(64,128)",
        "data.max_prompt_length": "64", "data.max_length": "128", "optimizer.grad_accum_steps": "1",
        "optimizer.lr": "0.01", "train.steps": "3", "train.log_every": "1", "train.eval_every": "0", "checkpoint.every": "3",
        "data.validation_fraction": "0.2", "score.batch_size": "4", "logging.progress_bar": "False"}


def _hf_llama(path, tok, vocab_size):
  torch.manual_seed(0)
  model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=256, pad_token_id=0)).eval()
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("my_data")
  tok = AutoTokenizer.from_pretrained(dc.byte_level_bpe(str(root / "tok")))
  _hf_llama(str(root / "model"), tok, len(tok))
  _hf_llama(str(root / "small_vocab_model"), tok, len(tok) - 8)  # a tokenizer that is not this model's
  dc.write_jsonl(str(root / "pairs.jsonl"), dc.pair_records(20, seed=5))
  return root


def _train(world, workdir, arg_extra="", **flags):
  arg = f"model={world / 'model'},train={world / 'pairs.jsonl'},out={world / 'data'}{arg_extra}"
  args = [f"--config={TEMPLATE}:{arg}", *[f"--config.{k}={v}" for k, v in {**TINY, **flags}.items()],
          f"--workdir={workdir}"]
  return _cli("tregjax.train", *args)


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], env=tc.worker_env(), cwd=ROOT, capture_output=True,
                        text=True, timeout=600)


def test_one_command_scores_and_trains_then_export_gives_a_transformers_model(world, tmp_path):
  workdir = tmp_path / "run"
  proc = _train(world, workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(world / "data" / "scored" / "cache_meta.json", encoding="utf-8") as f:
    meta = json.load(f)  # the scoring pass ran as a stage of the train command
  assert meta["token_reward_source"] == "contrastive" and set(meta["records"]) == {"train", "validation"}
  assert meta["records"]["train"] + meta["records"]["validation"] == 20
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl", encoding="utf-8")]
  train = [r for r in records if "loss/total" in r]
  assert [r["step"] for r in train] == [1, 2, 3] and all(r["loss/regularizer"] != 0 for r in train)  # T-REG on
  assert any("eval/loss/total" in r for r in records)  # the template's held-out split is evaluated

  out = tmp_path / "hf"
  proc = _cli("tregjax.export", f"--workdir={workdir}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
  ref = AutoModelForCausalLM.from_pretrained(str(world / "model"), dtype=torch.float32)
  assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == AutoTokenizer.from_pretrained(
      str(world / "model")).get_vocab()
  moved = max(float((a - b).detach().abs().max()) for a, b in zip(hf.parameters(), ref.parameters()))
  assert moved > 1e-4  # trained weights, not the reference's
  with torch.no_grad():
    logits = hf(torch.tensor(np.arange(1, 17)[None])).logits
  assert torch.isfinite(logits).all()


@pytest.mark.parametrize("flags, arg_extra, status, message", [
    ({"data.eval_split": "test"}, "", cli.EXIT_CONFIG,
     "config.data.eval_split='test': the dataset builder writes only the splits ('train', 'validation')"),
    ({"data.validation_fraction": "0.0"}, "", cli.EXIT_CONFIG,
     "config.data.eval_split='validation': data.train_files gives only the splits ('train',)"),
    ({}, ",train=/nonexistent/pairs.jsonl", cli.EXIT_CONFIG,
     "config.data.train_files[0]='/nonexistent/pairs.jsonl': no such file or directory"),
    ({"mesh.data": "2", "mesh.fsdp": "1"}, "", cli.EXIT_CONFIG, "config.mesh: "),
], ids=["eval_split_never_written", "no_validation_split", "missing_file", "mesh_vs_devices"])
def test_a_config_the_run_cannot_finish_stops_at_start_up_in_one_line(world, tmp_path, flags, arg_extra, status,
                                                                     message):
  proc = _train(world, tmp_path / "run", arg_extra, **flags)
  assert proc.returncode == status, proc.stderr[-3000:]
  line = [l for l in proc.stderr.splitlines() if l.startswith("tregjax.train: error:")]
  assert len(line) == 1 and message in line[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()  # nothing built, nothing written


def test_a_tokenizer_larger_than_the_model_vocabulary_stops_before_tokenizing(world, tmp_path):
  proc = _cli("tregjax.train", f"--config={TEMPLATE}:model={world / 'small_vocab_model'},"
              f"train={world / 'pairs.jsonl'},out={tmp_path / 'data'}",
              *[f"--config.{k}={v}" for k, v in TINY.items()], f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == cli.EXIT_BAD_INPUT, proc.stderr[-3000:]
  assert "tokenizer has" in proc.stderr and "but the model's embedding has only" in proc.stderr
  assert not (tmp_path / "data").exists()


def test_recipes_name_splits_the_builder_writes():
  for name in ("llama3_8b_dpo_reg.py", "gemma2_9b_simpo_reg.py", "llama3_8b_dpo_reg_lora.py", "my_data.py"):
    spec = __import__("importlib.util").util.spec_from_file_location(name[:-3], os.path.join(ROOT, "configs", name))
    module = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert c.data.eval_split == "validation" and c.data.validation_files or c.data.validation_fraction > 0, name
    c.data.eval_split = "test"  # what both 8B recipes named: refused at validation, not at step 400
    with pytest.raises(errors.ConfigError, match="config.data.eval_split='test'"):
      config_lib.validate(c, num_devices=8, check_data=False)
