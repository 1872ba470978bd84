"""Fault tolerance: SIGKILL + resume is bitwise exact, SIGTERM saves and exits 0, a torn save is ignored.

Each run is a subprocess (tests/train_common.py worker) sharing a persistent compilation cache. The LR schedule is
constant after a 1-step warmup, so a run configured for 1000 steps and one configured for N steps take identical
steps up to N: the golden for a killed-and-resumed run is a straight run of the same length.
"""

import os
import shutil
import signal
import subprocess
import time

import pytest

import train_common as tc

pytestmark = pytest.mark.filterwarnings("ignore")

COMMON = {"optimizer.schedule": "constant", "checkpoint.every": 2, "checkpoint.async_save": True}


@pytest.fixture(scope="module")
def cache_dir():
  return tc.shared_cache_dir()


def _run(workdir, cache_dir, timeout=300, **overrides):
  proc = subprocess.run(tc.worker_cmd(workdir, **{**COMMON, **overrides}), env=tc.worker_env(cache_dir),
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return tc.parse_summary(proc.stdout)


def _start(workdir, cache_dir, **overrides):
  return subprocess.Popen(tc.worker_cmd(workdir, **{**COMMON, **overrides}), env=tc.worker_env(cache_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=240):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for the worker")
    time.sleep(0.02)


def _complete_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_sigkill_then_resume_gives_bitwise_identical_params_and_data_order(tmp_path, cache_dir):
  killed = str(tmp_path / "killed")
  proc = _start(killed, cache_dir, **{"train.steps": 1000})
  _wait_for(lambda: any(s >= 4 for s in _complete_steps(killed)), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resumed_from = max(_complete_steps(killed))
  total = resumed_from + 3  # an odd number of steps past the checkpoint: the final save is a forced one

  resumed = _run(killed, cache_dir, **{"train.steps": total})
  assert resumed["start_step"] == resumed_from and resumed["step"] == total
  straight_dir = str(tmp_path / "straight")
  straight = _run(straight_dir, cache_dir, **{"train.steps": total})
  assert straight["start_step"] == 0 and straight["step"] == total

  tc.assert_params_bitwise_equal(os.path.join(killed, f"params_{total}.npz"),
                                 os.path.join(straight_dir, f"params_{total}.npz"))
  fa, fb = tc.metrics_by_step(killed), tc.metrics_by_step(straight_dir)
  assert sorted(fb) == list(range(1, total + 1))
  assert [fa[s]["data/fingerprint"] for s in range(1, total + 1)] == [fb[s]["data/fingerprint"]
                                                                      for s in range(1, total + 1)]
  assert [fa[s]["loss/total"] for s in range(1, total + 1)] == [fb[s]["loss/total"] for s in range(1, total + 1)]


def test_sigterm_saves_at_step_boundary_exits_zero_and_resume_continues(tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  proc = _start(workdir, cache_dir, **{"train.steps": 1000, "checkpoint.every": 1000})
  metrics = os.path.join(workdir, "metrics.jsonl")
  _wait_for(lambda: os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  summary = tc.parse_summary(out)
  assert summary["stopped"] == "preempted"
  stopped_at = summary["step"]
  assert 3 <= stopped_at < 1000
  assert _complete_steps(workdir) == [stopped_at]  # every=1000: this checkpoint exists only because of SIGTERM

  resumed = _run(workdir, cache_dir, **{"train.steps": stopped_at + 2})
  assert resumed["start_step"] == stopped_at and resumed["step"] == stopped_at + 2
  assert resumed["stopped"] == "completed"


def test_torn_save_is_ignored_and_previous_checkpoint_resumes(tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  _run(workdir, cache_dir, **{"train.steps": 4})
  ckpts = os.path.join(workdir, "checkpoints")
  # What a process killed mid-save leaves: orbax's temporary directory for step 6, half written.
  torn = os.path.join(ckpts, "6.orbax-checkpoint-tmp-1234567")
  shutil.copytree(os.path.join(ckpts, "4"), torn)
  for root, _, files in os.walk(torn):
    for name in files[: len(files) // 2]:
      os.remove(os.path.join(root, name))
  resumed = _run(workdir, cache_dir, **{"train.steps": 6})
  assert resumed["start_step"] == 4 and resumed["step"] == 6
  assert 6 in _complete_steps(workdir)


def test_checkpoint_of_another_model_shape_is_refused_by_name(tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  _run(workdir, cache_dir, **{"train.steps": 2})
  proc = subprocess.run(
      tc.worker_cmd(workdir, **{**COMMON, "train.steps": 4, "model.overrides.intermediate_size": 96}),
      env=tc.worker_env(cache_dir), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "CheckpointMismatchError" in proc.stderr
  assert "mlp/down_proj" in proc.stderr and "[2, 64, 32]" in proc.stderr and "[2, 96, 32]" in proc.stderr


def test_run_stops_with_clear_message_after_n_consecutive_nonfinite_steps(tmp_path, cache_dir):
  proc = subprocess.run(
      tc.worker_cmd(str(tmp_path / "run"), **{**COMMON, "train.steps": 6, "train.max_consecutive_nonfinite": 2,
                                              "nan_refs": 1}),
      env=tc.worker_env(cache_dir), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "NonFiniteError: step 2: 2 consecutive steps had a non-finite loss or gradient" in proc.stderr
