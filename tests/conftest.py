"""Shared pytest settings: CPU only, deterministic, and a helper to run code on N fake CPU devices."""

import os
import subprocess
import sys
import textwrap

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(code: str, num_devices: int, timeout: int = 600) -> str:
  """Run `code` in a fresh interpreter with `num_devices` fake CPU devices (XLA reads the flag only at start-up)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                        timeout=timeout, cwd=REPO_ROOT)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
  return proc.stdout


@pytest.fixture
def devices_runner():
  return run_with_devices


def tree_bytes(root) -> dict[str, bytes]:
  """{path relative to `root`: bytes} of every file under `root`: two output trees compared byte for byte."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(args: list[str], num_processes: int, timeout: int = 600) -> list[subprocess.CompletedProcess]:
  """`python *args` as `num_processes` processes of one job on this machine (one CPU device each, gloo collectives),
  joined as launch/local_multiprocess.sh joins them: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID."""
  import tempfile  # pylint: disable=g-import-not-at-top
  port = free_port()
  procs, logs = [], []
  for i in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i),
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    logs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))  # files, not pipes: a full pipe blocks
    procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=logs[-1][0],
                                  stderr=logs[-1][1], text=True))
  out = []
  try:
    for p, (stdout, stderr) in zip(procs, logs):
      p.wait(timeout=timeout)
      stdout.seek(0)
      stderr.seek(0)
      out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout.read(), stderr.read()))
  finally:
    for p, files in zip(procs, logs):
      if p.poll() is None:
        p.kill()
      for f in files:
        f.close()
  return out
