"""tregjax.config_schema: one rule for unknown keys in every section, one owner per formerly repeated key, and one
tokenizer lookup for the data builder, scoring, generation and export."""

import logging
import os
import subprocess
import sys

import ml_collections
import pytest

from tregjax import config_schema, errors
from tregjax.training import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------- unknown keys


def test_a_typo_in_the_score_section_is_refused_by_the_scoring_pass():
  """The scoring pass merged config.score without checking its keys: `c.score.bukets = ...` in a config file was
  silently ignored (and the pass ran with the default buckets)."""
  from tregjax import score  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.score.bukets = (32, 64)
  with pytest.raises(errors.ConfigError) as e:
    score.score_section(c)
  message = str(e.value)
  assert message.startswith("unknown key config.score.bukets (did you mean config.score.buckets?)"), message
  assert "\n" not in message
  c = config_lib.base_config()
  c.score.token_reward.sorce = "confidence"
  with pytest.raises(errors.ConfigError, match=r"^unknown key config.score.token_reward.sorce \(did you mean "
                     r"config.score.token_reward.source\?\)"):
    score.score_section(c)
  c = config_lib.base_config()
  c.score.token_reward.source = "contrastiv"
  with pytest.raises(errors.ConfigError, match=r"config.score.token_reward.source='contrastiv': must be one of "
                     r".* \(did you mean 'contrastive'\?\)"):
    score.score_section(c)


def test_score_and_generate_sections_refuse_unknown_keys_by_the_same_rule():
  from tregjax import generate, score  # pylint: disable=g-import-not-at-top
  for name, section_fn, typo, closest in (("score", score.score_section, "shard_sise", "shard_size"),
                                          ("generate", generate.generate_section, "shard_sise", "shard_size")):
    c = ml_collections.ConfigDict({name: {typo: 4}})
    with pytest.raises(errors.ConfigError) as e:
      section_fn(c)
    assert str(e.value).startswith(f"unknown key config.{name}.{typo} (did you mean config.{name}.{closest}?); "
                                   f"known keys of config.{name}: "), str(e.value)
    c = ml_collections.ConfigDict({name: {"shard_size": "4"}})
    with pytest.raises(errors.ConfigError, match=rf"config.{name}.shard_size: expected int, got '4'"):
      section_fn(c)
    c = ml_collections.ConfigDict({name: {"xyz": 1}})  # nothing close: the key and the known keys only
    with pytest.raises(errors.ConfigError, match=rf"^unknown key config.{name}.xyz; known keys of config.{name}: "):
      section_fn(c)


def test_experiment_program_sections_follow_the_same_rule():
  c = ml_collections.ConfigDict(dict(experiment=dict(armz=("dpo",))))
  from tregjax.experiments import runner  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match=r"^unknown key config.experiment.armz \(did you mean "
                     r"config.experiment.arms\?\)"):
    runner.experiment_section(c)
  from tregjax.tasks import arith_experiment  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match=r"^unknown key config.arith.train_prompt \(did you mean "
                     r"config.arith.train_prompts\?\)"):
    arith_experiment.ArithTask(ml_collections.ConfigDict(dict(arith=dict(train_prompt=3))))


# ------------------------------------------------------------------------------------------- repeated keys


def _config(**values):
  c = config_lib.base_config()
  c.generate = config_schema.generate_defaults()
  for key, value in values.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_each_formerly_repeated_key_has_one_owner_the_others_default_to():
  c = _config(**{"data.buckets": (32, 96), "train.logits_chunk_size": 48, "model.dtype": "float32", "seed": 7,
                 "logging.progress_bar": False})
  s, g = config_schema.section(c, "score"), config_schema.section(c, "generate")
  assert (s.buckets, s.chunk_size, s.dtype, s.progress_bar) == ((32, 96), 48, "float32", False)
  assert (g.buckets, g.seed, g.dtype, g.progress_bar) == ((32, 96), 7, "float32", False)
  # A section's own value still wins over its owner's (existing configs and command lines keep working).
  c = _config(**{"score.buckets": (64,), "score.chunk_size": 16, "score.dtype": "bfloat16", "score.progress_bar": True,
                 "generate.seed": 3, "generate.buckets": (16,), "generate.dtype": "float16",
                 "logging.progress_bar": False})
  s, g = config_schema.section(c, "score"), config_schema.section(c, "generate")
  assert (s.buckets, s.chunk_size, s.dtype, s.progress_bar) == ((64,), 16, "bfloat16", True)
  assert (g.buckets, g.seed, g.dtype, g.progress_bar) == ((16,), 3, "float16", False)
  # A command's config may carry only the sections it reads: an owner it lacks gives its default.
  bare = ml_collections.ConfigDict(dict(score=dict(batch_size=4)))
  s = config_schema.section(bare, "score")
  assert (s.buckets, s.chunk_size, s.dtype, s.progress_bar) == ((64, 128, 256, 512), 512, "bfloat16", True)
  # "" was the compute dtype's way to say model.dtype: it still says so.
  assert config_schema.section(_config(**{"score.dtype": "", "model.dtype": "float32"}), "score").dtype == "float32"


def test_inherited_keys_are_listed_and_left_unset_in_the_defaults():
  d = config_schema.defaults()
  d.generate = config_schema.generate_defaults()
  for key, owner in config_schema.INHERITED.items():
    section, leaf = key.split(".")
    assert d[section][leaf] is None, key
    node = d
    for part in owner.split("."):
      node = node[part]
    assert node is not None, owner
  # Documented in the module docstring, owner by owner.
  for owner in set(config_schema.INHERITED.values()):
    assert owner in config_schema.__doc__, owner


def test_a_wrong_type_for_an_inherited_key_names_it():
  c = config_lib.base_config()
  c.unlock()
  del c.score["chunk_size"]
  c.score.chunk_size = "32"  # replaced, not overridden, so ml_collections' own type check does not fire
  with pytest.raises(errors.ConfigError, match=r"config.score.chunk_size: expected int, got '32'"):
    config_lib.validate(c, num_devices=1, check_data=False)


def test_inherited_keys_still_take_command_line_overrides(tmp_path):
  """`--config.score.buckets=(64,128)` and `--config.generate.seed=3` parse as before, though their default is None."""
  config_file = tmp_path / "c.py"
  config_file.write_text(
      "from tregjax.training.config import base_config\n"
      "from tregjax import config_schema\n"
      "def get_config():\n"
      "  c = base_config()\n"
      "  c.generate = config_schema.generate_defaults()\n"
      "  return c\n")
  script = (
      "import sys\n"
      "from absl import app\n"
      "from ml_collections import config_flags\n"
      "from tregjax import config_schema\n"
      "_C = config_flags.DEFINE_config_file('config', None, lock_config=True)\n"
      "def main(_):\n"
      "  s, g = config_schema.section(_C.value, 'score'), config_schema.section(_C.value, 'generate')\n"
      "  print(s.buckets, s.chunk_size, s.progress_bar, s.dtype, g.seed, g.buckets)\n"
      "app.run(main)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", script, f"--config={config_file}", "--config.score.buckets=(64,128)",
                         "--config.score.chunk_size=32", "--config.score.progress_bar=False",
                         "--config.score.dtype=float32", "--config.generate.seed=3"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "(64, 128) 32 False float32 3 (64, 128, 256, 512)"


# ----------------------------------------------------------------------------------------------- tokenizer


def _layout(tmp_path):
  """A hand-built layout: a data tokenizer, a model tokenizer, an HF checkpoint directory, a .gguf file."""
  paths = {name: tmp_path / name for name in ("data_tok", "model_tok", "hf")}
  for p in paths.values():
    p.mkdir()
    (p / "tokenizer_config.json").write_text("{}")
  gguf = tmp_path / "model.gguf"
  gguf.write_bytes(b"GGUF")
  return {k: str(v) for k, v in paths.items()} | {"gguf": str(gguf), "gone": str(tmp_path / "gone")}


def _tok_config(data="", model_tok="", hf=""):
  c = config_lib.base_config()
  c.data.tokenizer, c.model.tokenizer_path, c.model.hf_path = data, model_tok, hf
  return c


def test_tokenizer_resolution_order_is_one_for_every_command(tmp_path):
  """data.tokenizer (the data's ids), then model.tokenizer_path, then model.hf_path when it is a directory; the data
  builder (and through it score and generate) and export resolve the same directory. Export used to prefer
  model.tokenizer_path over data.tokenizer, the builder the other way round."""
  from tregjax import export  # pylint: disable=g-import-not-at-top
  from tregjax.data import build  # pylint: disable=g-import-not-at-top
  p = _layout(tmp_path)
  cases = [
      (dict(data=p["data_tok"], model_tok=p["model_tok"], hf=p["hf"]), p["data_tok"]),
      (dict(model_tok=p["model_tok"], hf=p["hf"]), p["model_tok"]),
      (dict(hf=p["hf"]), p["hf"]),
      (dict(model_tok=p["model_tok"], hf=p["gguf"]), p["model_tok"]),
      (dict(hf=p["gguf"]), ""),  # a .gguf file is no tokenizer directory
      (dict(), ""),
  ]
  for keys, expected in cases:
    c = _tok_config(**keys)
    assert config_schema.tokenizer_dir(c) == expected, keys
    assert export.tokenizer_dir(c) == (expected or None), keys
    if expected:
      assert build.tokenizer_path(c) == expected, keys
    else:
      with pytest.raises(ValueError, match="set data.tokenizer"):
        build.tokenizer_path(c)


def test_a_tokenizer_key_that_names_a_missing_directory_does_not_fall_through(tmp_path, caplog):
  """A set key wins even when its directory is gone: falling through to hf_path would tokenize with another
  vocabulary. The builder then fails naming it; export writes the model without a tokenizer and says so."""
  from tregjax import export  # pylint: disable=g-import-not-at-top
  from tregjax.data import build  # pylint: disable=g-import-not-at-top
  p = _layout(tmp_path)
  c = _tok_config(data=p["gone"], hf=p["hf"])
  assert build.tokenizer_path(c) == p["gone"]
  with caplog.at_level(logging.WARNING, logger="tregjax.export"):
    assert export.tokenizer_dir(c) is None
  assert p["gone"] in caplog.text


def test_model_path_is_not_a_key():
  """`model.path` was read as a fallback of model.hf_path by the tokenizer lookup: no config can hold it."""
  c = config_lib.base_config()
  c.model.path = "/somewhere"
  with pytest.raises(errors.ConfigError, match=r"unknown key config.model.path"):
    config_lib.validate(c, num_devices=1, check_data=False)
  bare = ml_collections.ConfigDict(dict(model=dict(path="/somewhere")))
  assert config_schema.tokenizer_dir(bare) == ""
