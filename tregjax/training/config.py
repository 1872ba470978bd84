"""The trainer's configuration: `base_config()` (every key with its default, from tregjax.config_schema), the sections
of the program a config runs (`tregjax.programs`), and `validate` to fail before anything compiles.

Config files under configs/ start from `base_config()` and override; the CLI locks the result
(`config_flags.DEFINE_config_file(lock_config=True)`), so a typo in `--config.optimizer.lr=...` is an error instead of a
silently ignored key, and ml_collections refuses an override of the wrong type.
"""

from __future__ import annotations

import importlib.util
import json
import os

import ml_collections

from tregjax import config_schema, errors, programs, storage

OBJECTIVES = ("preference", "sft", "reward_model")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")  # models.ModelConfig.remat


# Sections read by the other commands, which any program's config may carry (one file drives score, generate, train).
COMMAND_SECTIONS = ("generate",)


def base_config() -> ml_collections.ConfigDict:
  """Every trainer key with its default (unlocked: config files override, then the CLI locks). The keys and their
  defaults are tregjax.config_schema's (no third-party import: loading a config file builds no data or model code)."""
  return config_schema.defaults()



def _keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
  out = {}
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict) and not (prefix + k).endswith("model.overrides"):
      out.update(_keys(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise errors.ConfigError(f"config.{name}={value!r}: must be one of {choices}")


def check_sections(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict | None = None) -> set[str]:
  """Every top-level key is the trainer's (base_config), a section of the chosen program, or a command section;
  anything else is a ConfigError naming it and the closest known name (a misspelt `c.optimzer = ...` in a config
  file would otherwise be silently ignored). Returns the extra sections present (validated by their owners)."""
  base = base_config() if base is None else base
  chosen = config.get("program", base.program)
  if chosen not in programs.PROGRAMS:
    raise errors.ConfigError(f"config.program={chosen!r}: must be one of {tuple(programs.PROGRAMS)}"
                             f"{config_schema.suggestion(chosen, programs.PROGRAMS)}")
  other_programs = {s: name for name, p in programs.PROGRAMS.items() if name != chosen for s in p.sections}
  known = [*base.keys(), *programs.PROGRAMS[chosen].sections, *COMMAND_SECTIONS]
  extra = set()
  for key in config.keys():
    if key in base:
      continue
    if key in programs.PROGRAMS[chosen].sections or key in COMMAND_SECTIONS:
      extra.add(key)
    elif key in other_programs:
      raise errors.ConfigError(f"config.{key} is a section of program {other_programs[key]!r}, but config.program="
                               f"{chosen!r}; set config.program={other_programs[key]!r} (or remove config.{key})")
    else:
      raise errors.ConfigError(f"unknown config section or key {key!r}{config_schema.suggestion(key, known)}; known: "
                               f"{sorted(known)}")
  return extra


def _unknown_key(path: str, defaults: dict[str, object]) -> errors.ConfigError:
  """The error of every section (config_schema.unknown_key) for the first part of `path` that no section has."""
  parts = path.split(".")
  for i in range(1, len(parts) + 1):
    prefix = ".".join(parts[:i])
    if not any(k == prefix or k.startswith(prefix + ".") for k in defaults):
      break
  parent = ".".join(parts[:i - 1])
  return config_schema.unknown_key(prefix, {k[len(parent) + 1:].split(".")[0] for k in defaults
                                            if k.startswith(parent + ".")})


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None, *, check_data: bool = True) -> None:
  """Raise ConfigError on unknown keys, wrong types and inconsistent settings.

  `num_devices` defaults to `jax.device_count()`; pass it to validate a config for another machine. `check_data=False`
  skips the data-location checks (for `run(..., data_factory=...)`, which brings its own batches).
  """
  base = base_config()
  extra = check_sections(config, base)
  defaults = _keys(base)
  given = {k: v for k, v in _keys(config).items() if k.split(".")[0] not in extra}
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise _unknown_key(unknown[0], defaults)
  missing = sorted(set(defaults) - set(given))
  if missing:
    raise errors.ConfigError(f"config is missing keys {missing}; start config files from base_config()")
  for name, default in defaults.items():
    config_schema.check_type(name, given[name], config_schema.type_default(name, default))
  # The command sections' own rules (the score section's values; a generate section's keys and values), so that a
  # config that drives score, generate and train fails here, before training, rather than in the later command.
  for name in ("score", "distributed", *sorted(extra & set(config_schema.SECTIONS))):
    config_schema.section(config, name)

  _choice("objective", config.objective, OBJECTIVES)
  _choice("model.dtype", config.model.dtype, DTYPES)
  _choice("model.param_dtype", config.model.param_dtype, DTYPES)
  _choice("model.remat", config.model.remat, REMAT)
  _choice("optimizer.schedule", config.optimizer.schedule, SCHEDULES)
  if not config.model.hf_path and not config.model.preset:
    raise errors.ConfigError("config.model: set hf_path (a local checkpoint) or preset (random init)")
  if config.model.overrides and config.model.hf_path:
    raise errors.ConfigError("config.model.overrides applies to a preset only; it cannot change a pretrained "
                             "checkpoint")
  model_overrides(config)  # refuses overrides of fields the trainer's own keys set
  from tregjax.training import partition  # pylint: disable=g-import-not-at-top  (light validation: jax if needed)
  partition.validate(config)

  # The loss options are checked by their own dataclass (one place for their rules).
  from tregjax import losses  # pylint: disable=g-import-not-at-top  (light validation: jax if needed)
  try:
    losses.ObjectiveOptions(**config.loss.to_dict())
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"config.loss: {e}") from e

  if config.logging.wandb.project and importlib.util.find_spec("wandb") is None:
    raise errors.ConfigError(config_schema.WANDB_MISSING)
  for key in ("train_split", "eval_split"):  # the builder writes only config_schema.SPLITS
    split = config.data[key]
    if split and split not in config_schema.SPLITS:
      raise errors.ConfigError(f"config.data.{key}={split!r}: the dataset builder writes only the splits "
                        f"{config_schema.SPLITS} (validation from data.validation_files or data.validation_fraction)")
  if check_data and config.objective == "preference" and not config.data.cache_dir:
    raise errors.ConfigError("objective=preference needs config.data.cache_dir (a scored cache from tregjax.score)")
  if check_data and config.objective in ("sft", "reward_model") and not (config.data.dataset_dir or config.data.cache_dir):
    raise errors.ConfigError(f"objective={config.objective} needs config.data.dataset_dir (or a cache_dir)")

  positive = {
      "data.batch_size": config.data.batch_size, "optimizer.grad_accum_steps": config.optimizer.grad_accum_steps,
      "train.log_every": config.train.log_every, "train.logits_chunk_size": config.train.logits_chunk_size,
      "train.max_consecutive_nonfinite": config.train.max_consecutive_nonfinite, "checkpoint.every":
      config.checkpoint.every, "checkpoint.keep": config.checkpoint.keep, "data.epochs": config.data.epochs,
      "checkpoint.preemption_sync_every": config.checkpoint.preemption_sync_every,
      "data.max_segments": config.data.max_segments}
  for name, v in positive.items():
    if v <= 0:
      raise errors.ConfigError(f"config.{name}={v}: must be > 0")
  if config.train.steps == 0 or config.train.steps < -1:
    raise errors.ConfigError(f"config.train.steps={config.train.steps}: must be > 0, or -1 for data.epochs passes")
  if config.train.eval_every < 0 or config.data.eval_batches < 0:
    raise errors.ConfigError("config.train.eval_every and config.data.eval_batches must be >= 0")
  if not config.data.buckets or any((not isinstance(b, int)) or b <= 1 for b in config.data.buckets):
    raise errors.ConfigError(f"config.data.buckets={config.data.buckets!r}: must be a non-empty tuple of ints > 1")
  if list(config.data.buckets) != sorted(set(config.data.buckets)):
    raise errors.ConfigError(f"config.data.buckets={config.data.buckets!r}: must be strictly increasing")
  if config.data.max_length > max(config.data.buckets):
    raise errors.ConfigError(f"config.data.max_length={config.data.max_length} does not fit the largest bucket "
                             f"{max(config.data.buckets)} (config.data.buckets={tuple(config.data.buckets)})")
  opt = config.optimizer
  if opt.lr <= 0:
    raise errors.ConfigError(f"config.optimizer.lr={opt.lr}: must be > 0")
  if not (0 <= opt.b1 < 1 and 0 <= opt.b2 < 1):
    raise errors.ConfigError(f"config.optimizer.b1/b2 must lie in [0, 1), got {opt.b1}, {opt.b2}")
  if opt.eps <= 0 or opt.weight_decay < 0 or opt.grad_clip < 0 or not 0 <= opt.min_lr_ratio <= 1:
    raise errors.ConfigError("config.optimizer: eps > 0, weight_decay >= 0, grad_clip >= 0, 0 <= min_lr_ratio <= 1")
  if opt.warmup_steps < 0 or not 0 <= opt.warmup_ratio < 1:
    raise errors.ConfigError("config.optimizer: warmup_steps >= 0 and 0 <= warmup_ratio < 1")
  if opt.warmup_steps and opt.warmup_ratio:
    raise errors.ConfigError("config.optimizer: set warmup_steps or warmup_ratio, not both")

  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  from tregjax import parallel  # pylint: disable=g-import-not-at-top  (light validation: jax if needed)
  try:
    data, fsdp, _ = parallel.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices)
  except ValueError as e:
    raise errors.ConfigError(f"config.mesh: {e}") from e
  data_ways = data * fsdp
  per_step = data_ways * opt.grad_accum_steps
  if config.data.batch_size % per_step:
    raise errors.ConfigError(
        f"config.data.batch_size={config.data.batch_size} is not divisible by mesh data×fsdp ({data_ways}) × "
        f"optimizer.grad_accum_steps ({opt.grad_accum_steps}) = {per_step}")
  if check_data:
    check_inputs(config)


def _paths(value) -> list[str]:
  return [str(v) for v in value] if isinstance(value, (tuple, list)) else ([str(value)] if value else [])


def written_splits(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The splits the run's data will hold: what the builder writes from data.train_files, else what a finished local
  scored cache records; None when that cannot be known before the run (a prebuilt dataset_dir, a remote cache)."""
  d = config.data
  if d.train_files:
    return config_schema.SPLITS if (d.validation_files or d.validation_fraction > 0) else config_schema.SPLITS[:1]
  meta = os.path.join(str(d.cache_dir), "cache_meta.json")
  if d.cache_dir and not storage.is_uri(d.cache_dir) and os.path.exists(meta):
    with open(meta, encoding="utf-8") as f:
      return tuple(json.load(f).get("records", {}))
  return None


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Every key that names something the run reads later (config_schema.INPUT_PATHS) exists, and the train and eval
  splits are ones the data will hold: a ConfigError naming the key at start-up instead of a crash hours in (an
  eval split the builder never writes used to fail at the first evaluation, step 400 of the 8B recipes)."""
  for key, kind in config_schema.INPUT_PATHS.items():
    value = config_schema.value(config, key)
    for i, path in enumerate(_paths(value)):
      if storage.is_uri(path):
        continue
      name = f"config.{key}" + (f"[{i}]" if isinstance(value, (tuple, list)) else "")
      ok = os.path.isdir(path) if kind == "dir" else (os.path.isfile(path) if kind == "file" else os.path.exists(path))
      if not ok:
        what = {"dir": "no such directory", "file": "no such file"}.get(kind, "no such file or directory")
        raise errors.ConfigError(f"{name}={path!r}: {what}")
  d = config.data
  splits = written_splits(config)
  if splits is not None:
    for key in ("train_split", "eval_split"):
      if d[key] and d[key] not in splits:
        source = "data.train_files" if d.train_files else f"the scored cache {d.cache_dir}"
        hint = (" (set data.validation_files or data.validation_fraction > 0)" if d[key] == "validation" else "")
        raise errors.ConfigError(f"config.data.{key}={d[key]!r}: {source} gives only the splits {splits}{hint}")
  if config.objective == "preference" and d.train_files and d.eval_split and \
      d.eval_split not in config.score.splits:
    raise errors.ConfigError(f"config.data.eval_split={d.eval_split!r} is not scored: add it to config.score.splits "
                      f"{tuple(config.score.splits)}")
  if config.objective == "preference" and d.train_files and not config.model.hf_path:
    raise errors.ConfigError("config.data.train_files are scored with the reference model, which is the policy's start: "
                      "set config.model.hf_path")
  has_source = d.train_files or d.dataset_dir
  if config.objective == "preference" and d.cache_dir and not has_source and not storage.is_uri(d.cache_dir) and \
      not os.path.exists(os.path.join(str(d.cache_dir), "cache_meta.json")):
    raise errors.ConfigError(f"config.data.cache_dir={d.cache_dir!r} holds no finished scored cache, and there is no "
                      f"data.train_files to score: set data.train_files (tregjax.train then scores them) or run "
                      f"tregjax.score first")


def objective_options(config: ml_collections.ConfigDict):
  """losses.ObjectiveOptions from config.loss."""
  from tregjax import losses  # pylint: disable=g-import-not-at-top  (light validation: jax if needed)
  return losses.ObjectiveOptions(**config.loss.to_dict())


# ModelConfig fields the trainer sets from its own `model.*` keys; an override of them would be silently replaced.
_TRAINER_SET_FIELDS = {"remat": "model.remat", "scan_layers": "model.scan_layers", "lora_rank": "model.lora.rank",
                       "lora_alpha": "model.lora.alpha", "lora_targets": "model.lora.targets",
                       "lora_dropout": "model.lora.dropout"}


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  overrides = dict(config.model.overrides.to_dict()) if config.model.overrides else {}
  for field, key in _TRAINER_SET_FIELDS.items():
    if field in overrides:
      raise errors.ConfigError(f"config.model.overrides.{field} is set by the trainer key config.{key}; set that "
                               "instead")
  return overrides


__all__ = ["base_config", "validate", "check_inputs", "written_splits", "check_sections", "objective_options",
           "model_overrides"]


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`--config file.py:runlocal,steps=10` → ConfigDict(runlocal=True, steps=10) over `defaults` (big_vision style).

  A bare name is a boolean switch; `k=v` takes the type of `defaults[k]` (str when there is no default).
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, eq, value = part.partition("=")
    if not eq:
      out[key] = True
      continue
    kind = type(defaults.get(key, ""))
    out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return out


def shrink_for_cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `runlocal` variant of a recipe: a 2-layer random model, short rows, a few steps, on this machine's devices.

  Keeps the recipe's objective, loss and optimizer settings, so a config file can be smoke-tested on a laptop.
  """
  config.model.hf_path = ""
  config.model.preset = "tiny_llama"
  # The recipe's data files are the real run's: a smoke run names its own (--config.data.cache_dir=TINY_CACHE).
  config.data.train_files, config.data.validation_files, config.data.dataset_dir = (), (), ""
  config.model.dtype = "float32"
  config.model.remat = "none"
  config.data.batch_size = 8
  config.data.buckets = (64, 128)
  config.data.max_prompt_length = 64
  config.data.max_length = 128
  config.optimizer.grad_accum_steps = 1
  config.optimizer.lr = max(config.optimizer.lr, 1e-4)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  config.train.steps = 10
  config.train.log_every = 1
  config.train.eval_every = 0
  config.checkpoint.every = 5
  return config
