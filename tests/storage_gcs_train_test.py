"""Training with the workdir on gs:// (a real GCS JSON-API server on 127.0.0.1, tests/gcs_emulator.py): SIGKILL and
resume give the parameters of an uninterrupted run bitwise; a kill during an async save leaves a step that is skipped;
every connect() of the workers (strace: Python and tensorstore's C++ alike) stays on the loopback.

The golden is an uninterrupted run with a local workdir: storage must not change a single bit of training.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import gcs_emulator  # noqa: E402
from gcs_emulator import emulator  # noqa: F401  (the module's emulator fixture)
import train_common as tc  # noqa: E402

from tregjax import storage  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

COMMON = {"optimizer.schedule": "constant", "checkpoint.every": 2, "checkpoint.async_save": True}


@pytest.fixture(scope="module")
def cache_dir():
  return tc.shared_cache_dir()


def _env(emulator, cache_dir):
  env = tc.worker_env(cache_dir)
  env.update(emulator.env())
  return env


def _start(workdir, logs, name, emulator, cache_dir, **overrides):
  """A worker under strace (its connect() log: `logs/name.strace`)."""
  out = open(os.path.join(logs, f"{name}.out"), "w", encoding="utf-8")  # files, not pipes: a full pipe blocks
  err = open(os.path.join(logs, f"{name}.err"), "w", encoding="utf-8")
  cmd = gcs_emulator.strace_prefix(os.path.join(logs, f"{name}.strace")) + tc.worker_cmd(
      workdir, **{**COMMON, "params_dir": logs, **overrides})
  return subprocess.Popen(cmd, env=_env(emulator, cache_dir), stdout=out, stderr=err)


def _finish(proc, logs, name, timeout=300):
  proc.wait(timeout=timeout)
  with open(os.path.join(logs, f"{name}.err"), encoding="utf-8") as f:
    err = f.read()
  assert proc.returncode == 0, err[-4000:]
  assert gcs_emulator.off_loopback(os.path.join(logs, f"{name}.strace")) == []
  with open(os.path.join(logs, f"{name}.out"), encoding="utf-8") as f:
    return tc.parse_summary(f.read()), err


def _worker_pid(strace_proc) -> int:
  """The traced worker (strace's child), which the test kills itself: killing strace would only detach it."""
  t0 = time.time()
  while time.time() - t0 < 30:
    path = f"/proc/{strace_proc.pid}/task/{strace_proc.pid}/children"
    children = open(path, encoding="ascii").read().split() if os.path.exists(path) else []
    if children:
      return int(children[0])
    time.sleep(0.05)
  raise AssertionError("strace started no worker")


def _steps(ckpts):
  """(committed, uncommitted) step numbers under a gs:// checkpoint directory: on GCS Orbax marks a finished step
  with commit_success.txt (there is no rename)."""
  if not storage.exists(ckpts):
    return [], []
  steps = [int(n) for n in storage.listdir(ckpts) if n.isdigit()]
  done = [s for s in steps if storage.exists(storage.join(ckpts, str(s), "commit_success.txt"))]
  return sorted(done), sorted(set(steps) - set(done))


def _wait(predicate, proc, logs, name, timeout=240):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      with open(os.path.join(logs, f"{name}.err"), encoding="utf-8") as f:
        raise AssertionError(f"worker exited early ({proc.returncode}): {f.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for the worker")
    time.sleep(0.05)


def test_sigkill_then_resume_on_gcs_equals_an_uninterrupted_local_run_bitwise(tmp_path, emulator, cache_dir):
  workdir = f"gs://{gcs_emulator.BUCKET}/killed"
  ckpts = workdir + "/checkpoints"
  logs = str(tmp_path)
  with gcs_emulator.client_environment(emulator):
    proc = _start(workdir, logs, "killed", emulator, cache_dir, **{"train.steps": 1000})
    _wait(lambda: any(s >= 4 for s in _steps(ckpts)[0]), proc, logs, "killed")
    os.kill(_worker_pid(proc), signal.SIGKILL)
    proc.wait(timeout=60)
    assert gcs_emulator.off_loopback(os.path.join(logs, "killed.strace")) == []
    resumed_from = max(_steps(ckpts)[0])
    total = resumed_from + 3  # an odd number of steps past the checkpoint: the final save is a forced one

    resumed, _ = _finish(_start(workdir, logs, "resumed", emulator, cache_dir, **{"train.steps": total}), logs,
                         "resumed")
    assert resumed["start_step"] == resumed_from and resumed["step"] == total
    assert total in _steps(ckpts)[0]
    metrics = [__import__("json").loads(line) for line in storage.read_text(workdir + "/metrics.jsonl").splitlines()]
    assert storage.exists(workdir + "/summary.json") and storage.exists(workdir + "/config.json")
  assert not os.path.exists("gs:")  # nothing landed in a local ./gs:/ directory

  straight_dir = str(tmp_path / "straight")
  straight = subprocess.run(tc.worker_cmd(straight_dir, **{**COMMON, "train.steps": total}),
                            env=tc.worker_env(cache_dir), capture_output=True, text=True, timeout=300)
  assert straight.returncode == 0, straight.stderr[-3000:]
  tc.assert_params_bitwise_equal(os.path.join(logs, f"params_{total}.npz"),
                                 os.path.join(straight_dir, f"params_{total}.npz"))
  by_step = {m["step"]: m for m in metrics if "loss/total" in m}
  golden = tc.metrics_by_step(straight_dir)
  assert sorted(by_step) == list(range(1, total + 1))  # one line per step: the killed run's extra lines dropped
  assert [by_step[s]["loss/total"] for s in by_step] == [golden[s]["loss/total"] for s in by_step]


def test_a_kill_during_an_async_save_on_gcs_leaves_a_step_that_is_skipped(tmp_path, emulator, cache_dir):
  workdir = f"gs://{gcs_emulator.BUCKET}/torn"
  ckpts = workdir + "/checkpoints"
  logs = str(tmp_path)
  with gcs_emulator.client_environment(emulator):
    proc = _start(workdir, logs, "torn", emulator, cache_dir, **{"train.steps": 1000, "checkpoint.every": 1})
    _wait(lambda: len(_steps(ckpts)[0]) >= 2 and _steps(ckpts)[1], proc, logs, "torn")  # a save in flight
    os.kill(_worker_pid(proc), signal.SIGKILL)
    proc.wait(timeout=60)
    committed, torn = _steps(ckpts)
    assert torn, "the kill landed between two saves"
    last = max(committed)
    resumed, err = _finish(_start(workdir, logs, "resumed", emulator, cache_dir,
                                  **{"train.steps": max(torn) + 2, "checkpoint.every": 1}), logs, "resumed")
    assert resumed["start_step"] == last  # the torn step was not restored
    assert f"skipping step {max(torn)} under {ckpts}" in err  # and the run says so
    assert resumed["step"] == max(torn) + 2 and max(torn) in _steps(ckpts)[0]  # the step is written again, whole
