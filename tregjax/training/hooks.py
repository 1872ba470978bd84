"""The training loop's side jobs as hooks: metrics, progress bar, checkpoints, evaluation (as Levanter's trainer).

The loop (`trainer.run`) only steps and decides when to stop; after each step it hands a `StepInfo` to `Hooks`, which
calls every hook whose `every` divides the step, in the order they were given; once after the loop (not on an error)
each hook's `finish` runs, and `close` always. A new side job is one `Hook` subclass (or `Every(n, fn)`) passed to
`run(..., hooks=[...])`, not another branch in the loop.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from tregjax import config_schema, errors
from tregjax.training import checkpoint as ckpt_lib
from tregjax.training import metrics as metrics_lib
from tregjax.training import partition


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """The step just done: `step` counts completed steps (the first is 1), `state` the TrainState after it, `batch` the
  process-local numpy batch it took, `metrics` its device metrics (not yet read back), `compiled` whether it compiled.
  After the loop (`Hook.finish`) only `step` and `state` are set."""
  step: int
  state: Any
  batch: Any = None
  metrics: dict[str, jax.Array] | None = None
  compiled: bool = False


class Hook:
  """A side job of the loop: `on_step` after every `every`-th step (never when `every` is 0 or None), `finish` once
  after the last step with how the run stopped ("completed" | "preempted" | "data_exhausted"), `close` always."""
  every: int | None = 1

  def on_step(self, info: StepInfo) -> None:
    pass

  def finish(self, info: StepInfo, stopped: str) -> None:
    pass

  def close(self) -> None:
    pass


class Every(Hook):
  """`fn(info)` every `n` steps: Levanter's `add_hook(fn, every=n)`."""

  def __init__(self, n: int, fn: Callable[[StepInfo], None]):
    self.every, self.fn = n, fn

  def on_step(self, info: StepInfo) -> None:
    self.fn(info)


class Hooks:
  """Runs hooks in order; a hook whose `every` is 0 or None runs only its `finish`."""

  def __init__(self, hooks: Sequence[Hook]):
    self.hooks = list(hooks)

  def on_step(self, info: StepInfo) -> None:
    for h in self.hooks:
      if h.every and info.step % h.every == 0:
        h.on_step(info)

  def finish(self, info: StepInfo, stopped: str) -> None:
    for h in self.hooks:
      h.finish(info, stopped)

  def close(self) -> None:
    for h in self.hooks:
      h.close()


def _fingerprint(batch: Any) -> int:
  """crc32 of this process's chosen tokens: lets a test check that a resumed run reads the same data order."""
  return zlib.crc32(np.ascontiguousarray(np.asarray(batch.chosen.tokens)).tobytes())


def _tokens(batch: Any, objective: str) -> tuple[int, int]:
  """(real tokens, padded positions) this process feeds the model in one step (all micro-batches)."""
  sides = [batch.chosen] if objective == "sft" else [batch.chosen, batch.rejected]
  real = sum(int(np.count_nonzero(np.asarray(s.segment_ids))) for s in sides)
  padded = sum(int(np.size(np.asarray(s.tokens))) for s in sides)
  return real, padded


class _Throughput:
  """Tokens/s and MFU over the steps since the last report; windows that include a compilation are dropped."""

  def __init__(self, model_cfg, peak_flops: float | None):
    self.model_cfg, self.peak = model_cfg, peak_flops
    self.reset()

  def reset(self) -> None:
    self.t0, self.real, self.padded, self.seq = time.perf_counter(), 0, 0, 1

  def add(self, real: int, padded: int, seq: int) -> None:
    n = jax.process_count()  # every process feeds the same number of rows
    self.real += real * n
    self.padded += padded * n
    self.seq = seq

  def report(self) -> dict[str, float]:
    dt = max(time.perf_counter() - self.t0, 1e-9)
    out = {"throughput/tokens_per_s": self.real / dt, "throughput/padded_tokens_per_s": self.padded / dt}
    if self.peak:  # MFU over padded positions: the model computes them all (formula: metrics.train_flops_per_token)
      flops = metrics_lib.train_flops_per_token(self.model_cfg, self.seq) * self.padded
      out["throughput/mfu"] = flops / dt / (self.peak * jax.device_count())
    self.reset()
    return out


class MetricsHook(Hook):
  """Step metrics to the writer every `log_every` steps and at `stop_at`, with throughput / MFU and the data
  fingerprint; raises NonFiniteError after `max_nonfinite` consecutive non-finite steps.

  A step's device metrics are read back one step later, so the host never stalls the device pipeline; `finish` reads
  the last one. `last` is the latest step's record (the run's final_metrics).
  """

  def __init__(self, writer: metrics_lib.MetricsWriter, *, objective: str, log_every: int, stop_at: int,
               max_nonfinite: int, model_cfg, peak_flops: float | None):
    self.writer, self.objective, self.log_every, self.stop_at = writer, objective, log_every, stop_at
    self.max_nonfinite = max_nonfinite
    self.throughput = _Throughput(model_cfg, peak_flops)
    self.last: dict[str, float] = {}
    self._pending = None

  def on_step(self, info: StepInfo) -> None:
    real, padded = _tokens(info.batch, self.objective)
    seq_len = int(np.shape(info.batch.chosen.tokens)[1])
    extra_host = {"data/fingerprint": float(_fingerprint(info.batch)), "data/seq_len": float(seq_len)}
    if info.compiled:  # this step compiled: time from its end
      jax.block_until_ready(info.metrics)
      self.throughput.reset()
    else:
      self.throughput.add(real, padded, seq_len)
    if self._due(info.step):
      jax.block_until_ready(info.metrics)
      extra_host.update(self.throughput.report())
    self._flush()
    self._pending = (info.step, info.metrics, extra_host)

  def finish(self, info: StepInfo, stopped: str) -> None:
    self._flush()

  def _due(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.stop_at

  def _flush(self) -> None:
    """Read back the pending step's metrics, check them, write them when due."""
    if self._pending is None:
      return
    step, dev, extra_host = self._pending
    self._pending = None
    out = {k: float(v) for k, v in jax.device_get(dev).items()}
    out.update(extra_host)
    if out["optim/nonfinite_run"] >= self.max_nonfinite:
      raise NonFiniteError(
          f"step {step}: {int(out['optim/nonfinite_run'])} consecutive steps had a non-finite loss or gradient "
          f"(loss/total={out.get('loss/total')}, grad_norm={out.get('optim/grad_norm')}); updates were skipped. "
          "Lower optimizer.lr, check the data (ref log-probs / token rewards) or raise train.max_consecutive_nonfinite")
    self.last = out
    if self._due(step):
      self.writer.write(step, out)


class ProgressHook(Hook):
  """A tqdm bar (process 0) showing the latest loss the metrics hook has read back."""

  def __init__(self, total: int, initial: int, metrics: MetricsHook):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self.metrics = metrics
    self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

  def _postfix(self) -> None:
    if self.metrics.last:
      self.bar.set_postfix(loss=f"{self.metrics.last['loss/total']:.4f}", refresh=False)

  def on_step(self, info: StepInfo) -> None:
    self._postfix()
    self.bar.update(1)

  def finish(self, info: StepInfo, stopped: str) -> None:
    self._postfix()

  def close(self) -> None:
    self.bar.close()


class CheckpointHook(Hook):
  """Saves what trains (`partition.saved`), the data-iterator states and `meta` every `ckpt.every` steps, and once
  more at the end unless the last step is saved already. Every process must run it (the save is collective)."""

  def __init__(self, ckpt: ckpt_lib.Checkpointer, train_iter, meta: dict, start_step: int):
    self.ckpt, self.train_iter, self.meta, self.start_step = ckpt, train_iter, meta, start_step
    self.every = ckpt.every

  def _save(self, info: StepInfo, force: bool) -> None:
    self.ckpt.save(info.step, partition.saved(info.state), self.train_iter.get_state(), self.meta, force=force)

  def on_step(self, info: StepInfo) -> None:
    self._save(info, force=False)

  def finish(self, info: StepInfo, stopped: str) -> None:
    if info.step > self.start_step and self.ckpt.latest_step() != info.step:
      self._save(info, force=True)


class EvalHook(Hook):
  """`evaluate(state)` → the writer every `every` steps (0: never during the loop), and at the end of a run that was
  not preempted unless this step was just evaluated. `metrics` is the latest result (the run's eval_metrics)."""

  def __init__(self, evaluate: Callable[[Any], dict[str, float]], writer: metrics_lib.MetricsWriter, every: int):
    self.evaluate, self.writer, self.every = evaluate, writer, every
    self.metrics: dict[str, float] = {}
    self._step: int | None = None

  def on_step(self, info: StepInfo) -> None:
    self.metrics, self._step = self.evaluate(info.state), info.step
    self.writer.write(info.step, self.metrics)

  def finish(self, info: StepInfo, stopped: str) -> None:
    if stopped != "preempted" and info.step > 0 and self._step != info.step:
      self.on_step(info)


class WandbHook(Hook):
  """Weights & Biases, as TRL's `report_to="wandb"` and Levanter's tracker: every scalar the writer writes (train and
  eval, at their steps), the run's config at start and a summary at the end (`stopped`, the last step). Process 0 only
  (the writer writes nothing elsewhere). The run id is a hash of the workdir, so a resumed run continues its W&B run.
  `WANDB_MODE=offline` keeps everything in <workdir>/wandb (`wandb sync` uploads it later)."""
  every = None  # fed by the writer, not by the loop

  def __init__(self, writer: metrics_lib.MetricsWriter, config: Any, workdir: str):
    import hashlib  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    wandb = import_wandb()
    w = config.logging.wandb
    workdir = os.path.abspath(workdir)
    self.run = wandb.init(project=w.project, name=w.name or os.path.basename(workdir), tags=list(w.tags) or None,
                          entity=w.entity or None, dir=workdir, config=config.to_dict(), resume="allow",
                          id="tregjax-" + hashlib.sha256(workdir.encode()).hexdigest()[:16])
    writer.listeners.append(self.log)

  def log(self, step: int, scalars: dict[str, float]) -> None:
    self.run.log(scalars, step=step)

  def finish(self, info: StepInfo, stopped: str) -> None:
    self.run.summary.update({"stopped": stopped, "step": info.step})

  def close(self) -> None:
    self.run.finish()


def import_wandb():
  """wandb, or a ConfigError naming the extra that installs it (it is not in requirements.txt)."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.ConfigError(config_schema.WANDB_MISSING) from e
  return wandb


__all__ = ["CheckpointHook", "EvalHook", "Every", "Hook", "Hooks", "MetricsHook", "NonFiniteError", "ProgressHook",
           "StepInfo", "WandbHook"]
