"""configs/my_data.py's start-up checks: a config naming something the run would miss later (a file, a split, a mesh,
a tokenizer that is not the model's) stops in one line before anything is built; edited data rescored by the same one
command, the old scored cache kept. The template's end-to-end run (one train command tokenizes, scores and trains;
export gives a model) is the README quickstart's test (tests/readme_test.py), which runs the README's own commands."""

import json
import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import data_common as dc  # noqa: E402
import train_common as tc  # noqa: E402
from conftest import tree_bytes  # noqa: E402

from tregjax import cli, errors  # noqa: E402
from tregjax.training import config as config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, "configs", "my_data.py")
# What a laptop run changes on the template (the template's sizes are a real model's): CPU numerics, short rows.
TINY = {"model.dtype": "float32", "model.remat": "none", "data.batch_size": "4", "data.buckets": "(64,128)",
        "data.max_prompt_length": "64", "data.max_length": "128", "optimizer.grad_accum_steps": "1",
        "optimizer.lr": "0.01", "train.steps": "3", "train.log_every": "1", "train.eval_every": "0",
        "checkpoint.every": "3", "data.validation_fraction": "0.2", "score.batch_size": "4",
        "logging.progress_bar": "False"}


def hf_llama(path, tok, vocab_size):
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
  hf_llama(str(root / "model"), tok, len(tok))
  hf_llama(str(root / "small_vocab_model"), tok, len(tok) - 8)  # a tokenizer that is not this model's
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


def test_edited_data_is_rescored_by_the_one_command_and_the_old_cache_is_kept(world, tmp_path):
  pairs, out = tmp_path / "pairs.jsonl", tmp_path / "data"
  original = dc.pair_records(20, seed=5)
  dc.write_jsonl(str(pairs), original)
  run = lambda workdir: _cli("tregjax.train", f"--config={TEMPLATE}:model={world / 'model'},train={pairs},out={out}",
                             *[f"--config.{k}={v}" for k, v in TINY.items()], f"--workdir={workdir}")
  cache = out / "scored"

  first = run(tmp_path / "run1")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "scored 20 pairs" in first.stderr  # every pair of the file (train and held-out validation) scored
  old = tree_bytes(cache)
  old_meta = json.loads(old["cache_meta.json"])

  edited = [dict(r) for r in original]
  edited[7]["chosen"] = "an edited answer"  # one record of the user's file changes
  dc.write_jsonl(str(pairs), edited)
  second = run(tmp_path / "run2")
  assert second.returncode == 0, second.stderr[-3000:]
  aside = out / f"scored.h{old_meta['hash'][:16]}"
  line = [l for l in second.stderr.splitlines() if "held a scored cache of other inputs" in l]
  assert len(line) == 1 and "(changed: data (" in line[0] and str(aside) in line[0], second.stderr[-3000:]
  assert "scored 20 pairs" in second.stderr
  assert tree_bytes(aside) == old  # the earlier cache, every file byte for byte, beside the new one
  new_meta = json.loads((cache / "cache_meta.json").read_text())
  # Only the data was edited: every other input of the cache is what it was.
  assert {k for k in new_meta["components"] if new_meta["components"][k] != old_meta["components"][k]} == {"data"}
  assert json.loads((tmp_path / "run2" / "summary.json").read_text())["step"] == 3  # and it trained

  current = tree_bytes(cache)
  third = run(tmp_path / "run2")  # nothing changed: no scoring (the run itself resumes at its last step)
  assert third.returncode == 0, third.stderr[-3000:]
  assert "scored 20 pairs" not in third.stderr and "other inputs" not in third.stderr
  assert "complete and current" in third.stderr and tree_bytes(cache) == current

  dc.write_jsonl(str(pairs), original)  # back to the original file: its cache comes back, nothing is rescored
  fourth = run(tmp_path / "run1")
  assert fourth.returncode == 0, fourth.stderr[-3000:]
  assert "scored 20 pairs" not in fourth.stderr and f"moved {aside} back to {cache}" in fourth.stderr
  assert tree_bytes(cache) == old
  assert json.loads((out / f"scored.h{new_meta['hash'][:16]}" / "cache_meta.json").read_text()) == new_meta
