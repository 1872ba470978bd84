"""Every config file loads and validates; bad configs fail with a clear message before anything is built."""

import glob
import json
import os
import subprocess
import sys

import pytest
import importlib.util

from tregjax import cli, errors, programs
from tregjax.training import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _load(path, arg=None):
  """What `--config path[:arg]` does: import the file, call get_config(arg)."""
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_file_loads_and_validates(path):
  config = _load(path)
  # Recipes name 8-device meshes (FSDP over -1 devices); validate them for an 8-device host without data on disk.
  config_lib.validate(config, num_devices=8, check_data=False)
  if "runlocal" in open(path).read():
    local = _load(path, "runlocal")
    config_lib.validate(local, num_devices=1, check_data=False)
    assert local.model.preset and not local.model.hf_path and local.data.batch_size <= 8


def test_paper_recipes_carry_the_release_hyperparameters():
  llama = _load(os.path.join(ROOT, "configs", "llama3_8b_dpo_reg.py"))
  assert (llama.loss.loss, llama.loss.regularizer, llama.loss.beta, llama.optimizer.lr) == ("dpo", "treg", 0.01, 7e-7)
  gemma = _load(os.path.join(ROOT, "configs", "gemma2_9b_simpo_reg.py"))
  assert (gemma.loss.loss, gemma.loss.regularizer, gemma.loss.beta, gemma.optimizer.lr) == ("simpo", "treg", 10.0,
                                                                                            8e-7)
  assert gemma.loss.gamma == pytest.approx(10.0 * 0.5)  # SimPO's gamma_beta_ratio 0.5 as an absolute margin
  for c in (llama, gemma):
    assert (c.data.batch_size, c.data.max_length, c.data.max_prompt_length) == (128, 2048, 1800)
    assert (c.optimizer.schedule, c.optimizer.warmup_ratio, c.train.steps, c.data.epochs) == ("cosine", 0.1, -1, 1)


def _bad(**changes):
  c = config_lib.base_config()
  c.data.cache_dir = "/cache"
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize("changes, message", [
    ({"mesh.fsdp": 16}, r"needs 16 devices.*but 8 are available"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, r"needs 4 devices.*but 8 are available"),
    ({"data.batch_size": 12, "optimizer.grad_accum_steps": 2}, r"batch_size=12 is not divisible by .* = 16"),
    ({"loss.loss": "dpoo"}, r"config.loss: unknown loss 'dpoo'"),
    ({"optimizer.schedule": "cosin"}, r"optimizer.schedule='cosin': must be one of"),
    ({"objective": "ppo"}, r"objective='ppo'"),
    ({"optimizer.lr": -1.0}, r"optimizer.lr=-1.0: must be > 0"),
    ({"data.cache_dir": ""}, r"objective=preference needs config.data.cache_dir"),
    ({"data.buckets": (128, 64)}, r"strictly increasing"),
    ({"data.buckets": (64, 128), "data.max_length": 256}, r"max_length=256 does not fit the largest bucket 128"),
    ({"optimizer.warmup_steps": 10, "optimizer.warmup_ratio": 0.1}, r"not both"),
    ({"model.overrides": {"scan_layers": False}}, r"overrides.scan_layers is set by .*config.model.scan_layers"),
])
def test_inconsistent_config_is_refused_with_the_field_named(changes, message):
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.validate(_bad(**changes), num_devices=8)


def test_unknown_key_in_a_trainer_section_is_refused():
  c = config_lib.base_config()
  c.optimizer.learning_rate = 1e-6  # a key optimizer does not have, added before locking (as a config file could)
  with pytest.raises(errors.ConfigError, match=r"^unknown key config.optimizer.learning_rate; known keys of "
                     r"config.optimizer: b1, b2, "):
    config_lib.validate(c, num_devices=1, check_data=False)
  c = config_lib.base_config()
  c.optimizer.l = 1e-6  # a typo: the closest key is named
  with pytest.raises(errors.ConfigError, match=r"^unknown key config.optimizer.l \(did you mean "
                     r"config.optimizer.lr\?\)"):
    config_lib.validate(c, num_devices=1, check_data=False)


@pytest.mark.parametrize("section, typo, closest", [
    ("score", "bukets", "buckets"),  # the scoring pass's section, embedded in every trainer config
    ("score.token_reward", "sorce", "source"),
    ("data", "max_lenght", "max_length"),
])
def test_a_typo_in_a_section_is_one_line_naming_the_key_and_the_closest(section, typo, closest):
  c = config_lib.base_config()
  node = c
  for part in section.split("."):
    node = node[part]
  node[typo] = node[closest]
  with pytest.raises(errors.ConfigError) as e:
    config_lib.validate(c, num_devices=1, check_data=False)
  assert str(e.value).startswith(f"unknown key config.{section}.{typo} (did you mean config.{section}.{closest}?)")
  assert "\n" not in str(e.value)


def test_a_command_section_of_a_trainer_config_is_checked_before_training():
  c = config_lib.base_config()
  c.generate = dict(num_sampels=2)  # read by `python -m tregjax.generate` on the same config file
  with pytest.raises(errors.ConfigError, match=r"unknown key config.generate.num_sampels \(did you mean "
                     r"config.generate.num_samples\?\)"):
    config_lib.validate(c, num_devices=1, check_data=False)
  c.generate = dict(num_samples=0)
  with pytest.raises(errors.ConfigError, match=r"config.generate.num_samples=0 is out of range"):
    config_lib.validate(c, num_devices=1, check_data=False)


HEAVY = ("tensorflow_datasets", "transformers", "tregjax.score", "tregjax.generate", "tregjax.data.build",
         "tregjax.data.tfds_builder", "tregjax.experiments.runner", "tregjax.synthetic.demo",
         "tregjax.tasks.arith_experiment", "tregjax.tasks.credit", "tregjax.training.trainer")


def test_loading_any_config_file_imports_no_data_builder_scorer_or_transformers():
  """Config files import light modules only (tregjax.config_schema and training.config: keys and defaults; a task's
  section defaults in experiments.stages, synthetic.world, tasks.sections): not TFDS, transformers, the data builder, a
  command module, the experiment runner, a task or the trainer, which import those at their top. So a config loads (and
  `--help`, validation, the stage keys work) without them."""
  script = (
      "import importlib.util, json, sys\n"
      f"HEAVY = {HEAVY!r}\n"
      "loaded = {}\n"
      "for path in sys.argv[1:]:\n"
      "  spec = importlib.util.spec_from_file_location('cfg', path)\n"
      "  module = importlib.util.module_from_spec(spec)\n"
      "  spec.loader.exec_module(module)\n"
      "  module.get_config()\n"
      "  loaded[path] = sorted(m for m in HEAVY if m in sys.modules)\n"
      "print(json.dumps(loaded))\n")
  demo = os.path.join(ROOT, "configs", "demo.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", script, demo, *[p for p in CONFIGS if p != demo]], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = json.loads(proc.stdout.strip().splitlines()[-1])
  assert loaded == {path: [] for path in loaded} and len(loaded) == len(CONFIGS), loaded


def test_wrong_type_set_in_a_config_file_is_refused():
  c = config_lib.base_config()
  c.train.steps = 10
  c.unlock()
  del c.train["steps"]
  c.train.steps = "10"  # replaced, not overridden, so ml_collections' own type check does not fire
  with pytest.raises(errors.ConfigError, match=r"config.train.steps: expected int, got '10'"):
    config_lib.validate(c, num_devices=1, check_data=False)


def test_misspelt_top_level_section_is_refused_naming_it_and_the_closest_known():
  c = config_lib.base_config()
  c.optimzer = dict(lr=1e-3)  # a config file's typo for `optimizer`: it would otherwise be silently ignored
  with pytest.raises(errors.ConfigError, match=r"unknown config section or key 'optimzer' \(did you mean "
                     r"'optimizer'\?\)"):
    config_lib.validate(c, num_devices=1, check_data=False)
  c = config_lib.base_config()
  c.learning_rate = 1e-6  # a stray top-level scalar
  with pytest.raises(errors.ConfigError, match="unknown config section or key 'learning_rate'"):
    config_lib.validate(c, num_devices=1, check_data=False)


def test_sections_belong_to_the_program_the_config_names():
  c = config_lib.base_config()
  c.generate = dict(num_samples=2)  # a command section: any program's config may carry it
  config_lib.validate(c, num_devices=1, check_data=False)
  c.demo = dict(sft_steps=3)  # the experiment program's task section, on a config of the bare trainer
  with pytest.raises(errors.ConfigError, match=r"config.demo is a section of program 'experiment', but "
                     r"config.program='train'; set config.program='experiment'"):
    config_lib.validate(c, num_devices=1, check_data=False)
  c.program = "experiment"
  config_lib.validate(c, num_devices=1, check_data=False)
  c.program = "experimnt"
  with pytest.raises(errors.ConfigError, match=r"config.program='experimnt': must be one of \('train', "
                     r"'experiment', 'credit', 'ceiling'\) \(did you mean 'experiment'\?\)"):
    config_lib.validate(c, num_devices=1, check_data=False)


def test_every_program_entry_is_a_function_of_config_and_workdir():
  import inspect
  assert set(programs.PROGRAMS) == {"train", "experiment", "credit", "ceiling"}
  for name, program in programs.PROGRAMS.items():
    params = list(inspect.signature(programs.load(program.entry, "config.program")).parameters)
    assert params[:2] == ["config", "workdir"], (name, params)


def test_every_task_entry_names_a_task_class_with_its_section():
  for name, entry in programs.TASKS.items():
    cls = programs.load(entry.cls, "experiment.task")
    assert cls.section == entry.section, name
    assert callable(cls.prepare) and callable(cls.token_labels) and callable(cls.evaluate), name


def test_cli_refuses_a_misspelt_section_in_a_config_file_with_one_line(tmp_path):
  config_file = tmp_path / "typo.py"
  config_file.write_text(
      "from tregjax.training.config import base_config\n"
      "def get_config():\n"
      "  c = base_config()\n"
      "  c.optimzer = dict(lr=1e-3)\n"
      "  return c\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "tregjax.train", "--config", str(config_file),
                         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == cli.EXIT_CONFIG, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "tregjax.train: error: unknown config section or key 'optimzer' (did you mean 'optimizer'?)"), proc.stderr
  assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "run")


def test_parse_arg_types_values_from_defaults():
  a = config_lib.parse_arg("runlocal,steps=7,model=/m", runlocal=False, steps=1, model="")
  assert (a.runlocal, a.steps, a.model) == (True, 7, "/m")


@pytest.mark.parametrize("flag, message", [
    ("--config.optimizer.lrr=1e-6", "lrr"),  # a typo in an override: the config is locked
    ("--config.optimizer.lr=fast", "lr"),  # the wrong type
])
def test_cli_override_typo_or_wrong_type_exits_nonzero_before_training(tmp_path, flag, message):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "tregjax.train", "--config", "configs/tiny_dpo.py", flag,
                         f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
