"""Every config key with its default, and the rules every command reads a config section by. Imports nothing but the
standard library and ml_collections, so loading a config file (configs/*.py) imports no TFDS, transformers, data
builder or command module.

Layout:
  defaults()            the tree `tregjax.training.config.base_config()` returns (the trainer validates all of it):
                        top-level keys and the model, data, score, loss, optimizer, mesh, checkpoint, train, logging
                        and distributed sections; built from the section functions below.
  data_defaults(), score_defaults(), generate_defaults(), lora_defaults()
                        one section each (tregjax.data.build, tregjax.score, tregjax.generate, model.lora);
                        `generate` is a command section that any config may carry, so it is not in defaults().
  section(config, name) `config.<name>` over its defaults for a command: an unknown key is a ConfigError naming
                        config.<name>.<key> and the closest known key (`unknown_key`, the same rule as the trainer's
                        check of top-level sections), a value of the wrong type too, and INHERITED keys left at None
                        take their owner's value. `merge` is the same rule for a section whose defaults live with
                        its owner.
  tokenizer_dir(config) the one tokenizer lookup (data builder, scoring, generation, export).
The experiment program's sections (experiment, demo, arith) stay with the program and its tasks
(tregjax.experiments.runner, tregjax.synthetic.demo, tregjax.tasks.arith_experiment), imported only when chosen.

One owner per repeated key; in another section None means "the owner's value" (INHERITED):
  data.buckets             score.buckets, generate.buckets (padded row / prompt lengths)
  train.logits_chunk_size  score.chunk_size (positions per chunk of the chunked log-softmax)
  model.dtype              score.dtype, generate.dtype (compute dtype; "" is read as None too)
  seed                     generate.seed (sampling); also parameter and adapter init. data.seed is the data's own
                           shuffle stream (like Hugging Face's data_seed), not a copy of it.
  logging.progress_bar     score.progress_bar, generate.progress_bar
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from tregjax import errors

# score.better_instruction / worse_instruction: T-REG's contrastive prompts (the model judges its own tokens).
BETTER_INSTRUCTION = ("You are a helpful assistant. Your response must be helpful, correct, coherent, and concise.")
WORSE_INSTRUCTION = ("You are an unhelpful assistant. Your response must be unhelpful, incorrect, incoherent, and "
                     "verbose.")

# The splits the dataset builder writes (tregjax.data.build.splits_of): "validation" only from data.validation_files or
# data.validation_fraction > 0. data.train_split and data.eval_split must name one of them.
SPLITS = ("train", "validation")

# The one message for a run that asks for W&B without the package (validate at start-up, the hook when it starts).
WANDB_MISSING = ("config.logging.wandb.project is set, but the wandb package is not installed: "
                 "`pip install 'tregjax[wandb]'` (or `pip install wandb`)")

# Keys that name an input the run will read later: config key -> what it must be ("dir", "file" or "path": either).
# Checked at start-up (tregjax.training.config.check_inputs), not when the run first opens them hours in.
INPUT_PATHS: dict[str, str] = {
    "model.hf_path": "path",  # a Hugging Face directory or a .gguf file
    "model.tokenizer_path": "dir",
    "model.lora.init_from": "dir",
    "data.tokenizer": "dir",
    "data.train_files": "path",  # a list: each JSONL/parquet file or save_to_disk directory
    "data.validation_files": "path",
    "score.token_reward.dpo_checkpoint": "dir",
    "score.token_reward.reward_model": "dir",
}

# A key of another section that defaults to its owner's value: key -> owner (dotted paths from the config's root).
INHERITED: dict[str, str] = {
    "score.buckets": "data.buckets",
    "generate.buckets": "data.buckets",
    "score.chunk_size": "train.logits_chunk_size",
    "score.dtype": "model.dtype",
    "generate.dtype": "model.dtype",
    "generate.seed": "seed",
    "score.progress_bar": "logging.progress_bar",
    "generate.progress_bar": "logging.progress_bar",
}


def _inherit(kind: type) -> ml_collections.FieldReference:
  """None (= the owner's value), typed so that `--config.score.buckets=(64,128)` still parses on the command line."""
  return ml_collections.FieldReference(None, field_type=kind)


def data_defaults() -> ml_collections.ConfigDict:
  """The `data` section: sources, tokenization (tregjax.data.build) and the batch pipeline (tregjax.data.pipeline)."""
  return ml_collections.ConfigDict(dict(
      # Sources and tokenization (tregjax.data.build: their files, the tokenizer and these keys are hashed).

      train_files=(),  # local JSONL / parquet files or datasets.save_to_disk directories of the training pairs
      validation_files=(),  # held-out pairs; when empty, data.validation_fraction of the train records are held out
      validation_fraction=0.0,  # share of train records held out as the "validation" split (a fixed hash of the index)
      format="auto",  # "auto" (from each file's name) | "jsonl" | "parquet" | "hf_disk"
      schema="pair",  # "pair": prompt/chosen/rejected; "chat": message lists; "ranked": responses + scores
      # Record field names read by the schemas (tregjax.data.schema); rename here instead of rewriting the files.
      fields=dict(
          prompt="prompt",  # the prompt: a string or a list of chat messages ("pair", "ranked"; "chat" when needed)
          chosen="chosen",  # the preferred response: a string ("pair") or a message list ending in it ("chat")
          rejected="rejected",  # the other response, like chosen
          responses="all_generated_responses",  # "ranked": the list of candidate responses
          scores="all_rm_scores",  # "ranked": one score per response; the best and the worst become the pair
          id="",  # a field naming each record in messages and outputs ("" = its file and line)
      ),
      system_prompt="",  # a system message put before every prompt that has none ("" = none)
      tokenizer="",  # local tokenizer directory; "" -> see tokenizer_dir()
      end_of_turn_token="",  # appended to every response ("" = the chat template's end-of-turn marker, else EOS)
      max_prompt_length=256,  # prompt tokens kept at most (data.truncation="truncate" keeps the prompt's end)
      max_length=512,  # prompt + response tokens of a row at most
      truncation="truncate",  # over-long pairs: "truncate" (cut the prompt's start, then responses) | "drop" | "error"
      on_bad_record="error",  # "error": stop, naming file, line and field | "skip": count and report bad records
      max_bad_fraction=0.1,  # with on_bad_record="skip": a split with a larger share of bad records is an error
      dataset_dir="",  # where the tokenized dataset is written (one subdirectory per input hash, reused while same)
      # The batch pipeline (tregjax.data.pipeline.make_iterator).

      batch_size=8,  # pairs per optimizer step, over every device and process
      buckets=(64, 128, 256, 512),  # padded row lengths; score.buckets and generate.buckets default to them
      # Each bucket shrinks to the longest row it holds (pipeline.BatchPlan), so a batch is not padded far past its
      # longest row; bench/train_epoch.py measures what it saves on SmolLM2's own pairs.
      fit_buckets=True,
      packing=False,  # first-fit pack several pairs into each row of the largest bucket (data.max_segments at most)
      seed=0,  # the shuffle order (its own stream; config.seed is the run's)
      num_workers=0,  # grain worker processes (0: read in this process, with a prefetch thread)
      drop_remainder=True,  # training drops an epoch's last partial batch (evaluation always reads whole splits)
  ))


# data.fields: record field names of the data schemas (tregjax.data.schema); "" = absent.
DATA_FIELDS = data_defaults().fields.to_dict()


def score_defaults() -> ml_collections.ConfigDict:
  """The `score` section: every key the scoring pass (tregjax.score) reads, with its default."""
  return ml_collections.ConfigDict(dict(
      # T-REG's contrastive prompts: the reference judges its own tokens under the better and the worse one.

      better_instruction=BETTER_INSTRUCTION,  # the contrastive prompt asking for a good response
      worse_instruction=WORSE_INSTRUCTION,  # the contrastive prompt asking for a bad response
      instruction_role="auto",  # "system" | "user" (prefix of the first user turn) | "auto" (system if supported)
      # Where the per-token rewards come from (tregjax.data.scored_cache.REWARD_SOURCES; tregjax.score's docstring).
      token_reward=dict(
          source="contrastive",  # contrastive (T-REG) | confidence | dpo_implicit | r3hf | oracle | none (zeros)
          beta=0.1,  # dpo_implicit: the β of β·(log π_dpo − log π_ref)
          dpo_checkpoint="",  # dpo_implicit: a local HF directory of the DPO-trained policy
          reward_model="",  # r3hf: a local HF sequence reward model (its score read after every response token)
          oracle="",  # oracle: "pkg.module:function" (unless tregjax.score.run(..., oracle=) passes one)
          oracle_id="",  # oracle: what names it in the cache hash (code cannot be hashed: change it with the labels)
      ),
      batch_size=256,  # max rows per jitted call (a response has 3 rows for contrastive)
      # max padded positions per jitted call (rows = batch_tokens // T, at least the dp size); 0 = per data-parallel
      # device 1024 on CPU (the attention scores of a call then stay in cache: measured fastest) and 16384 elsewhere
      batch_tokens=0,
      buckets=_inherit(tuple),  # padded row lengths (longer rows: multiples of the largest); None -> data.buckets
      fit_buckets=True,  # each bucket shrinks to the longest row it holds in a shard (data.pipeline.fitted_buckets)
      dtype=_inherit(str),  # compute dtype; None -> model.dtype ("float32" for exact goldens)
      chunk_size=_inherit(int),  # positions per chunk of the chunked log-softmax; None -> train.logits_chunk_size
      shard_size=1024,  # pairs per output work shard (the resume granularity)
      splits=("train", "validation"),  # splits of the tokenized dataset to score (missing ones are skipped)
      progress_bar=_inherit(bool),  # None -> logging.progress_bar
  ))


def generate_defaults() -> ml_collections.ConfigDict:
  """The `generate` section: every key tregjax.generate reads, with its default (any config may carry it)."""
  return ml_collections.ConfigDict(dict(
      prompt_files=[],  # local prompt files; the prompt field is data.fields.prompt, the format data.format
      output_dir="",  # records.jsonl, pairs.jsonl, summary.json and work/ (the resumable shards)
      num_samples=5,  # responses per prompt
      temperature=0.8,  # sampling temperature; 0 -> greedy (then every sample of a prompt is the same)
      top_p=0.95,  # nucleus sampling: the smallest set of tokens holding this much probability (1.0: no cut)
      top_k=0,  # sample among the k most likely tokens only; 0 -> no top-k cut
      max_new_tokens=512,  # sampled tokens per response at most (a row stops earlier at an end-of-sequence id)
      seed=_inherit(int),  # sampling seed; None -> config.seed
      max_prompt_length=0,  # 0 -> data.max_prompt_length; longer prompts follow data.truncation (keep the end)
      # Sampled rows per jitted call, rounded up to a multiple of the data-parallel size; 0 -> from free memory and a
      # short probe of decode-step rates (tregjax.models.decoding.choose_batch_size).
      batch_size=32,
      buckets=_inherit(tuple),  # padded prompt widths (longer: multiples of the largest); None -> data.buckets
      reward_model="",  # local HF *ForSequenceClassification dir (num_labels=1); "" -> a Python scorer
      scorer="",  # "pkg.module:function" -> scorer(prompt_messages, response_text) -> float (when no reward_model)
      reward_batch_size=32,  # sequences per reward-model call (rounded like batch_size)
      dtype=_inherit(str),  # compute dtype; None -> model.dtype ("float32" for exact goldens)
      shard_size=64,  # prompts per work shard (the resume granularity)
      progress_bar=_inherit(bool),  # None -> logging.progress_bar
  ))


def lora_defaults() -> ml_collections.ConfigDict:
  """config.model.lora (tregjax.training.partition): rank 0 = off (full-parameter training)."""
  return ml_collections.ConfigDict(dict(
      rank=0,  # r of every adapter; > 0 trains adapters only, on a frozen base
      alpha=16.0,  # scale alpha / r (PEFT's lora_alpha)
      dropout=0.0,  # PEFT's lora_dropout: each adapter's input, in training steps only (not eval or scoring)
      targets="all_linear",  # "attention", "all_linear", or a regex over "model/layers/attn/q_proj"-style paths
      init_from="",  # a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to start from
  ))


def distributed_defaults() -> ml_collections.ConfigDict:
  """The `distributed` section: how the processes of a multi-process job join and notice a lost one (passed to
  jax.distributed.initialize by cli.init_distributed; every multi-process command reads it)."""
  return ml_collections.ConfigDict(dict(
      # How long every process waits for all of them to join the coordinator before failing with one line.
      initialization_timeout_s=300,
      # A process that sends no heartbeat for this long is lost. Only the last resort: a lost process normally shows
      # at once, in the next collective (tregjax.peers); this bounds a survivor stuck where nothing fails (a hung
      # accelerator collective). jax's default is 100 s.
      heartbeat_timeout_s=60,
      # At a normal exit, how long a process waits for the others to finish too. jax's default is 300 s.
      shutdown_timeout_s=120,
  ))


def defaults() -> ml_collections.ConfigDict:
  """Every trainer key with its default (unlocked: config files override, then the CLI locks)."""
  c = ml_collections.ConfigDict()
  c.program = "train"  # what `python -m tregjax.train` runs: a key of tregjax.programs.PROGRAMS
  c.seed = 0  # parameter and adapter init, dropout, sampling (generate.seed), the experiment's draws
  # "preference": DPO/IPO/SimPO/TGDPO (+ T-REG) on a scored cache; "sft": next-token loss on the chosen response;
  # "reward_model": Bradley-Terry on a sequence-classification head. Same step, optimizer, checkpoints, logging.
  c.objective = "preference"

  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""  # local HF dir (config.json + *.safetensors) or a .gguf file; "" -> random init from `preset`
  c.model.preset = "tiny_llama"  # a models.ModelConfig classmethod, used when hf_path is ""
  c.model.overrides = ml_collections.ConfigDict()  # ModelConfig fields replaced on the preset (config files only)
  c.model.tokenizer_path = ""  # the model's tokenizer when hf_path holds none (a .gguf file); see tokenizer_dir()
  c.model.dtype = "bfloat16"  # compute dtype (score.dtype, generate.dtype default to it); master: `param_dtype`
  c.model.param_dtype = "float32"  # dtype of the weights that train and of their Adam moments (and checkpoints)
  # Activation checkpointing of each layer: "none" (keep activations), "full" (recompute the layer in the backward
  # pass: least memory), "dots" (keep the weight matmuls' outputs, not attention's batched ones; recompute the rest).
  c.model.remat = "none"
  # True: lax.scan over the stacked layers (compile time flat in depth; the choice for accelerators and deep models).
  # False: an unrolled layer loop. On XLA:CPU that avoids the scan's per-layer weight copies and zero-filled residual
  # stacks: 9-15% faster training steps at 2-4 layers, none at 16, at a compile time that grows with depth
  # (bench/train_step.py --loops scan,unrolled).
  c.model.scan_layers = True
  # Parameter-efficient runs (tregjax.training.partition): LoRA adapters on a frozen base, the frozen weights' dtype.
  c.model.lora = lora_defaults()
  c.model.frozen_param_dtype = ""  # "" -> param_dtype; "bfloat16" halves a frozen base (adapters stay param_dtype)

  # The data section (sources, tokenization, pipeline) plus the trainer's own keys.
  c.data = data_defaults()
  c.data.cache_dir = ""  # scored cache written by `python -m tregjax.score` (objective=preference)
  c.data.train_split = "train"  # the split trained on
  c.data.eval_split = ""  # "" disables evaluation
  c.data.eval_batches = 0  # batches read per evaluation; 0 -> the whole eval split
  c.data.epochs = 1  # passes over the training split when train.steps == -1
  # With data.packing: at most this many pairs per packed row (the pipeline stops filling a row there). The step
  # computes per-pair values over K static segment slots ([B, K, T] masked copies of the per-token arrays).
  c.data.max_segments = 16
  # The scoring pass's keys (contrastive prompts, token-reward source, buckets, shards: tregjax.score): one config
  # file drives score and train, and the trainer recomputes the cache hash from them to refuse a stale cache.
  c.score = score_defaults()

  # Arguments of losses.ObjectiveOptions, verbatim (its docstring has the equations).
  c.loss = ml_collections.ConfigDict()
  c.loss.loss = "dpo"  # dpo | ipo | simpo | tgdpo | tisdpo | confpo (objective="preference")
  c.loss.regularizer = "none"  # "treg": T-REG's token-level regularizer; "sft": an unweighted SFT term (ablation)
  c.loss.beta = 0.1  # β of the preference loss, also the β of T-REG's regularizer
  c.loss.gamma = 0.5  # SimPO's (and ConfPO's) absolute target margin γ
  c.loss.label_smoothing = 0.0  # in [0, 0.5): conservative DPO / SimPO (the pair's label flipped with this chance)
  c.loss.alpha = 0.25  # T-REG's α, the regularizer's weight (the paper searched 0.1 / 0.25 / 0.5)
  c.loss.weighting = "dynamic"  # T-REG's weight w = sg[σ(−z)] of each pair; "static": w = 1 (ablation)
  c.loss.reg_normalization = "auto"  # regularizer over response tokens: "sum" | "mean" | "auto" (mean for SimPO)
  c.loss.tgdpo_alpha = 0.5  # TGDPO's α (loss="tgdpo")
  c.loss.tis_mu = 1.0  # TIS-DPO's μ in the token weights exp(±μ·clamp(r, L, U)) (loss="tisdpo")
  c.loss.tis_lower = -0.5  # TIS-DPO's clamp L of the token rewards
  c.loss.tis_upper = 1.5  # TIS-DPO's clamp U

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-6  # peak learning rate (after warmup; tregjax.training.optimizer.make_schedule)
  c.optimizer.b1 = 0.9  # AdamW's β1
  c.optimizer.b2 = 0.999  # AdamW's β2
  c.optimizer.eps = 1e-8  # AdamW's ε
  c.optimizer.weight_decay = 0.0  # AdamW's decoupled decay, on weight matrices only
  c.optimizer.decay_embeddings = False  # decay the token embeddings too (norms and biases are never decayed)
  c.optimizer.warmup_steps = 0  # steps of linear warmup from 0 to lr; 0 -> optimizer.warmup_ratio
  c.optimizer.warmup_ratio = 0.0  # warmup as a share of the total steps; used when warmup_steps == 0
  c.optimizer.schedule = "cosine"  # after warmup: "cosine" or "linear" decay to lr·min_lr_ratio; else constant
  c.optimizer.min_lr_ratio = 0.0  # final lr / peak lr for cosine and linear decay
  c.optimizer.grad_clip = 1.0  # global-norm clip; 0 disables
  c.optimizer.grad_accum_steps = 1  # micro-batches per optimizer step, scanned inside the jitted step

  # The device mesh (tregjax.parallel); data x fsdp x tensor = the devices, one axis may be -1 (the rest of them).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data parallelism: the batch is split, the parameters replicated
  c.mesh.fsdp = 1  # FSDP (ZeRO-3): parameters and optimizer state sharded, the batch split too
  c.mesh.tensor = 1  # tensor parallelism: attention heads and MLP split (Megatron style)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True  # False: never save, and never resume from <workdir>/checkpoints
  c.checkpoint.every = 500  # steps between saves (and one at the end; a rerun resumes from the latest)
  c.checkpoint.keep = 3  # the newest checkpoints kept (older ones are deleted)
  c.checkpoint.async_save = True  # write in the background while training goes on (Orbax async)
  # Several processes without jax's preemption service: steps between the cross-process checks of a local SIGTERM
  # (a host sync point). With the service (the default) every step is checked at no cost.
  c.checkpoint.preemption_sync_every = 10

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # -1 -> data.epochs passes over the training split
  c.train.log_every = 10  # steps between metric records (metrics.jsonl, TensorBoard, the progress bar); and the last
  c.train.eval_every = 0  # steps between evaluations; 0 -> evaluate only at the end (when data.eval_split is set)
  # A step whose loss or gradient is not finite is skipped (no update); this many in a row stop the run (exit 7).
  c.train.max_consecutive_nonfinite = 5
  c.train.logits_chunk_size = 512  # positions per chunk of the chunked log-softmax (score.chunk_size defaults to it)
  # Regex over parameter paths ("model/embed_tokens", "model/layers/attn/q_proj", "lm_head") kept frozen: no gradient,
  # no optimizer state, not in checkpoints. "" trains every parameter (or every adapter with model.lora).
  c.train.freeze = ""

  c.logging = ml_collections.ConfigDict()
  c.logging.tensorboard = True  # TensorBoard event files in <workdir>/tensorboard
  c.logging.jsonl = True  # one JSON line of metrics per logged step in <workdir>/metrics.jsonl
  c.logging.progress_bar = True  # every command's bar (score.progress_bar, generate.progress_bar default to it)
  c.logging.peak_flops_per_device = 0.0  # 0 -> look the device kind up (MFU is omitted when unknown)
  # Weights & Biases (training/hooks.py WandbHook; the optional [wandb] extra): every scalar the run writes to
  # metrics.jsonl, the config and a summary. project "" = off; WANDB_MODE=offline keeps it in <workdir>/wandb.
  c.logging.wandb = ml_collections.ConfigDict()
  c.logging.wandb.project = ""  # the W&B project ("" = no W&B logging)
  c.logging.wandb.name = ""  # the run's name ("" = the workdir's last component)
  c.logging.wandb.tags = ()  # the run's tags
  c.logging.wandb.entity = ""  # the W&B team or user ("" = the account's default)
  c.distributed = distributed_defaults()  # multi-process jobs: join, heartbeat and shutdown timeouts
  return c


# Command sections read through `section()`: name -> defaults.
SECTIONS = {"data": data_defaults, "score": score_defaults, "generate": generate_defaults,
            "distributed": distributed_defaults}


# ------------------------------------------------------------------------------------------ unknown keys


def closest(name: str, known: Iterable[str]) -> str | None:
  """The known name closest to `name` (difflib), None when none is close: the suggestion of every unknown-name error."""
  match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return match[0] if match else None


def suggestion(name: str, known: Iterable[str]) -> str:
  """The suffix ` (did you mean 'optimizer'?)` for the closest known name, "" when none is close."""
  match = closest(name, known)
  return f" (did you mean {match!r}?)" if match else ""


def model_path(config: ml_collections.ConfigDict, role: str) -> str:
  """`model.hf_path` (a local HF directory or .gguf file); `role` names the model in the error (reference, policy)."""
  model = config.get("model", None) or {}
  path = model.get("hf_path", "")
  if not path:
    raise ValueError(f"set model.hf_path to the {role} model's local directory (config.json + *.safetensors) or .gguf")
  return path


def unknown_key(path: str, known: Iterable[str]) -> errors.ConfigError:
  """The one error for a key its section does not have, on one line: `unknown key config.score.bukets (did you mean
  config.score.buckets?); known keys of config.score: ...`. `path` is dotted from the config's root; `known` are the
  keys of its section."""
  parent, _, leaf = path.rpartition(".")
  known = sorted(known)
  match = closest(leaf, known)
  hint = f" (did you mean config.{parent}.{match}?)" if match else ""
  return errors.ConfigError(f"unknown key config.{path}{hint}; known keys of config.{parent}: {', '.join(known)}")


def check_type(path: str, value: Any, default: Any) -> None:
  """A ConfigError naming `config.<path>` when `value` cannot stand where `default`'s type is expected (None: any)."""
  if value is None or default is None:
    return
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
    raise errors.ConfigError(f"config.{path}: expected {type(default).__name__}, got {value!r} "
                             f"({type(value).__name__})")


def _merge(path: str, defaults: ml_collections.ConfigDict, given: Mapping[str, Any]) -> dict[str, Any]:
  """`given` over `defaults` as plain values; unknown keys and wrong types are ConfigErrors naming the key."""
  out = defaults.to_dict()
  for key in given.keys():
    if key not in defaults:
      raise unknown_key(f"{path}.{key}", defaults.keys())
    value, default = given[key], defaults[key]
    if isinstance(default, ml_collections.ConfigDict) and isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out[key] = _merge(f"{path}.{key}", default, value)
      continue
    check_type(f"{path}.{key}", value, type_default(f"{path}.{key}", default))
    out[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return out


def merge(name: str, defaults: ml_collections.ConfigDict, given: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  """A section `given` over its `defaults`, by the rule of every section: an unknown key (also in a nested dict) is a
  ConfigError naming config.<name>.<key> and the closest known key, a value of the wrong type one naming the key.
  For sections whose defaults live with their owner (the experiment program's experiment, demo and arith)."""
  return ml_collections.ConfigDict(_merge(name, defaults, given or {}))


def type_default(path: str, default: Any) -> Any:
  """What a key's value is type-checked against: its own default, or its owner's for an INHERITED key (None)."""
  return value(None, INHERITED[path]) if path in INHERITED else default


def value(config: ml_collections.ConfigDict | Mapping[str, Any] | None, path: str) -> Any:
  """`config`'s value at a dotted path, or the default of that key where the config lacks it (a command's config
  may carry only the sections that command reads)."""
  node: Any = config
  for part in path.split("."):
    if node is None or not hasattr(node, "get") or part not in node:
      node = None
      break
    node = node[part]
  if node is not None:
    return node
  node = defaults()
  for part in path.split("."):
    node = node[part]
  return node


def _unset(v: Any) -> bool:
  return v is None or (isinstance(v, str) and not v)  # "" was the compute dtype's "model.dtype" before


def section(config: ml_collections.ConfigDict | Mapping[str, Any], name: str) -> ml_collections.ConfigDict:
  """`config.<name>` over its defaults, with every INHERITED key resolved and the section's own rules checked."""
  merged = _merge(name, SECTIONS[name](), config.get(name, None) or {})
  for key, owner in INHERITED.items():
    sec, _, leaf = key.partition(".")
    if sec == name and _unset(merged[leaf]):
      merged[leaf] = value(config, owner)
  out = ml_collections.ConfigDict(merged)
  _CHECKS.get(name, lambda s: None)(out)
  return out


def _check_buckets(path: str, buckets: Any) -> None:
  if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in buckets):
    raise errors.ConfigError(f"config.{path}={buckets!r}: must be a non-empty tuple of positive ints")


def _check_score(s: ml_collections.ConfigDict) -> None:
  if s.instruction_role not in ("auto", "system", "user"):
    raise errors.ConfigError(f"config.score.instruction_role={s.instruction_role!r}: must be auto, system or user")
  _check_buckets("score.buckets", s.buckets)
  for key in ("batch_size", "chunk_size", "shard_size"):
    if s[key] < 1:
      raise errors.ConfigError(f"config.score.{key}={s[key]!r}: must be >= 1")


def _check_distributed(d: ml_collections.ConfigDict) -> None:
  for key in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
    if d[key] < 1:
      raise ConfigError(f"config.distributed.{key}={d[key]!r}: must be >= 1 (seconds)")


def _check_generate(g: ml_collections.ConfigDict) -> None:
  checks = [("num_samples", g.num_samples >= 1), ("max_new_tokens", g.max_new_tokens >= 1),
            ("temperature", g.temperature >= 0), ("top_p", 0 < g.top_p <= 1), ("top_k", g.top_k >= 0),
            ("batch_size", g.batch_size >= 0), ("reward_batch_size", g.reward_batch_size >= 1),
            ("shard_size", g.shard_size >= 1)]
  for name, ok in checks:
    if not ok:
      raise errors.ConfigError(f"config.generate.{name}={g[name]!r} is out of range")
  _check_buckets("generate.buckets", g.buckets)
  if g.reward_model and g.scorer:
    raise errors.ConfigError("set only one of config.generate.reward_model and config.generate.scorer")


_CHECKS = {"score": _check_score, "generate": _check_generate, "distributed": _check_distributed}


# ------------------------------------------------------------------------------------------------ tokenizer


def tokenizer_dir(config: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
  """The run's tokenizer directory, "" when the config names none. The first of:
    data.tokenizer        the tokenizer that made the data's ids (what the model is trained and scored on);
    model.tokenizer_path  the model's own, for a model whose hf_path holds none (a .gguf file);
    model.hf_path         when it is a directory (a Hugging Face checkpoint carries its tokenizer).
  A key that is set wins even when its directory is missing (the loader then says so): a lookup that silently fell
  through to the next key would tokenize with another vocabulary."""
  data = config.get("data", None) or {}
  model = config.get("model", None) or {}
  for path in (data.get("tokenizer", ""), model.get("tokenizer_path", "")):
    if path:
      return str(path)
  hf_path = model.get("hf_path", "")
  return str(hf_path) if hf_path and os.path.isdir(hf_path) else ""


# ------------------------------------------------------------------------------------------- reference


_SECTION_OF_FUNCTION = {"data_defaults": "data", "score_defaults": "score", "generate_defaults": "generate",
                        "lora_defaults": "model.lora", "distributed_defaults": "distributed", "defaults": ""}


def _comments() -> dict[str, str]:
  """Each key's comment in this file (the comment lines above its assignment and the one after it), by dotted path."""
  import inspect  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  out: dict[str, str] = {}
  for function, section in _SECTION_OF_FUNCTION.items():
    pending: list[str] = []
    nested = ""
    for line in inspect.getsource(globals()[function]).splitlines()[1:]:
      if line.strip().startswith("#"):  # a comment line: it describes the next key
        pending.append(line.strip().lstrip("#").strip())
        continue
      code, _, comment = line.partition("  # ") if "  # " in line else (line, "", "")
      stripped = code.strip()
      if not stripped:  # a blank line ends a comment block that heads a group of keys
        pending = []
        continue
      if stripped.startswith('"""'):
        continue
      attr = re.match(r"c\.([\w.]+)\s*=", stripped)
      keys = [attr.group(1)] if attr else re.findall(r"(?<![=!<>\w])(\w+)=(?!=)", stripped)
      inner = re.match(r"(\w+)=dict\($", stripped)
      if inner:
        nested = inner.group(1) + "."
      elif stripped.startswith(")"):
        nested = ""
      text = " ".join(pending + ([comment.strip()] if comment else []))
      pending = []
      if keys and text:
        prefix = f"{section}." if section else ""
        key = prefix + (nested if not inner and keys[0] != nested.rstrip(".") else "") + keys[0]
        out.setdefault(key, text)
  return out


def reference_markdown() -> str:
  """docs/configuration.md: every key, its default and its comment in this file (`python -m tregjax.config_schema`
  writes it; tests/readme_test.py checks that the file is current)."""
  tree = defaults()
  tree.generate = generate_defaults()
  comments = _comments()

  def flat(node, prefix=""):
    for k, v in node.items():
      if isinstance(v, ml_collections.ConfigDict) and len(v) and not (prefix + k).endswith("overrides"):
        yield from flat(v, f"{prefix}{k}.")
      else:
        yield prefix + k, v

  lines = ["# Configuration reference", "",
           "Generated from `tregjax/config_schema.py` by `python -m tregjax.config_schema > docs/configuration.md`",
           "(tests/readme_test.py checks it is current). Every config file starts from these defaults",
           "(`tregjax.training.config.base_config()`); `--config.KEY=VALUE` overrides one on the command line. An",
           "unknown key is an error naming the closest known one. `generate` is a section any config may carry",
           "(read by `tregjax.generate`). None means the owner's value (see the first column's note).", ""]
  section = None
  for key, value in flat(tree):
    top = key.split(".")[0]
    if top != section:
      section = top
      lines += ["", f"## {top}" if "." in key else "## top level", "", "| key | default | meaning |", "|---|---|---|"]
    shown = repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
    note = comments.get(key, "")
    if key in INHERITED:
      note = (note + " " if note else "") + f"(None: `{INHERITED[key]}`)"
    lines.append(f"| `{key}` | `{shown}` | {note.replace('|', '/')} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  print(reference_markdown(), end="")
