"""A process of a 2-process job (gloo, as launch/local_multiprocess.sh joins them) is SIGKILLed: the survivor stops
at once with ONE line naming what was lost and what was kept, exit status cli.EXIT_PEER_LOST, and the rerun resumes
to the parameters of an uninterrupted run bitwise (training) or rebuilds the one-process scored cache byte for byte.
Both the lost peer (process 1) and the lost coordinator (process 0, which hosts jax's coordination service) are
killed; a process whose peer never arrives fails after `distributed.initialization_timeout_s`.

The kill-to-exit times are printed (`pytest -s`), not asserted beyond a generous timeout: bench/peer_loss.py measures
them for bench/RESULTS.md.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import train_common as tc
from conftest import REPO_ROOT, free_port
from conftest import tree_bytes
from score_test import _config, world  # noqa: F401  (world: the scoring fixture, tiny HF models)
from tregjax import cli, score

pytestmark = pytest.mark.filterwarnings("ignore")

TRAIN = {"optimizer.schedule": "constant", "train.steps": 1000, "checkpoint.every": 2}
SURVIVOR_TIMEOUT = 120  # generous: the survivor leaves in about a second (bench/RESULTS.md `## peer loss`)


def start(cmd, logs, num=2, env_extra=None, only=None, plain_xla=False):
  """`cmd` as the processes of one job (only those in `only`, when given), stdout/stderr into files under `logs`.
  plain_xla: XLA's default flags (the pytest process's), not the trainer workers' faster-compiling ones."""
  os.makedirs(logs, exist_ok=True)
  port = free_port()
  procs = {}
  for i in range(num) if only is None else only:
    env = tc.worker_env()
    if plain_xla:
      env.pop("XLA_FLAGS")
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num), JAX_PROCESS_ID=str(i),
               **(env_extra or {}))
    procs[i] = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=open(os.path.join(logs, f"p{i}.out"), "w"),
                                stderr=open(os.path.join(logs, f"p{i}.err"), "w"))
  return procs, port


def read(logs, i, stream="err"):
  with open(os.path.join(logs, f"p{i}.{stream}"), encoding="utf-8") as f:
    return f.read()


def wait_all(procs, logs, timeout=300):
  for i, p in procs.items():
    try:
      p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs.values():
        q.kill()
      raise
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{read(logs, i)[-3000:]}"


def wait_until(procs, logs, ready, timeout=300):
  """Poll `ready()` while every process of the job runs; a process that exits first, or `timeout`, fails the test."""
  t0 = time.time()
  while not ready():
    if any(p.poll() is not None for p in procs.values()) or time.time() - t0 > timeout:
      for p in procs.values():
        p.kill()
      raise AssertionError(f"the job did not get going: {read(logs, 0)[-2000:]}\n{read(logs, 1)[-2000:]}")
    time.sleep(0.02)


def kill_when(procs, logs, victim, ready, timeout=300):
  """SIGKILL process `victim` once `ready()`; returns (the survivor's stderr, exit status, seconds kill -> exit)."""
  wait_until(procs, logs, ready, timeout)
  procs[victim].send_signal(signal.SIGKILL)
  killed = time.time()
  survivor = procs[1 - victim]
  try:
    survivor.wait(timeout=SURVIVOR_TIMEOUT)
  except subprocess.TimeoutExpired:
    survivor.kill()
    raise AssertionError(f"the survivor still ran {SURVIVOR_TIMEOUT} s after its peer was killed")
  procs[victim].wait()
  return read(logs, 1 - victim), survivor.returncode, time.time() - killed


def one_line(stderr: str) -> str:
  """The one error line, last; before it only the command's own log records (no traceback, no native records of
  the distributed runtime, no stack dump)."""
  lines = stderr.strip().splitlines()
  errors = [l for l in lines if ": error: " in l]
  assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line, last:\n{stderr[-3000:]}"
  noise = [l for l in lines[:-1] if re.search(r"Traceback|Fatal|Check failure|^\s+@ 0x|^[WEF]\d{4} |coordination", l)]
  assert not noise, f"more than the one line:\n{stderr[-3000:]}"
  return errors[0]


def complete_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def logged_steps(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    return sum(1 for _ in f)


def kill_training(workdir, logs, victim, more_steps=4):
  """Start (or resume) 2 training processes, SIGKILL `victim` once `more_steps` more steps are logged; check the
  survivor's line; returns (the kept checkpoint step, seconds kill -> exit)."""
  before = logged_steps(workdir)
  procs, port = start(tc.worker_cmd(workdir, **TRAIN), logs)
  err, rc, seconds = kill_when(procs, logs, victim, lambda: logged_steps(workdir) >= before + more_steps)
  line = one_line(err)
  kept = complete_steps(workdir)[-1]
  assert rc == cli.EXIT_PEER_LOST, err
  lost = f"process 0 (the coordinator at 127.0.0.1:{port})" if victim == 0 else "process 1"
  assert line.startswith(f"tregjax.train: error: lost {lost}") and "of this 2-process job" in line, line
  assert line.endswith(f"kept: checkpoint step {kept} in {os.path.join(workdir, 'checkpoints')} (rerun the same "
                       "command on every process to resume from it)"), line
  return kept, seconds


def test_training_survivor_of_a_lost_peer_and_of_a_lost_coordinator_stops_at_once_and_resume_is_bitwise(tmp_path):
  """Run 1 loses process 1, its resume loses process 0 (the coordinator); run 3 resumes to `target`, and equals an
  uninterrupted 2-process run to the same step bitwise (CPU, same reduction order)."""
  workdir = str(tmp_path / "run")
  first, t1 = kill_training(workdir, str(tmp_path / "logs1"), victim=1)
  second, t0 = kill_training(workdir, str(tmp_path / "logs2"), victim=0)
  print(f"\ntraining: kill process 1 -> survivor exit {t1:.1f} s; kill process 0 -> survivor exit {t0:.1f} s")
  assert first >= 2 and second > first
  target = second + 2
  procs, _ = start(tc.worker_cmd(workdir, **TRAIN, max_steps=target), str(tmp_path / "logs3"))
  wait_all(procs, str(tmp_path / "logs3"))
  resumed = tc.parse_summary(read(str(tmp_path / "logs3"), 0, "out"))
  assert (resumed["start_step"], resumed["step"]) == (second, target)

  straight = str(tmp_path / "straight")
  procs, _ = start(tc.worker_cmd(straight, **TRAIN, max_steps=target), str(tmp_path / "logs_straight"))
  wait_all(procs, str(tmp_path / "logs_straight"))
  tc.assert_params_bitwise_equal(os.path.join(workdir, f"params_{target}.npz"),
                                 os.path.join(straight, f"params_{target}.npz"))


def _process_tree(pid: int) -> list[int]:
  """`pid` (a process's supervisor, tregjax.peers) and its children: the job's process itself."""
  kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
  return [pid] + [int(k) for k in kids]


def hang_training(workdir, logs, victim, heartbeat_s=5):
  """Start 2 training processes with `distributed.heartbeat_timeout_s=heartbeat_s`; once 2 steps are logged, SIGSTOP
  process `victim` (a stuck host: its sockets stay open, so no collective fails); check the survivor's line; returns
  (the kept checkpoint step, seconds stop -> survivor exit)."""
  # Synchronous saves: the stop never lands in a background commit (orbax's commit thread, blocked on the stuck
  # peer, would print its own traceback before the heartbeat timeout ends the survivor; needs work in tregjax.peers).
  overrides = {**TRAIN, "distributed.heartbeat_timeout_s": heartbeat_s, "checkpoint.async_save": False}
  procs, port = start(tc.worker_cmd(workdir, **overrides), logs)
  wait_until(procs, logs, lambda: logged_steps(workdir) >= 3 and bool(complete_steps(workdir)))
  stuck = _process_tree(procs[victim].pid)
  for pid in stuck:
    os.kill(pid, signal.SIGSTOP)
  stopped = time.time()
  survivor = procs[1 - victim]
  try:
    survivor.wait(timeout=SURVIVOR_TIMEOUT)
  except subprocess.TimeoutExpired:
    survivor.kill()
    raise AssertionError(f"the survivor still ran {SURVIVOR_TIMEOUT} s after its peer stopped")
  finally:
    for pid in stuck:
      os.kill(pid, signal.SIGKILL)
    procs[victim].wait()
  seconds = time.time() - stopped
  err = read(logs, 1 - victim)
  line = one_line(err)
  assert survivor.returncode == cli.EXIT_PEER_LOST, err
  lost = f"process 0 (the coordinator at 127.0.0.1:{port})" if victim == 0 else "process 1"
  assert line.startswith(f"tregjax.train: error: lost {lost} of this 2-process job ("), line
  assert "Check failure" not in line and "@ 0x" not in line, line
  m = re.search(r"kept: checkpoint step (\d+) in (\S+) \(rerun the same command on every process to resume from it\)$",
                line)
  assert m and m.group(2) == os.path.join(workdir, "checkpoints"), line
  kept = int(m.group(1))
  assert kept in complete_steps(workdir), (kept, complete_steps(workdir))
  return kept, seconds


def test_a_peer_that_hangs_without_failing_a_collective_is_lost_after_the_heartbeat_timeout(tmp_path):
  """SIGSTOP process 1, then, in a second job, process 0 (the coordinator). The survivor's jax client ends it after
  `distributed.heartbeat_timeout_s`; its supervisor turns that into the one line (no native stack dump in it),
  EXIT_PEER_LOST, naming the stopped process and the kept checkpoint."""
  seconds = [hang_training(str(tmp_path / f"run{v}"), str(tmp_path / f"logs{v}"), victim=v)[1] for v in (1, 0)]
  print(f"\nhang (heartbeat timeout 5 s): stop process 1 -> survivor exit {seconds[0]:.1f} s; stop process 0 -> "
        f"{seconds[1]:.1f} s")


def test_a_peer_that_never_arrives_fails_after_the_initialization_timeout_naming_the_coordinator(tmp_path):
  """Process 0 alone waits for process 1; process 1 alone finds no coordinator. Both: one line, EXIT_PEER_LOST."""
  cmd = tc.worker_cmd(str(tmp_path / "run"), **{"distributed.initialization_timeout_s": 2})
  alone = {}
  for i in (0, 1):  # two jobs of 2 processes, one process started of each (at the same time: one wait)
    alone[i] = start(cmd, str(tmp_path / f"logs{i}"), only=[i])
  for i, (procs, port) in alone.items():
    procs[i].wait(timeout=SURVIVOR_TIMEOUT)
    err = read(str(tmp_path / f"logs{i}"), i)
    line = one_line(err)
    assert procs[i].returncode == cli.EXIT_PEER_LOST, err
    missing = "1 of 2 processes missing (process 1)" if i == 0 else "process 0 (the coordinator: nothing listens"
    assert line.startswith(f"tregjax.train: error: the 2 processes of this job did not all join coordinator "
                           f"127.0.0.1:{port} within distributed.initialization_timeout_s=2: {missing}"), line
  assert not os.path.exists(str(tmp_path / "run" / "checkpoints"))


def score_config_file(world, tmp_path, cache):  # noqa: F811
  """A score config file for `world`'s job writing into `cache` (bench/peer_loss.py times the same job)."""
  path = tmp_path / f"{os.path.basename(cache)}.py"
  path.write_text(textwrap.dedent(f"""
      import sys, pathlib
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import score_test
      def get_config():
        return score_test._config(dict(root=pathlib.Path({str(world['root'])!r})), {str(cache)!r}, source="none",
                                  shard_size=1)
      """))
  return str(path)


def _work_shards(cache):
  work = os.path.join(cache, "work")
  return sorted(n for n in os.listdir(work) if re.fullmatch(r"train-\d{5}\.safetensors", n)) if os.path.isdir(
      work) else []


def kill_scoring(config_file, cache, logs, victim):
  procs, port = start([sys.executable, "-m", "tregjax.score", f"--config={config_file}"], logs, plain_xla=True)
  before = len(_work_shards(cache))
  err, rc, seconds = kill_when(procs, logs, victim, lambda: len(_work_shards(cache)) > before)
  line = one_line(err)
  assert rc == cli.EXIT_PEER_LOST, err
  lost = f"process 0 (the coordinator at 127.0.0.1:{port})" if victim == 0 else "process 1"
  assert line.startswith(f"tregjax.score: error: lost {lost}") and "of this 2-process job" in line, line
  done = len(_work_shards(cache))
  want = f"kept: {done} of 6 work shards complete in {os.path.join(cache, 'work')}"
  assert want in line, line
  return done, seconds


def test_scoring_survivor_stops_at_once_and_the_rerun_writes_the_bytes_of_one_process(world, tmp_path):  # noqa: F811
  """Run 1 loses process 1, run 2 loses the coordinator, run 3 completes: the cache equals one process's bytes."""
  cache = str(tmp_path / "two")
  config_file = score_config_file(world, tmp_path, cache)
  d1, t1 = kill_scoring(config_file, cache, str(tmp_path / "logs1"), victim=1)
  d0, t0 = kill_scoring(config_file, cache, str(tmp_path / "logs2"), victim=0)
  print(f"\nscoring: kill process 1 -> survivor exit {t1:.1f} s; kill process 0 -> survivor exit {t0:.1f} s "
        f"({d1}, then {d0} of 6 shards kept)")
  assert 1 <= d1 <= d0 <= 6
  procs, _ = start([sys.executable, "-m", "tregjax.score", f"--config={config_file}"], str(tmp_path / "logs3"),
                   plain_xla=True)
  wait_all(procs, str(tmp_path / "logs3"))
  one = score.run(_config(world, tmp_path / "one", source="none", shard_size=1))
  a, b = tree_bytes(cache), tree_bytes(one)
  assert sorted(a) == sorted(b)
  assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


@pytest.mark.parametrize("where", ["logged", "raised"])
def test_a_background_thread_meeting_the_loss_first_gives_the_same_one_line(tmp_path, where):
  """Orbax's async-save thread logs a failed save barrier with its traceback (logging.error(exc_info=True)); a plain
  thread raises. Either way the command prints the one lost-peer line and exits 9, no traceback before it."""
  script = textwrap.dedent(f"""
    import threading
    from absl import logging
    from tregjax import cli, peers
    cli.install_command_hooks("python -m tregjax.train")
    peers.joined("127.0.0.1:1", 2, 0)
    def save():
      try:
        raise RuntimeError("Gloo all-reduce failed: [127.0.0.1]:4242: Connection reset by peer")
      except RuntimeError:
        if {where!r} == "raised":
          raise
        logging.error("Failed to run 1 Handler Commit operations in background save thread", exc_info=True)
    t = threading.Thread(target=save)
    t.start()
    t.join()
    print("not reached")
  """)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES"))}
  out = subprocess.run([sys.executable, "-c", script], env=dict(env, PYTHONPATH=REPO_ROOT), capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, check=False)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == cli.EXIT_PEER_LOST and "not reached" not in out.stdout, out.stderr
  assert len(lines) == 1 and lines[0].startswith("tregjax.train: error: lost process 1 of this 2-process job"), lines
