"""The trainer's configuration: every key with its default, and `validate` to fail before anything compiles.

Config files under configs/ start from `base_config()` and override; the CLI locks the result
(`config_flags.DEFINE_config_file(lock_config=True)`), so a typo in `--config.optimizer.lr=...` is an error instead of a
silently ignored key, and ml_collections refuses an override of the wrong type.
"""

from __future__ import annotations

import dataclasses
import difflib

import ml_collections

from tregjax import cli

OBJECTIVES = ("preference", "sft", "reward_model")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")  # models.ModelConfig.remat


@dataclasses.dataclass(frozen=True)
class ProgramEntry:
  """What `python -m tregjax.train` runs for a config naming it: `entry(config, workdir)`, and the top-level sections
  it reads beyond the trainer's own (a section of another program is an error, so a config cannot half-select a
  program). Not the trainer's built `trainer.Program` (its jitted steps), which the "train" entry makes."""
  entry: str  # "module:function", imported only when chosen (the experiment runner pulls in its tasks and plots)
  sections: tuple[str, ...] = ()


# config.program -> its ProgramEntry: the one table of what a config can run.
PROGRAMS: dict[str, ProgramEntry] = {
    "train": ProgramEntry("tregjax.training.trainer:run"),  # the trainer on config.data (scored cache, SFT/RM data)
    # stages -> arms -> evaluation -> report (configs/demo.py, configs/smollm2_arith.py); a task's own section
    # is named by its Task.section ("demo": the synthetic world, "arith": SmolLM2 arithmetic).
    "experiment": ProgramEntry("tregjax.experiments.runner:run", ("experiment", "demo", "arith")),
}
# Sections read by the other commands, which any program's config may carry (one file drives score, generate, train).
COMMAND_SECTIONS = ("generate",)


def base_config() -> ml_collections.ConfigDict:
  """Every trainer key with its default (unlocked: config files override, then the CLI locks)."""
  c = ml_collections.ConfigDict()
  c.program = "train"  # what `python -m tregjax.train` runs: a key of PROGRAMS
  c.seed = 0
  # "preference": DPO/IPO/SimPO/TGDPO (+ T-REG) on a scored cache; "sft": next-token loss on the chosen response;
  # "reward_model": Bradley-Terry on a sequence-classification head. Same step, optimizer, checkpoints, logging.
  c.objective = "preference"

  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""  # local HF dir (config.json + *.safetensors) or a .gguf file; "" -> random init from `preset`
  c.model.preset = "tiny_llama"  # a models.ModelConfig classmethod, used when hf_path is ""
  c.model.overrides = ml_collections.ConfigDict()  # ModelConfig fields replaced on the preset (config files only)
  c.model.tokenizer_path = ""  # copied next to exported weights; "" -> hf_path when that is a directory
  c.model.dtype = "bfloat16"  # compute dtype; master weights are `param_dtype`
  c.model.param_dtype = "float32"
  c.model.remat = "none"  # activation checkpointing policy passed to the model
  # True: lax.scan over the stacked layers (compile time flat in depth; the choice for accelerators and deep models).
  # False: an unrolled layer loop. On XLA:CPU that avoids the scan's per-layer weight copies and zero-filled residual
  # stacks: 9-15% faster training steps at 2-4 layers, none at 16, at a compile time that grows with depth
  # (bench/train_layer_loop.py).
  c.model.scan_layers = True
  # Parameter-efficient runs (tregjax.training.partition): LoRA adapters on a frozen base, the frozen weights' dtype.
  from tregjax.training import partition  # pylint: disable=g-import-not-at-top
  c.model.lora = partition.default_lora_config()
  c.model.frozen_param_dtype = ""  # "" -> param_dtype; "bfloat16" halves a frozen base (adapters stay param_dtype)

  # The data engineer's keys (sources, tokenization, pipeline: tregjax.data.build.default_data_config) plus the
  # trainer's own, so one locked section validates every data key.
  from tregjax.data import build as data_build  # pylint: disable=g-import-not-at-top
  c.data = data_build.default_data_config()
  c.data.cache_dir = ""  # scored cache written by `python -m tregjax.score` (objective=preference)
  c.data.train_split = "train"
  c.data.eval_split = ""  # "" disables evaluation
  c.data.eval_batches = 0  # 0 -> the whole eval split
  c.data.epochs = 1  # used when train.steps == -1
  # With data.packing: at most this many pairs per packed row (the pipeline stops filling a row there). The step
  # computes per-pair values over K static segment slots ([B, K, T] masked copies of the per-token arrays).
  c.data.max_segments = 16
  # The scoring pass's keys (contrastive prompts, token-reward source, buckets, shards: tregjax.score): one config
  # file drives score and train, and the trainer recomputes the cache hash from them to refuse a stale cache.
  from tregjax import score as score_lib  # pylint: disable=g-import-not-at-top
  c.score = score_lib.default_score_config()

  # Arguments of losses.ObjectiveOptions, verbatim.
  c.loss = ml_collections.ConfigDict(dict(
      loss="dpo", regularizer="none", beta=0.1, gamma=0.5, label_smoothing=0.0, alpha=0.25, weighting="dynamic",
      reg_normalization="auto", tgdpo_alpha=0.5, tis_mu=1.0, tis_lower=-0.5, tis_upper=1.5))

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-6
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.decay_embeddings = False  # norms and biases (rank <= 1) are never decayed
  c.optimizer.warmup_steps = 0
  c.optimizer.warmup_ratio = 0.0  # of total steps; used when warmup_steps == 0
  c.optimizer.schedule = "cosine"
  c.optimizer.min_lr_ratio = 0.0  # final lr / peak lr for cosine and linear decay
  c.optimizer.grad_clip = 1.0  # global-norm clip; 0 disables
  c.optimizer.grad_accum_steps = 1  # micro-batches per optimizer step, scanned inside the jitted step

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # one axis may be -1 (the rest of the devices)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True
  c.checkpoint.every = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  # Several processes without jax's preemption service: steps between the cross-process checks of a local SIGTERM
  # (a host sync point). With the service (the default) every step is checked at no cost.
  c.checkpoint.preemption_sync_every = 10

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # -1 -> data.epochs passes over the training split
  c.train.log_every = 10
  c.train.eval_every = 0  # 0 -> evaluate only at the end (when data.eval_split is set)
  c.train.max_consecutive_nonfinite = 5
  c.train.logits_chunk_size = 512  # positions per chunk of the chunked log-softmax
  # Regex over parameter paths ("model/embed_tokens", "model/layers/attn/q_proj", "lm_head") kept frozen: no gradient,
  # no optimizer state, not in checkpoints. "" trains every parameter (or every adapter with model.lora).
  c.train.freeze = ""

  c.logging = ml_collections.ConfigDict()
  c.logging.tensorboard = True
  c.logging.jsonl = True
  c.logging.progress_bar = True
  c.logging.peak_flops_per_device = 0.0  # 0 -> look the device kind up (MFU is omitted when unknown)
  return c


# A configuration that cannot run (one class for every command: tregjax.cli maps it to its exit status).
ConfigError = cli.ConfigError


def _keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
  out = {}
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict) and not (prefix + k).endswith("model.overrides"):
      out.update(_keys(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _check_type(name: str, value: object, default: object) -> None:
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif isinstance(default, str):
    ok = isinstance(value, str)
  elif isinstance(default, (tuple, list)):
    ok = isinstance(value, (tuple, list))
  else:
    ok = True
  if not ok:
    raise ConfigError(f"config.{name}: expected {type(default).__name__}, got {value!r} ({type(value).__name__})")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f"config.{name}={value!r}: must be one of {choices}")


def check_sections(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict | None = None) -> set[str]:
  """Every top-level key is the trainer's (base_config), a section of the chosen program, or a command section;
  anything else is a ConfigError naming it and the closest known name (a misspelt `c.optimzer = ...` in a config
  file would otherwise be silently ignored). Returns the extra sections present (validated by their owners)."""
  base = base_config() if base is None else base
  chosen = config.get("program", base.program)
  if chosen not in PROGRAMS:
    raise ConfigError(f"config.program={chosen!r}: must be one of {tuple(PROGRAMS)}{_closest(chosen, PROGRAMS)}")
  other_programs = {s: name for name, p in PROGRAMS.items() if name != chosen for s in p.sections}
  known = [*base.keys(), *PROGRAMS[chosen].sections, *COMMAND_SECTIONS]
  extra = set()
  for key in config.keys():
    if key in base:
      continue
    if key in PROGRAMS[chosen].sections or key in COMMAND_SECTIONS:
      extra.add(key)
    elif key in other_programs:
      raise ConfigError(f"config.{key} is a section of program {other_programs[key]!r}, but config.program="
                        f"{chosen!r}; set config.program={other_programs[key]!r} (or remove config.{key})")
    else:
      raise ConfigError(f"unknown config section or key {key!r}{_closest(key, known)}; known: {sorted(known)}")
  return extra


def _closest(name: str, known) -> str:
  match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return f" (did you mean {match[0]!r}?)" if match else ""


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
    raise ConfigError(f"unknown config keys {unknown} (a typo? known keys: see tregjax.training.config.base_config)")
  missing = sorted(set(defaults) - set(given))
  if missing:
    raise ConfigError(f"config is missing keys {missing}; start config files from base_config()")
  for name, default in defaults.items():
    _check_type(name, given[name], default)

  _choice("objective", config.objective, OBJECTIVES)
  _choice("model.dtype", config.model.dtype, DTYPES)
  _choice("model.param_dtype", config.model.param_dtype, DTYPES)
  _choice("model.remat", config.model.remat, REMAT)
  _choice("optimizer.schedule", config.optimizer.schedule, SCHEDULES)
  if not config.model.hf_path and not config.model.preset:
    raise ConfigError("config.model: set hf_path (a local checkpoint) or preset (random init)")
  if config.model.overrides and config.model.hf_path:
    raise ConfigError("config.model.overrides applies to a preset only; it cannot change a pretrained checkpoint")
  model_overrides(config)  # refuses overrides of fields the trainer's own keys set
  from tregjax.training import partition  # pylint: disable=g-import-not-at-top
  partition.validate(config)

  # The loss options are checked by their own dataclass (one place for their rules).
  from tregjax import losses  # pylint: disable=g-import-not-at-top
  try:
    losses.ObjectiveOptions(**config.loss.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.loss: {e}") from e

  if check_data and config.objective == "preference" and not config.data.cache_dir:
    raise ConfigError("objective=preference needs config.data.cache_dir (a scored cache from tregjax.score)")
  if check_data and config.objective in ("sft", "reward_model") and not (config.data.dataset_dir or config.data.cache_dir):
    raise ConfigError(f"objective={config.objective} needs config.data.dataset_dir (or a cache_dir)")

  positive = {
      "data.batch_size": config.data.batch_size, "optimizer.grad_accum_steps": config.optimizer.grad_accum_steps,
      "train.log_every": config.train.log_every, "train.logits_chunk_size": config.train.logits_chunk_size,
      "train.max_consecutive_nonfinite": config.train.max_consecutive_nonfinite, "checkpoint.every":
      config.checkpoint.every, "checkpoint.keep": config.checkpoint.keep, "data.epochs": config.data.epochs,
      "checkpoint.preemption_sync_every": config.checkpoint.preemption_sync_every,
      "data.max_segments": config.data.max_segments}
  for name, v in positive.items():
    if v <= 0:
      raise ConfigError(f"config.{name}={v}: must be > 0")
  if config.train.steps == 0 or config.train.steps < -1:
    raise ConfigError(f"config.train.steps={config.train.steps}: must be > 0, or -1 for data.epochs passes")
  if config.train.eval_every < 0 or config.data.eval_batches < 0:
    raise ConfigError("config.train.eval_every and config.data.eval_batches must be >= 0")
  if not config.data.buckets or any((not isinstance(b, int)) or b <= 1 for b in config.data.buckets):
    raise ConfigError(f"config.data.buckets={config.data.buckets!r}: must be a non-empty tuple of ints > 1")
  if list(config.data.buckets) != sorted(set(config.data.buckets)):
    raise ConfigError(f"config.data.buckets={config.data.buckets!r}: must be strictly increasing")
  if config.data.max_length > max(config.data.buckets):
    raise ConfigError(f"config.data.max_length={config.data.max_length} does not fit the largest bucket "
                      f"{max(config.data.buckets)} (config.data.buckets={tuple(config.data.buckets)})")
  opt = config.optimizer
  if opt.lr <= 0:
    raise ConfigError(f"config.optimizer.lr={opt.lr}: must be > 0")
  if not (0 <= opt.b1 < 1 and 0 <= opt.b2 < 1):
    raise ConfigError(f"config.optimizer.b1/b2 must lie in [0, 1), got {opt.b1}, {opt.b2}")
  if opt.eps <= 0 or opt.weight_decay < 0 or opt.grad_clip < 0 or not 0 <= opt.min_lr_ratio <= 1:
    raise ConfigError("config.optimizer: eps > 0, weight_decay >= 0, grad_clip >= 0, 0 <= min_lr_ratio <= 1")
  if opt.warmup_steps < 0 or not 0 <= opt.warmup_ratio < 1:
    raise ConfigError("config.optimizer: warmup_steps >= 0 and 0 <= warmup_ratio < 1")
  if opt.warmup_steps and opt.warmup_ratio:
    raise ConfigError("config.optimizer: set warmup_steps or warmup_ratio, not both")

  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  from tregjax import parallel  # pylint: disable=g-import-not-at-top
  try:
    data, fsdp, _ = parallel.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e
  data_ways = data * fsdp
  per_step = data_ways * opt.grad_accum_steps
  if config.data.batch_size % per_step:
    raise ConfigError(
        f"config.data.batch_size={config.data.batch_size} is not divisible by mesh data×fsdp ({data_ways}) × "
        f"optimizer.grad_accum_steps ({opt.grad_accum_steps}) = {per_step}")


def objective_options(config: ml_collections.ConfigDict):
  """losses.ObjectiveOptions from config.loss."""
  from tregjax import losses  # pylint: disable=g-import-not-at-top
  return losses.ObjectiveOptions(**config.loss.to_dict())


# ModelConfig fields the trainer sets from its own `model.*` keys; an override of them would be silently replaced.
_TRAINER_SET_FIELDS = {"remat": "model.remat", "scan_layers": "model.scan_layers", "lora_rank": "model.lora.rank",
                       "lora_alpha": "model.lora.alpha", "lora_targets": "model.lora.targets",
                       "lora_dropout": "model.lora.dropout"}


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  overrides = dict(config.model.overrides.to_dict()) if config.model.overrides else {}
  for field, key in _TRAINER_SET_FIELDS.items():
    if field in overrides:
      raise ConfigError(f"config.model.overrides.{field} is set by the trainer key config.{key}; set that instead")
  return overrides


__all__ = ["base_config", "validate", "check_sections", "PROGRAMS", "ConfigError", "objective_options",
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
