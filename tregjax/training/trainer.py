"""`build(config, mesh)`: the run's program (model, optimizer, shardings, jitted steps); `run(config, workdir)`: the loop.

`build` is the one place the TrainState, its shardings and the jitted train / eval steps are made; `run`, `load_model`
and the benches use it. The loop only steps and decides when to stop; its side jobs (metrics, progress bar,
checkpoints, evaluation) are `hooks.Hook`s with an `every`. Three effects are set up in `run` and nowhere else: the
mesh (`parallel.use_mesh`), the SIGTERM / preemption handling (`_Stop`: all processes stop after the same step), and
the metric sinks (process 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from tregjax import errors, parallel, peers, storage
from tregjax.data import build as data_build
from tregjax.data import pipeline, scored_cache
from tregjax.training import checkpoint as ckpt_lib
from tregjax.training import config as config_lib
from tregjax.training import hooks as hooks_lib
from tregjax.training import metrics as metrics_lib
from tregjax.training import model_init
from tregjax.training import optimizer as optimizer_lib
from tregjax.training import partition
from tregjax.training import step as step_lib

log = logging.getLogger("tregjax.train")

# A data source: (config, split, process_index, process_count) -> iterator of PreferenceBatch (numpy, this
# process's rows) with get_state()/set_state(); `len()` (batches per epoch) when the split is finite.
DataFactory = Callable[[ml_collections.ConfigDict, str, int, int], Iterator]


def default_data(config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int) -> Iterator:
  """The grain pipeline over the scored cache (preference) or the tokenized dataset (sft / reward_model).

  An evaluation split is read once, in order, and whole: `data.drop_remainder` applies to training only (its short
  last batch ends in all-padding rows, which the loss weighs out). A cache on object storage is read from this host's
  copy of it (`scored_cache.local_copy`: copied down once, keyed by its hash, refused without its marker).
  """
  train = split == config.data.train_split
  data = config.data
  if data.get("cache_dir") and storage.is_uri(data.cache_dir):  # grain reads a POSIX path: this host's copy, checked by its marker and hash
    data = data.copy_and_resolve_references()
    data.cache_dir = scored_cache.local_copy(str(config.data.cache_dir))
  return pipeline.make_iterator(data, split=split, objective=config.objective, process_index=process_index,
                                process_count=process_count, num_epochs=None if train else 1,
                                shuffle=None if train else False, drop_remainder=None if train else False)


def check_scored_cache(config: ml_collections.ConfigDict) -> None:
  """Refuse a scored cache made from other inputs (model, tokenizer, prompts, token-reward source, data).

  The policy starts from the reference (`model.hf_path`), so the cache must have been scored with that model; a
  random-init run (no hf_path) has no reference to compare with and is only warned about.
  """
  if not config.model.hf_path:
    log.warning("model.hf_path is empty (random init): cannot check that %s was scored with this model",
                config.data.cache_dir)
    return
  scored_cache.check_cache(config.data.cache_dir, scored_cache.cache_components(config))


@dataclasses.dataclass(frozen=True)
class Program:
  """What a run compiles, built once by `build` and shared by training, `load_model` and the benches.

  `target` is the TrainState as ShapeDtypeStructs on `state_shardings` (the restore target, and what the benches
  lower the step with). `train_step(state, batch) -> (state, metrics)` donates `state`; `eval_step(params, extra,
  batch) -> (weight, metric sums)`. Both are `jax.jit`s: lowering and compiling happen at their first call.
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model_cfg: Any
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: step_lib.TrainState
  target: step_lib.TrainState
  train_step: Callable
  eval_step: Callable
  max_segments: int

  def _init_state(self, params: nnx.State, extra: nnx.State) -> step_lib.TrainState:
    return step_lib.init_state(params, extra, self.tx, self.config.seed)

  def init(self) -> step_lib.TrainState:
    """A fresh TrainState sharded over the mesh from birth: the pretrained model streamed in (`model.hf_path`), else
    one jitted random init straight into the sharded state."""
    if self.config.model.hf_path:
      _, params, extra = model_init.build_model_state(self.config, self.model_cfg, self.mesh)
      return jax.jit(self._init_state, out_shardings=self.state_shardings)(params, extra)
    return jax.jit(lambda: self._init_state(*model_init.random_init(self.config, self.model_cfg)),
                   out_shardings=self.state_shardings)()

  def with_frozen(self, state: step_lib.TrainState) -> step_lib.TrainState:
    """A restored state with its frozen weights (LoRA base, `train.freeze`): checkpoints hold only what trains, the
    frozen part is rebuilt from its source."""
    if not partition.has_frozen(self.target.extra):
      return state
    return partition.with_frozen(state, model_init.build_model_state(self.config, self.model_cfg, self.mesh)[2])

  def place(self, batch: Any) -> Any:
    """Process-local numpy rows → global jax arrays sharded on the batch axis (multi-host safe)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        parallel.batch_sharding(self.mesh, np.ndim(x)), np.asarray(x)), batch)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, total_steps: int | None = None,
          model_cfg: Any = None) -> Program:
  """The run's program over `mesh`, from abstract shapes only (nothing allocated): graphdef, optimizer over what
  trains (`partition`), TrainState shardings, the jitted train and eval steps. `total_steps` sets the schedule's
  length (default `train.steps`; it does not change any shape). `model_cfg`: the run's `model_init.model_config`
  when the caller has it already (the program carries it: the checkpoint's config.json is read once)."""
  total_steps = max(config.train.steps, 1) if total_steps is None else total_steps
  model_cfg = model_init.model_config(config) if model_cfg is None else model_cfg
  graphdef, params, extra = model_init.build_model_state(config, model_cfg, mesh, abstract=True)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, total_steps, params)
  abstract_state = jax.eval_shape(lambda p, e: step_lib.init_state(p, e, tx, config.seed), params, extra)
  state_sh = step_lib.state_shardings(abstract_state, tx, mesh)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sh)
  options = config_lib.objective_options(config) if config.objective == "preference" else None
  max_segments = config.data.max_segments if config.data.packing else 1
  loss_fn = step_lib.make_loss_fn(config.objective, options, config.train.logits_chunk_size, max_segments)
  replicated = parallel.sharding_for(None, (), mesh)
  train_step = jax.jit(
      step_lib.make_train_step(graphdef, tx, schedule, loss_fn, config.optimizer.grad_accum_steps, mesh,
                               partition.update_mask(config, params), dropout=model_cfg.lora_dropout > 0),
      in_shardings=(state_sh, None), out_shardings=(state_sh, replicated), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(graphdef, loss_fn), in_shardings=(state_sh.params, state_sh.extra, None),
                      out_shardings=replicated)
  return Program(config=config, mesh=mesh, model_cfg=model_cfg, graphdef=graphdef, tx=tx,
                 schedule=schedule, state_shardings=state_sh, target=target, train_step=train_step,
                 eval_step=eval_step, max_segments=max_segments)


@dataclasses.dataclass
class _Compiled:
  """AOT-compiled executables keyed by batch shapes (one per length bucket)."""
  jitted: Any
  memory_logged: bool = False
  table: dict = dataclasses.field(default_factory=dict)
  memory: dict = dataclasses.field(default_factory=dict)

  def __call__(self, *args):
    key = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args[-1]))
    fn = self.table.get(key)
    if fn is None:
      t0 = time.perf_counter()
      fn = self.table[key] = self.jitted.lower(*args).compile()
      log.info("compiled for batch shapes %s in %.1fs", key[0], time.perf_counter() - t0)
      if not self.memory_logged:
        self.memory_logged = True
        mem = fn.memory_analysis()
        if mem is not None:
          self.memory = {k: int(getattr(mem, k)) for k in (
              "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes") if hasattr(mem, k)}
          log.info("compiled step memory_analysis: %s", self.memory)
    return fn(*args)


def _preemption_service_running(step: int) -> bool:
  """Whether jax.distributed started jax's preemption sync manager (`jax_enable_preemption_service`, on by default).

  It catches SIGTERM on any process and agrees a step with the coordinator; read by orbax's `reached_preemption`.
  Asked through the public `reached_preemption_sync_point`, which raises RuntimeError when the service is off (as
  orbax's own `multihost.reached_preemption` does). The probe counts as the call for `step`, the step training
  resumes from: the same on every process, and below the next step the loop reports.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:
    return False
  return jax.distributed.is_initialized()


class _Stop:
  """SIGTERM / a preemption notice → every process stops (and saves) after the SAME step.

  One process: a SIGTERM handler sets a flag, read at each step boundary. Several processes: jax's preemption sync
  manager (its own SIGTERM handler notifies the coordinator, which picks a step that all processes reach), read
  through `Checkpointer.reached_preemption` at every step. Where that service is off, a SIGTERM handler's flag is
  combined across processes with a one-int allgather every `sync_every` steps (a host sync point, hence not every
  step), so the processes still agree on the step.
  """

  def __init__(self, ckpt: ckpt_lib.Checkpointer, sync_every: int, start_step: int = 0):
    self.ckpt, self.sync_every, self.start_step = ckpt, sync_every, start_step
    self.requested = False
    self._previous = None
    self.mode = "signal"

  def __enter__(self):
    if jax.process_count() > 1:
      self.mode = "jax_service" if _preemption_service_running(self.start_step) else "allgather"
    if self.mode != "jax_service":
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    log.info("preemption handling: %s", self.mode)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Call after every step, on every process, with the same step number."""
    if self.mode == "signal":
      return self.requested
    if self.mode == "jax_service":
      return self.ckpt.reached_preemption(step)
    if step % self.sync_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray([int(self.requested)], np.int32))
    return bool(np.any(np.asarray(flags)))

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def evaluate(program: Program, state: step_lib.TrainState, data_factory: DataFactory) -> dict[str, float]:
  """Weighted mean of the eval step's metrics over `data.eval_split` (at most `data.eval_batches` batches)."""
  config = program.config
  it = data_factory(config, config.data.eval_split, jax.process_index(), jax.process_count())
  total_w, sums = 0.0, {}
  for i, batch in enumerate(it):
    if config.data.eval_batches and i >= config.data.eval_batches:
      break
    step_lib.check_segments(batch, program.max_segments, where=f"eval batch {i} of split {config.data.eval_split!r}")
    w, s = program.eval_step(state.params, state.extra, program.place(batch))
    w, s = jax.device_get((w, s))
    total_w += float(w)
    for k, v in s.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  if not total_w:
    raise ValueError(f"eval split {config.data.eval_split!r} produced no batches")
  return {f"eval/{k}": v / total_w for k, v in sums.items()}


# ModelConfig's LoRA fields -> the config key that sets them. A resume must keep them: alpha changes no array shape,
# so only this check stops a run from going on with another adapter scale (dropout may change, like the lr).
_LORA_KEYS = {"lora_rank": "model.lora.rank", "lora_alpha": "model.lora.alpha", "lora_targets": "model.lora.targets"}


def _check_lora_resume(where: str, saved: dict[str, Any], cfg) -> None:
  """CheckpointMismatchError naming the config key whose LoRA setting differs from the checkpoint's."""
  for field, key in _LORA_KEYS.items():
    if field not in saved:
      continue
    theirs, mine = saved[field], getattr(cfg, field)
    if isinstance(mine, tuple):
      theirs = tuple(theirs or ())
    if theirs != mine:
      raise ckpt_lib.CheckpointMismatchError(
          f"checkpoint {where} was trained with config.{key}={theirs!r}, this run has {mine!r}; resume with the "
          "checkpoint's LoRA settings, or use a fresh --workdir")


def _initial_state(program: Program, ckpt: ckpt_lib.Checkpointer, train_iter) -> step_lib.TrainState:
  """Resumed from the latest checkpoint (state and data-iterator position), else `program.init()`."""
  config = program.config
  latest = ckpt.latest_step() if config.checkpoint.enabled else None
  if latest is None:
    return program.init()
  saved_meta = ckpt.read_meta(latest)
  if saved_meta.get("objective") != config.objective:
    raise ckpt_lib.CheckpointMismatchError(
        f"{ckpt.directory}/{latest} was written by objective={saved_meta.get('objective')!r}, this run is "
        f"{config.objective!r}; use a fresh --workdir")
  _check_lora_resume(f"{ckpt.directory}/{latest}", saved_meta.get("model_config") or {}, program.model_cfg)
  state, data_state, _ = ckpt.restore(latest, partition.saved(program.target))
  state = program.with_frozen(state)
  train_iter.set_state(data_state)
  log.info("resumed from %s/%d", ckpt.directory, latest)
  return state


def _total_steps(config: ml_collections.ConfigDict, train_iter) -> int:
  if config.train.steps != -1:
    return config.train.steps
  try:
    per_epoch = len(train_iter)
  except TypeError as e:
    raise errors.ConfigError("train.steps=-1 needs a data source that knows its length") from e
  return config.data.epochs * per_epoch


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What `run` returns: the trained model (`model()`, from `graphdef` + the final `state`) and the JSON fields that
  summary.json holds (`json()`). stopped: "completed" | "preempted" | "data_exhausted"; final_metrics: the last step's
  metrics; memory_analysis: the compiled step's."""
  graphdef: nnx.GraphDef
  state: step_lib.TrainState
  step: int
  start_step: int
  total_steps: int
  stopped: str
  final_metrics: dict[str, float]
  eval_metrics: dict[str, float]
  memory_analysis: dict[str, int]
  workdir: str
  checkpoint_dir: str
  metrics_file: str
  tensorboard_dir: str

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.state.params, self.state.extra)

  def json(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("graphdef", "state")}


def run(config: ml_collections.ConfigDict, workdir: str, *, data_factory: DataFactory | None = None,
        max_steps: int | None = None, hooks: Sequence[hooks_lib.Hook] = ()) -> RunResult:
  """Train (or resume) into `workdir`; writes summary.json (`RunResult.json()`) and returns the RunResult.

  `data_factory` replaces the grain pipeline (tests, synthetic worlds); `max_steps` stops early at that step (the
  schedule still spans `train.steps`), which is how tests stop a run midway. `hooks` run after the built-in ones
  (metrics, progress bar, checkpoints, evaluation).
  """
  config_lib.validate(config, check_data=data_factory is None)
  data_factory = data_factory or default_data
  # A local path or a storage URI (gs://...): a missing or unwritable bucket is one line here, before any training.
  workdir = storage.resolve(workdir, "workdir")
  storage.check_writable(workdir, "workdir")
  mesh = parallel.mesh_from_config(config)
  log.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  if data_factory is default_data and config.objective == "preference":
    check_scored_cache(config)
  model_cfg = model_init.model_config(config)
  if data_factory is default_data:  # the data's tokenizer must fit the model's embedding (else NaN, silently)
    data_build.check_vocab(config, model_cfg, "tregjax.train")
  train_iter = data_factory(config, config.data.train_split, jax.process_index(), jax.process_count())
  total_steps = _total_steps(config, train_iter)
  stop_at = total_steps if max_steps is None else min(max_steps, total_steps)

  ckpt = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"), every=config.checkpoint.every,
                               keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  peers.keep_checkpoints(ckpt.directory)  # what a lost peer's one line reports as kept
  program = build(config, mesh, total_steps=total_steps, model_cfg=model_cfg)
  state = _initial_state(program, ckpt, train_iter)
  train_step = _Compiled(program.train_step)
  start_step = step = int(jax.device_get(state.step))
  # From the restored step on, metrics.jsonl holds one line per step: those a killed run wrote past it are dropped.
  writer = metrics_lib.MetricsWriter(workdir, tensorboard=config.logging.tensorboard, jsonl=config.logging.jsonl,
                                     resume_step=step)
  metrics = hooks_lib.MetricsHook(
      writer, objective=config.objective, log_every=config.train.log_every, stop_at=stop_at,
      max_nonfinite=config.train.max_consecutive_nonfinite, model_cfg=program.model_cfg,
      peak_flops=config.logging.peak_flops_per_device or metrics_lib.peak_flops_per_device())
  built_in: list[hooks_lib.Hook] = [metrics]
  if config.logging.progress_bar and jax.process_index() == 0:
    built_in.append(hooks_lib.ProgressHook(stop_at, step, metrics))
  if config.checkpoint.enabled:
    meta = {"model_config": dataclasses.asdict(program.model_cfg), "objective": config.objective,
            "total_steps": total_steps}
    built_in.append(hooks_lib.CheckpointHook(ckpt, train_iter, meta, start_step))
  evaluation = None
  if config.data.eval_split:
    evaluation = hooks_lib.EvalHook(lambda s: evaluate(program, s, data_factory), writer, config.train.eval_every)
    built_in.append(evaluation)
  if config.logging.wandb.project and jax.process_index() == 0:  # last: its summary follows the final metrics
    built_in.append(hooks_lib.WandbHook(writer, config, workdir))
  side_jobs = hooks_lib.Hooks([*built_in, *hooks])

  stopped, lost = "completed", False
  with parallel.use_mesh(mesh), _Stop(ckpt, config.checkpoint.preemption_sync_every, step) as stop:
    try:
      while step < stop_at:
        try:
          host_batch = next(train_iter)
        except StopIteration:
          log.info("training data exhausted at step %d", step)
          stopped = "data_exhausted"
          break
        step_lib.check_segments(host_batch, program.max_segments, where=f"training batch of step {step + 1}")
        compiled_before = len(train_step.table)
        state, dev_metrics = train_step(state, program.place(host_batch))
        step += 1
        side_jobs.on_step(hooks_lib.StepInfo(step, state, host_batch, dev_metrics,
                                             compiled=len(train_step.table) > compiled_before))
        preempted = stop.should_stop(step)
        if preempted and step < stop_at:
          log.warning("preemption/SIGTERM: saving at step %d and exiting", step)
          stopped = "preempted"
          break
      side_jobs.finish(hooks_lib.StepInfo(step, state), stopped)
    except Exception as e:
      lost = peers.loss_cause(e) is not None
      raise
    finally:
      if not lost:  # a process is gone: closing would wait for its part of a pending save, which never comes
        side_jobs.close()
        ckpt.close()
      writer.close()
  result = RunResult(graphdef=program.graphdef, state=state, step=step, start_step=start_step,
                     total_steps=total_steps, stopped=stopped, final_metrics=metrics.last,
                     eval_metrics=evaluation.metrics if evaluation else {}, memory_analysis=train_step.memory,
                     workdir=workdir, checkpoint_dir=ckpt.directory, metrics_file=writer.jsonl_path,
                     tensorboard_dir=writer.tensorboard_dir)
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, "summary.json"), json.dumps(result.json(), indent=2))
  return result


def load_model(workdir: str, step: int | None = None, *, config: ml_collections.ConfigDict | None = None,
               params_only: bool = False, dtype: Any = None):
  """The trained model of a run (latest or given checkpoint step), on the default device; for export and eval.

  `params_only` (export): only the parameters are read, into host memory, cast to `dtype` while read (Orbax partial
  restore); the optimizer moments, 2/3 of a float32 checkpoint, are never read. Without LoRA each parameter is a
  `checkpoint.StreamedLeaf`, read when the exporter takes it (one leaf in memory at a time); a LoRA model's merge
  needs its adapters as arrays. `workdir` may be a storage URI."""
  if config is None:
    config = ml_collections.ConfigDict(storage.read_json(storage.join(workdir, "config.json")))
  ckpt = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"), every=1, keep=config.checkpoint.keep,
                               async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
  if step not in ckpt.all_steps():
    raise FileNotFoundError(f"no checkpoint for step {step} under {ckpt.directory}; have {ckpt.all_steps()}")
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  program = build(config, parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  target = partition.saved(program.target)
  if params_only:
    params, extra = ckpt.restore_params(step, target, dtype, streamed=not partition.lora_enabled(config))
    ckpt.close()
    state = program.with_frozen(target.replace(params=params, extra=extra))
    return nnx.merge(program.graphdef, state.params, state.extra), step
  ckpt.check_compatible(step, target)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  ckpt.close()
  state = program.with_frozen(restored.state)
  return nnx.merge(program.graphdef, state.params, state.extra), step
