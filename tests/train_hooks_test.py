"""The trainer's shape: side jobs are hooks with an `every`, `run` returns a RunResult whose JSON part is
summary.json, and `build` gives the program the loop runs (the benches' step is the run's step)."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import train_common as tc
from tregjax import parallel
from tregjax import training
from tregjax.training import hooks as hooks_lib
from tregjax.training import trainer

pytestmark = pytest.mark.filterwarnings("ignore")


class _Recorder(hooks_lib.Hook):
  every = 2

  def __init__(self):
    self.steps, self.finished = [], None

  def on_step(self, info):
    self.steps.append(info.step)

  def finish(self, info, stopped):
    self.finished = (info.step, stopped)


def test_hooks_run_every_n_steps_then_finish_once_in_order():
  calls = []
  rec = _Recorder()
  every3 = hooks_lib.Every(3, lambda info: calls.append(("every3", info.step)))
  off = hooks_lib.Every(0, lambda info: calls.append(("off", info.step)))
  hooks = hooks_lib.Hooks([rec, every3, off])
  for s in range(1, 7):
    hooks.on_step(hooks_lib.StepInfo(s, state=None))
  hooks.finish(hooks_lib.StepInfo(6, state=None), "completed")
  assert rec.steps == [2, 4, 6] and rec.finished == (6, "completed")
  assert calls == [("every3", 3), ("every3", 6)]


def test_run_calls_user_hooks_and_returns_what_summary_json_holds(tmp_path):
  rec = _Recorder()
  workdir = str(tmp_path / "run")
  result = training.run(tc.tiny_config(), workdir, data_factory=tc.array_data, hooks=[rec])
  assert rec.steps == [2, 4] and rec.finished == (5, "completed")
  assert (result.start_step, result.step, result.stopped) == (0, 5, "completed")
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    assert json.load(f) == json.loads(json.dumps(result.json()))
  assert {"state", "graphdef"}.isdisjoint(result.json())
  for a, b in zip(jax.tree.leaves(nnx.state(result.model(), nnx.Param)), jax.tree.leaves(result.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_build_gives_the_step_the_run_takes(tmp_path):
  """One step of `build`'s program from `init()` equals the first step a run records."""
  config = tc.tiny_config(**{"train.steps": 1})
  program = trainer.build(config, parallel.make_mesh(1, 1, 1), total_steps=1)
  batch = next(tc.array_data(config, config.data.train_split, 0, 1))
  with parallel.use_mesh(program.mesh):
    state, metrics = program.train_step(program.init(), program.place(batch))
  result = training.run(config, str(tmp_path / "run"), data_factory=tc.array_data)
  assert float(metrics["loss/total"]) == result.final_metrics["loss/total"]
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(result.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("device_kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12), ("cpu", None)])
def test_peak_flops_by_device_kind_from_the_datasheets(device_kind, peak):
  """Dense bf16 datasheet peaks; a device kind containing another's name (L40S contains L4) gets its own."""
  from tregjax.training import metrics  # pylint: disable=import-outside-toplevel
  assert metrics.peak_flops_per_device(device_kind) == peak
