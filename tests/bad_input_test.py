"""Bad input never crashes and never passes silently (issue 18): each case is a hand-made bad input and the clear
error, report or refusal it must produce (docs/bad_input.md is the user's table of them)."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import torch

torch.set_num_threads(1)
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import data_common as dc  # noqa: E402
import train_common as tc  # noqa: E402
from conftest import REPO_ROOT  # noqa: E402

from tregjax import cli, data, errors, export, score  # noqa: E402
from tregjax.data.sources import DataError  # noqa: E402
from tregjax.data.tokenize import ChatTokenizer  # noqa: E402
from tregjax.training import metrics as metrics_lib  # noqa: E402

BETTER = "Be helpful."


def _save_llama(path, vocab, seed=0, max_positions=512, nan_head=False):
  torch.manual_seed(seed)
  model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                       max_position_embeddings=max_positions)).eval()
  if nan_head:  # one NaN in the unembedding: every log-softmax is NaN (what an out-of-range id also produces)
    with torch.no_grad():
      model.lm_head.weight[5, 3] = float("nan")
  model.save_pretrained(str(path))
  return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_input")
  tok_dir = dc.byte_level_bpe(str(root / "tok"))
  vocab = len(AutoTokenizer.from_pretrained(tok_dir))
  return dict(root=root, tok=tok_dir, vocab=vocab, ref=_save_llama(root / "ref", vocab),
              small=_save_llama(root / "small", vocab - 50), nan=_save_llama(root / "nan", vocab, nan_head=True))


def _data_config(tmp_path, tok, files, **overrides):
  cfg = ml_collections.ConfigDict(dict(data=data.default_data_config()))
  cfg.data.update(train_files=[str(f) for f in files], tokenizer=tok, dataset_dir=str(tmp_path / "ds"),
                  max_prompt_length=64, max_length=128)
  cfg.data.update(overrides)
  return cfg


def _score_config(world, tmp_path, files, model="ref", **data_overrides):
  cfg = ml_collections.ConfigDict(dict(data=data.default_data_config(), score=score.default_score_config(),
                                       model=dict(hf_path=world[model], dtype="float32"),
                                       mesh=dict(data=-1, fsdp=1, tensor=1)))
  cfg.data.update(dict(dict(train_files=[str(f) for f in files], tokenizer=world["tok"], dataset_dir=str(
      tmp_path / "ds"), cache_dir=str(tmp_path / "cache"), max_prompt_length=64, max_length=128), **data_overrides))
  cfg.score.update(better_instruction=BETTER, worse_instruction="Be unhelpful.", instruction_role="system",
                   batch_size=16, shard_size=4, buckets=(64, 128), progress_bar=False)
  return cfg


def _config_file(tmp_path, cfg):
  path = tmp_path / "cfg.py"
  path.write_text(textwrap.dedent(f"""
      import json, ml_collections
      def get_config():
        return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))
      """))
  return str(path)


def _command(module, *args):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                        timeout=600)


# ------------------------------------------------------------------------------- one-line errors, exit statuses


def test_expected_errors_are_one_line_with_distinct_exit_statuses(capsys):
  from tregjax.training import checkpoint, hooks
  cases = [(errors.ConfigError("config.optimizer.lr=-1: must be > 0"), cli.EXIT_CONFIG),
           (DataError("a.jsonl:line 3", "chosen", "is null", "null_field"), cli.EXIT_BAD_RECORD),
           (errors.StaleCacheError("cache of other inputs"), cli.EXIT_STALE),
           (checkpoint.CheckpointMismatchError("another model"), cli.EXIT_STALE),
           (hooks.NonFiniteError("loss is nan\nfor 5 steps"), cli.EXIT_NON_FINITE),
           (score.NonFiniteScoreError("nan"), cli.EXIT_NON_FINITE),
           (FileNotFoundError("no such file"), cli.EXIT_BAD_INPUT), (ValueError("bad value"), cli.EXIT_BAD_INPUT)]
  statuses = set()
  for error, status in cases:
    def body(error=error):
      raise error
    with pytest.raises(SystemExit) as stop:
      cli.report_errors("tregjax.x", body, verbose=False)
    assert stop.value.code == status, error
    statuses.add(status)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tregjax.x: error: ") and "Traceback" not in err, err
  assert len(statuses) == 5 and 1 not in statuses and cli.EXIT_MISSING_PACKAGE not in statuses
  with pytest.raises(SystemExit):
    cli.report_errors("tregjax.x", lambda: (_ for _ in ()).throw(ValueError("v")), verbose=True)
  assert "Traceback" in capsys.readouterr().err  # --verbose
  with pytest.raises(KeyError):  # a bug is not an expected error: it keeps its traceback
    cli.report_errors("tregjax.x", lambda: {}["k"], verbose=False)


def test_train_cli_config_error_is_one_line_and_traceback_only_with_verbose(tmp_path):
  args = ["--config", os.path.join(REPO_ROOT, "configs", "tiny_dpo.py"), f"--workdir={tmp_path / 'run'}"]
  proc = _command("tregjax.train", *args)
  assert proc.returncode == cli.EXIT_CONFIG, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
  assert errors == ["tregjax.train: error: objective=preference needs config.data.cache_dir (a scored cache from "
                    "tregjax.score)"], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  verbose = _command("tregjax.train", *args, "--verbose")
  assert verbose.returncode == cli.EXIT_CONFIG and "Traceback" in verbose.stderr


def test_a_workdir_uri_whose_scheme_has_no_backend_is_one_line_naming_scheme_and_package(tmp_path):
  """Before anything is built: the scheme and the package to install (s3fs is not a dependency)."""
  proc = _command("tregjax.train", "--config", os.path.join(REPO_ROOT, "configs", "demo.py"), "--workdir=s3://b/run")
  assert proc.returncode == cli.EXIT_MISSING_PACKAGE, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
  assert errors == ["tregjax.train: error: --workdir s3://b/run: the s3:// scheme needs the s3fs package, which is "
                    "not installed: pip install s3fs"], proc.stderr[-3000:]
  assert not os.path.exists(os.path.join(REPO_ROOT, "s3:"))


# ------------------------------------------------------------------------- skipped, empty and all-bad records


def _pairs(n, bad_lines):
  """n records, those at 1-based `bad_lines` replaced by hand-made bad ones (null, missing, malformed)."""
  records = dc.pair_records(n, seed=5)
  bad = [dict(prompt="p", chosen=None, rejected="x"), dict(prompt="p", chosen="a"), '{"prompt": "p", "chosen"']
  for k, line in enumerate(bad_lines):
    records[line - 1] = bad[k % len(bad)]
  return records


def test_skipped_records_are_reported_on_the_console_with_kinds_and_lines(tmp_path, world):
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), _pairs(20, [3]))
  cfg = _data_config(tmp_path, world["tok"], [f], on_bad_record="skip")
  code = f"""
      import json, ml_collections
      from tregjax import cli, data
      cli.setup_logging()
      data.build_dataset(ml_collections.ConfigDict(json.loads({cfg.to_json()!r})))
      """
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = [line for line in proc.stderr.splitlines() if "skipped" in line]
  assert len(report) == 1, proc.stderr[-3000:]
  assert "20 records read, 19 used" in report[0] and "1 bad (null_field=1)" in report[0]
  assert f"{f}:line 3: field 'chosen': is null" in report[0]


def test_null_is_reported_as_null_not_missing(tmp_path, world):
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), [dict(prompt="p", chosen=None, rejected="x"),
                                                 dict(prompt=[{"role": "user", "content": None}], chosen="a",
                                                      rejected="b")])
  tok = ChatTokenizer(world["tok"])
  with pytest.raises(DataError, match=r"a\.jsonl:line 1: field 'chosen': is null$") as err:
    list(data.iter_tokenized(_data_config(tmp_path, world["tok"], [f]), "train", tok))
  assert err.value.kind == "null_field"
  f2 = dc.write_jsonl(str(tmp_path / "b.jsonl"), [dict(prompt=[{"role": "user", "content": None}], chosen="a",
                                                       rejected="b")])
  with pytest.raises(DataError, match=r"b\.jsonl:line 1: field 'prompt\[0\]\.content': is null"):
    list(data.iter_tokenized(_data_config(tmp_path, world["tok"], [f2]), "train", tok))


def test_bad_record_threshold_stops_a_mostly_bad_file(tmp_path, world):
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), _pairs(10, [2, 4, 6, 8]))  # 40% garbage
  cfg = _data_config(tmp_path, world["tok"], [f], on_bad_record="skip")
  with pytest.raises(DataError, match=r"4 of 10 records are bad \(40%\), more than data\.max_bad_fraction=0\.1")\
      as err:
    data.build_dataset(cfg)
  assert err.value.kind == "too_many_bad_records" and str(f) in str(err.value)
  assert f"{f}:line 2: field 'chosen': is null" in str(err.value)
  cfg.data.max_bad_fraction = 0.5  # the key lets a user accept it knowingly
  out = data.build_dataset(cfg)
  assert data.tfds_builder.read_metadata(out)["counts"]["train"]["examples"] == 6


def test_empty_and_all_bad_inputs_name_the_files_instead_of_a_tfds_assertion(tmp_path, world):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(DataError, match=rf"{empty}: split 'train': no usable records \(0 read; the files hold no "
                     r"records"):
    data.build_dataset(_data_config(tmp_path, world["tok"], [empty]))
  bad = dc.write_jsonl(str(tmp_path / "bad.jsonl"), _pairs(3, [1, 2, 3]))
  with pytest.raises(DataError, match=rf"{bad}: split 'train': no usable records \(3 read; 3 bad "
                     r"\(malformed_json=1, missing_field=1, null_field=1\)"):
    data.build_dataset(_data_config(tmp_path, world["tok"], [bad], on_bad_record="skip"))
  # Through the command: one line and the bad-record exit status.
  proc = _command("tregjax.score", "--config", _config_file(tmp_path, _score_config(world, tmp_path, [empty])))
  assert proc.returncode == cli.EXIT_BAD_RECORD, proc.stderr[-3000:]
  assert f"tregjax.score: error: {empty}: split 'train': no usable records" in proc.stderr
  assert "Traceback" not in proc.stderr and "AssertionError" not in proc.stderr


# ------------------------------------------------------------------------------ tokenizer/model vocabularies


def test_tokenizer_larger_than_the_model_is_refused_by_score_and_train(tmp_path, world):
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), dc.pair_records(4))
  cfg = _score_config(world, tmp_path, [f], model="small")
  with pytest.raises(ValueError, match=rf"tregjax.score: tokenizer {world['tok']} with the model {world['small']}: "
                     rf"tokenizer has {world['vocab']} tokens but the model's embedding has only vocab_size="
                     rf"{world['vocab'] - 50}"):
    score.run(cfg)
  assert not os.path.exists(tmp_path / "cache" / "cache_meta.json")
  assert not [n for n in os.listdir(tmp_path / "cache" / "work") if n.endswith(".safetensors")]
  from tregjax import training
  train_cfg = tc.tiny_config(**{"objective": "sft", "model.preset": "", "model.overrides": ml_collections.ConfigDict(),
                                "model.hf_path": world["small"], "data.tokenizer": world["tok"],
                                "data.dataset_dir": str(tmp_path / "ds")})
  with pytest.raises(ValueError, match=rf"tregjax.train: tokenizer {world['tok']} with {world['small']}: tokenizer "
                     rf"has {world['vocab']} tokens"):
    training.run(train_cfg, str(tmp_path / "run"))


def test_scoring_refuses_to_write_a_shard_with_non_finite_values(tmp_path, world):
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), dc.pair_records(3))
  with pytest.raises(score.NonFiniteScoreError, match=rf"train record 0 \({f}:line 1\): field "
                     r"'ref_chosen_token_logps' has \d+ non-finite value"):
    score.run(_score_config(world, tmp_path, [f], model="nan"))
  assert not [n for n in os.listdir(tmp_path / "cache" / "work") if n.endswith(".safetensors")]


# ------------------------------------------------------------------------------------- over-long contexts


def test_contrastive_contexts_are_truncated_like_the_plain_prompt(tmp_path, world):
  long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), [dict(prompt=long_prompt, chosen="four", rejected="five")])
  cfg = _score_config(world, tmp_path, [f])
  out = data.build_dataset(cfg)
  record = data.tfds_builder.data_source(out, "train")[0]
  plain = [int(x) for x in record["prompt_ids"]]
  assert len(plain) == 64  # left-truncated to data.max_prompt_length
  hf = AutoTokenizer.from_pretrained(world["tok"])
  # Golden by hand: ChatML renders the system turn before the conversation, special tokens split the text there.
  head = hf(f"<|im_start|>system\n{BETTER}<|im_end|>\n", add_special_tokens=False)["input_ids"]
  contexts = score.Contexts(ChatTokenizer(world["tok"]), score.score_section(cfg), 64)
  got_plain, better, worse = contexts.prompts(record)
  assert got_plain == plain and better == head + plain
  assert len(worse) < len(plain) + 16 and worse[-64:] == plain
  assert contexts.truncated == 2
  # A prompt that was not truncated keeps its full contrastive rendering.
  short = dict(record, prompt_ids=np.asarray(plain[-20:]), prompt_messages=json.dumps(
      [{"role": "user", "content": "hi"}]))
  assert score.Contexts(ChatTokenizer(world["tok"]), score.score_section(cfg), 64).prompts(short)[1] == hf(
      hf.apply_chat_template([{"role": "system", "content": BETTER}, {"role": "user", "content": "hi"}],
                             tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def test_rows_longer_than_max_position_embeddings_are_refused_before_compiling(tmp_path, world):
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), [dict(prompt="short", chosen="a", rejected="b"),
                                                 dict(prompt=" ".join(["word"] * 600), chosen="a", rejected="b")])
  cfg = _score_config(world, tmp_path, [f], max_prompt_length=900, max_length=1000)
  with pytest.raises(ValueError, match=rf"train record 1 \({f}:line 2\): the plain context of the chosen response is "
                     rf"\d+ tokens, longer than max_position_embeddings=512 of {world['ref']}"):
    score.run(cfg)
  assert not [n for n in os.listdir(tmp_path / "cache" / "work") if n.endswith(".safetensors")]


def test_a_batch_that_would_not_fit_in_free_memory_is_refused_naming_bucket_and_record(tmp_path, world, monkeypatch):
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), dc.pair_records(2))
  monkeypatch.setattr(score, "free_device_bytes", lambda device: 4096)  # a device with 4 KiB free
  with pytest.raises(ValueError, match=rf"train record \d \({f}:line \d\): a batch of \d+ rows in bucket T=\d+ would "
                     r"allocate \d+\.\d\d GiB per device \(compiled memory analysis\) but 0\.00 GiB is free"):
    score.run(_score_config(world, tmp_path, [f]))
  assert not [n for n in os.listdir(tmp_path / "cache" / "work") if n.endswith(".safetensors")]


def test_mesh_error_names_the_config_key(tmp_path, world):
  f = dc.write_jsonl(str(tmp_path / "a.jsonl"), dc.pair_records(2))
  cfg = _score_config(world, tmp_path, [f])
  cfg.mesh.tensor = 3
  with pytest.raises(errors.ConfigError, match=r"config\.mesh\.tensor=3 x config\.mesh\.fsdp=1 does not divide the 1 "):
    score.run(cfg)


# ------------------------------------------------------------------------------------ metrics after resume


def test_metrics_jsonl_keeps_one_line_per_step_after_a_resume(tmp_path):
  from tregjax import training
  workdir = str(tmp_path / "run")
  cfg = tc.tiny_config(**{"train.steps": 5})
  training.run(cfg, workdir, data_factory=tc.array_data, max_steps=4)  # checkpoints at 2 and 4
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "a", encoding="utf-8") as f:  # what a run killed after its step-4 checkpoint leaves behind
    f.write(json.dumps({"step": 5, "loss/total": 9.0}) + "\n" + json.dumps({"step": 6, "loss/total": 9.0}) + "\n")
    f.write('{"step": 7, "loss/to')
  training.run(cfg, workdir, data_factory=tc.array_data)
  steps = [r["step"] for r in metrics_lib.read_jsonl(path) if "loss/total" in r]
  assert steps == [1, 2, 3, 4, 5]
  assert all(r["loss/total"] != 9.0 for r in metrics_lib.read_jsonl(path) if "loss/total" in r)


# ------------------------------------------------------------------------------- generate, export, assets


def test_generate_prompt_files_empty_null_and_too_long(tmp_path, world, caplog):
  from tregjax import generate
  cfg = ml_collections.ConfigDict(dict(data=data.default_data_config(), generate=generate.default_generate_config(),
                                       model=dict(hf_path=world["ref"], dtype="float32"),
                                       mesh=dict(data=-1, fsdp=1, tensor=1)))
  cfg.data.tokenizer = world["tok"]
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  cfg.generate.update(prompt_files=[str(empty)], output_dir=str(tmp_path / "out"), max_new_tokens=500,
                      progress_bar=False)
  tok = ChatTokenizer(world["tok"])
  with pytest.raises(DataError, match=rf"{empty}: prompts: no usable records \(0 read; the files hold no records"):
    generate.load_prompts(cfg, tok)
  prompts = dc.write_jsonl(str(tmp_path / "p.jsonl"), [dict(prompt=p) for p in "abcdefghijk"] + [dict(prompt=None)])
  cfg.generate.prompt_files = [prompts]
  cfg.data.on_bad_record = "skip"
  with caplog.at_level(logging.WARNING, logger="tregjax"):
    assert len(generate.load_prompts(cfg, tok)) == 11
  assert [r.levelno for r in caplog.records if "skipped" in r.getMessage()] == [logging.WARNING]
  assert f"{prompts}:line 12: field 'prompt': is null" in caplog.text
  with pytest.raises(errors.ConfigError, match=r"line 1: prompt of \d+ tokens \+ generate\.max_new_tokens=500 runs past "
                     r"max_position_embeddings=512"):
    generate.run(cfg, scorer=lambda messages, text: 0.0)


def test_export_of_a_directory_that_is_not_a_run_is_one_clear_line(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"is not a run directory of `python -m tregjax.train` \(no .*"
                     r"config\.json\)"):
    export.export(str(tmp_path), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------- LoRA / PEFT adapters


def _peft_adapter(base_dir, out_dir, *, rank=4, alpha=8, targets=("q_proj", "v_proj"), **config_edits):
  """A PEFT adapter written by the peft library on `base_dir` (the golden format), then its adapter_config.json
  edited by hand (`config_edits`; a value of None deletes the field)."""
  import peft  # pylint: disable=g-import-not-at-top
  model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                              peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
  model.save_pretrained(str(out_dir))
  path = os.path.join(str(out_dir), "adapter_config.json")
  with open(path, encoding="utf-8") as f:
    conf = json.load(f)
  for k, v in config_edits.items():
    if v is None:
      conf.pop(k, None)
    else:
      conf[k] = v
  with open(path, "w", encoding="utf-8") as f:
    json.dump(conf, f)
  return str(out_dir)


def _llama_base(path, vocab, hidden=32, layers=2):
  LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).save_pretrained(str(path))
  return str(path)


def test_peft_adapters_that_do_not_fit_the_model_are_refused_naming_the_file_and_field(tmp_path, world):
  from tregjax import models  # pylint: disable=g-import-not-at-top
  from tregjax.models import adapters  # pylint: disable=g-import-not-at-top
  base = models.from_pretrained(world["ref"], dtype=np.float32)

  def refused(adapter_dir):
    with pytest.raises(ValueError) as e:
      adapters.load_adapter(base, adapter_dir)
    assert "\n" not in str(e.value)
    return str(e.value)

  # r in adapter_config.json disagrees with the tensors (written with r=4)
  wrong_r = _peft_adapter(world["ref"], tmp_path / "wrong_r", r=8)
  msg = refused(wrong_r)
  assert msg.startswith(f"{wrong_r}/adapter_model.safetensors: tensor base_model.model.model.layers.0.self_attn."
                        "q_proj.lora_A.weight has rank 4 but ") and msg.endswith(
                            f"{wrong_r}/adapter_config.json says r=8 (shape [4, 32], expected [8, 32])"), msg
  # target modules the model does not have (GPT-2's fused attention)
  msg = refused(_peft_adapter(world["ref"], tmp_path / "gpt2_targets", target_modules=["c_attn"]))
  assert msg.startswith(f"{tmp_path / 'gpt2_targets'}/adapter_config.json: target_modules ['c_attn'] are not LoRA "
                        "targets tregjax supports"), msg
  # made for another base: a wider model, a deeper one
  wide = _peft_adapter(_llama_base(tmp_path / "wide_base", world["vocab"], hidden=48), tmp_path / "wide")
  msg = refused(wide)
  assert msg.startswith(f"{wide}/adapter_model.safetensors: tensor base_model.model.model.layers.0.self_attn.q_proj."
                        "lora_A.weight has shape [4, 48], this model needs [4, 32]: an adapter made for another base "
                        f"model (hidden or MLP size) (adapter_config.json names base_model_name_or_path="), msg
  deep = _peft_adapter(_llama_base(tmp_path / "deep_base", world["vocab"], layers=3), tmp_path / "deep")
  assert refused(deep).startswith(f"{deep}/adapter_model.safetensors: the adapter has tensors for 3 layers, this "
                                  "model has 2: an adapter made for another base model"), refused(deep)
  # r <= 0, lora_alpha missing
  assert refused(_peft_adapter(world["ref"], tmp_path / "r0", r=0)) == (
      f"{tmp_path / 'r0'}/adapter_config.json: r=0: must be an int > 0 (the adapters' rank)")
  assert refused(_peft_adapter(world["ref"], tmp_path / "no_alpha", lora_alpha=None)) == (
      f"{tmp_path / 'no_alpha'}/adapter_config.json: lora_alpha=None: must be a number > 0 (the scale is lora_alpha / "
      "r); the file has none")


def test_lora_config_keys_that_cannot_run_name_the_key(tmp_path, world):
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  c = tc.tiny_config(**{"model.lora.rank": -1})
  with pytest.raises(errors.ConfigError, match=r"^config\.model\.lora\.rank=-1: must be >= 0"):
    config_lib.validate(c, check_data=False)
  c = tc.tiny_config(**{"model.lora.rank": 4, "model.lora.alpha": 0.0})
  with pytest.raises(errors.ConfigError, match=r"^config\.model\.lora\.alpha=0\.0: must be > 0"):
    config_lib.validate(c, check_data=False)
  c = tc.tiny_config(**{"model.lora.rank": 4})
  del c.model.lora["alpha"]
  with pytest.raises(errors.ConfigError, match=r"missing keys \['model\.lora\.alpha'\]"):
    config_lib.validate(c, check_data=False)
  c = tc.tiny_config(**{"model.lora.rank": 4, "model.lora.targets": "model/layers/attn/qkv"})
  with pytest.raises(errors.ConfigError, match=r"^config\.model\.lora\.targets='model/layers/attn/qkv' matches no "):
    config_lib.validate(c, check_data=False)
  adapter = _peft_adapter(world["ref"], tmp_path / "a", r=4, alpha=8)
  c = tc.tiny_config(**{"model.lora.rank": 4, "model.lora.alpha": 16.0, "model.lora.init_from": adapter,
                        "model.lora.targets": "attention"})
  with pytest.raises(errors.ConfigError, match=r"^config\.model\.lora\.alpha=16\.0 but the adapter in "
                                                r"config\.model\.lora\.init_from has 8\.0"):
    config_lib.validate(c, check_data=False)


def test_resume_with_other_lora_settings_is_refused_naming_the_key(tmp_path):
  """alpha changes no array shape: without the check the run would go on with another adapter scale."""
  workdir = str(tmp_path / "run")
  lora = {"model.lora.rank": 4, "model.lora.alpha": 8.0, "train.steps": 2, "checkpoint.every": 2}
  first = subprocess.run(tc.worker_cmd(workdir, **lora), env=tc.worker_env(), capture_output=True, text=True,
                         timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  for key, value, saved in (("model.lora.alpha", 16.0, "8.0"), ("model.lora.rank", 8, "4")):
    proc = subprocess.run(tc.worker_cmd(workdir, **{**lora, "train.steps": 4, key: value}), env=tc.worker_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert (f"CheckpointMismatchError: checkpoint {workdir}/checkpoints/2 was trained with config.{key}={saved}, "
            f"this run has {value!r}; resume with the checkpoint's LoRA settings") in proc.stderr, proc.stderr[-3000:]
