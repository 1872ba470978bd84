"""When a process of a multi-process job is lost: one line naming what was lost and what was kept, a distinct exit
status (`cli.EXIT_PEER_LOST`) within seconds, no wait on a barrier that cannot complete, no native stack dump.

A lost peer shows in one of two ways, and both are the same error here:
  - in Python, at this process's next collective or barrier: gloo's "Gloo all-reduce failed ... Connection reset by
    peer", NCCL's remote errors, a coordination-service or barrier error (`loss_cause` recognises them). The command's
    `cli.report_errors` prints the line and leaves with os._exit: jax.distributed's shutdown barrier (run at exit)
    would wait for the lost process until the heartbeat timeout and then abort the process.
  - in jax's native client, with no Python frame to catch it: the coordinator (process 0) gone, a heartbeat timeout,
    a join that timed out. The client ends the process from a background thread (LOG(FATAL): a native stack dump,
    SIGABRT). So a multi-process command runs under a small supervisor (`supervise`): the same command as its child,
    whose stderr it relays; it recognises the fatal line, drops the dump and prints the one line instead.
What was kept is read from disk when the loss is reported, from what the command registered (`keep_checkpoints`,
`keep_shards`): the last complete checkpoint step, or how many work shards of the job are complete. The supervisor
learns it through a small JSON file (`TREGJAX_PEER_STATE`), since its child may die without a word.

Standard library only (the supervisor runs before any third-party import).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from typing import Any, NoReturn

from tregjax import storage

# Another process of a multi-process job was lost, or never joined (PeerLostError): tregjax.cli's exit-status table
# takes it from here, so this module needs no import of cli (which imports it).
EXIT_PEER_LOST = 9
STATE_ENV = "TREGJAX_PEER_STATE"  # the JSON file the child keeps its join state and its kept outputs in
SUPERVISOR_ENV = "TREGJAX_SUPERVISOR_PID"  # set in the child: its supervisor's pid (the child dies with it)

_STATE: dict[str, Any] = {}

# A failed collective, a coordination-service error, a barrier that timed out: the messages jax/XLA raise for them.
_LOSS = re.compile(
    r"Gloo \S+ failed|Connection (?:reset|closed) by peer|"
    r"NCCL.*(?:remote process|unhandled system error|Connection closed)|"
    r"CoordinationServiceError|coordination service|heartbeat timeout|stopped sending heartbeats|"
    r"Barrier (?:timed out|failed)|DEADLINE_EXCEEDED.*[Bb]arrier|[Bb]arrier.*DEADLINE_EXCEEDED")
# jax's native client ending the process (client.h: "Terminating process because the JAX distributed service ...").
_FATAL = re.compile(r"Terminating process because the JAX distributed service detected fatal errors")
# A native (absl) log record: severity, date, time, thread, file:line].
_NATIVE_RECORD = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([\w./\-]+):\d+\]")
# The distributed runtime's own native records: relayed only when the command does not end in a lost peer.
_RUNTIME_SOURCES = re.compile(r"coordination|preemption_sync|client\.(?:h|cc)|distributed|gloo|grpc", re.I)


# ------------------------------------------------------------------------------------------ what the job has kept


def _publish() -> None:
  path = os.environ.get(STATE_ENV)
  if not path:
    return
  storage.write_text(path, json.dumps(_STATE))


def joining(coordinator: str | None, num_processes: int | None, process_id: int | None, timeout_s: int,
            coordinator_hint: str | None = None) -> None:
  """Record the join under way (named by the error when the job's processes do not all arrive). `coordinator_hint`
  says where jax looks for a coordinator the environment does not name (`detected_coordinator`)."""
  _STATE.update(coordinator=coordinator, num_processes=num_processes, process_id=process_id,
                initialization_timeout_s=timeout_s, joined=False, coordinator_hint=coordinator_hint)
  _publish()


def detected_coordinator(env: dict[str, str] | os._Environ) -> str:
  """Where jax's cluster detection finds the coordinator of a job the environment does not name (SLURM, TPU pods):
  for the lines of a join that failed before jax resolved an address."""
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return f"{env['MEGASCALE_COORDINATOR_ADDRESS'].split(':')[0]} (MEGASCALE_COORDINATOR_ADDRESS, found by jax)"
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return f"{env['TPU_WORKER_HOSTNAMES'].split(',')[0]} (TPU worker 0 of TPU_WORKER_HOSTNAMES, found by jax)"
  nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
  if nodes:
    return f"the first node of SLURM_STEP_NODELIST={nodes} (found by jax)"
  return "the address jax's cluster detection found"


def joined(coordinator: str | None, num_processes: int, process_id: int) -> None:
  _STATE.update(coordinator=coordinator, num_processes=num_processes, process_id=process_id, joined=True)
  _publish()


def keep_checkpoints(directory: str) -> None:
  """A training run: what it keeps is its last complete checkpoint under `directory`."""
  _STATE["checkpoints"] = directory if "://" in directory else os.path.abspath(directory)
  _publish()


def keep_shards(out_dir: str, digest: str, ext: str, prefix: str, total: int) -> None:
  """A resumable job (score, generate): what it keeps is its complete work shards `prefix-NNNNN.ext` of `digest`."""
  shards = _STATE.setdefault("shards", {"dir": os.path.abspath(out_dir), "digest": digest, "ext": ext, "total": {}})
  shards["total"][prefix] = total
  _publish()


def _shard_digest(path: str, ext: str) -> str | None:
  """The job digest a work shard was written with (jobs.ARRAYS: safetensors metadata; jobs.JSON: its "hash")."""
  try:
    with open(path, "rb") as f:
      if ext == "safetensors":
        size = int.from_bytes(f.read(8), "little")
        return (json.loads(f.read(size)).get("__metadata__") or {}).get("hash")
      return json.load(f).get("hash")
  except (OSError, ValueError, AttributeError):
    return None


def complete_checkpoint_steps(directory: str) -> list[int]:
  """Finalized checkpoint steps: orbax renames a step's temporary directory to its number once every process has
  written its part, so a numbered directory is a complete checkpoint."""
  try:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  except OSError:
    return []


def kept(state: dict[str, Any] | None = None) -> str:
  """What the lost job leaves for its rerun, read from disk now."""
  state = _STATE if state is None else state
  if state.get("checkpoints"):
    directory = state["checkpoints"]
    if "://" in directory:  # object storage: not listed from here (standard library only)
      return f"kept: the complete checkpoints under {directory} (rerun the same command on every process to resume)"
    steps = complete_checkpoint_steps(directory)
    if steps:
      return (f"kept: checkpoint step {steps[-1]} in {directory} (rerun the same command on every process to resume "
              "from it)")
    return f"kept: no complete checkpoint in {directory} yet (a rerun starts from step 0)"
  if state.get("shards"):
    s = state["shards"]
    total = sum(s["total"].values())
    work = os.path.join(s["dir"], "work")
    names = re.compile(r"(%s)-\d{5}\.%s$" % ("|".join(map(re.escape, s["total"])), re.escape(s["ext"])))
    try:
      done = sum(1 for n in os.listdir(work)
                 if names.match(n) and _shard_digest(os.path.join(work, n), s["ext"]) == s["digest"])
    except OSError:
      done = 0
    return (f"kept: {done} of {total} work shards complete in {work} (a rerun on every process does only the other "
            f"{total - done})")
  return "kept: nothing written yet"


# ------------------------------------------------------------------------------------------ recognising a loss


def loss_cause(error: BaseException) -> str | None:
  """The message of the exception in `error`'s chain that says a peer is gone, else None (also in a process that
  never joined a multi-process job: only a joined process has peers to lose)."""
  if not _STATE.get("joined"):
    return None
  seen: set[int] = set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    if type(e).__name__ == "PeerLostError" or _LOSS.search(text):
      return text
    e = e.__cause__ or e.__context__
  return None


def _lost_what(cause: str, state: dict[str, Any]) -> str:
  """Which process the error names: a task id from the coordination service, the coordinator, the other process of
  two; else the peer connection that broke."""
  lost = None
  m = re.search(r"[Tt]ask (\d+) heartbeat timeout", cause) or re.search(r"stopped sending heartbeats\)?:?\s*(\d+)",
                                                                        cause)
  if m:
    lost = int(m.group(1))
  elif re.search(r"leader task|Failed to send RPC to coordination service|Socket closed|Connection refused", cause):
    lost = 0
  elif state.get("num_processes") == 2 and state.get("process_id") in (0, 1):
    lost = 1 - state["process_id"]
  if lost == 0:
    return f"process 0 (the coordinator at {_coordinator(state)})"
  if lost is not None:
    return f"process {lost}"
  m = re.search(r"\[([\w.:\-]+)\]:(\d+)", cause)
  return f"a peer process (its connection {m.group(1)}:{m.group(2)} broke)" if m else "a peer process"


def _coordinator(state: dict[str, Any]) -> str:
  return state.get("coordinator") or state.get("coordinator_hint") or "?"


def message(prog: str, cause: str, state: dict[str, Any] | None = None) -> str:
  """The one line for a lost peer: what was lost, the error that showed it, what was kept."""
  state = _STATE if state is None else state
  n = state.get("num_processes") or "?"
  short = cause if len(cause) <= 240 else cause[:237] + "..."
  return f"{prog}: error: lost {_lost_what(cause, state)} of this {n}-process job ({short}); {kept(state)}"


def _reachable(address: str) -> bool:
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
      return True
  except (OSError, ValueError):
    return False


def join_message(prog: str, state: dict[str, Any]) -> str:
  """The one line for a job whose processes did not all arrive within the initialization timeout."""
  n, me, address = state.get("num_processes"), state.get("process_id"), _coordinator(state)
  timeout = state.get("initialization_timeout_s")
  if me != 0 and state.get("coordinator") and not _reachable(state["coordinator"]):
    missing = "process 0 (the coordinator: nothing listens at that address)"
  elif isinstance(n, int) and n == 2 and isinstance(me, int):
    missing = f"1 of 2 processes missing (process {1 - me})"
  else:
    missing = f"at least 1 of the other {n - 1 if isinstance(n, int) else '?'} processes missing"
  return (f"{prog}: error: the {n} processes of this job did not all join coordinator {address} within "
          f"distributed.initialization_timeout_s={timeout}: {missing}; start every process of the job (same "
          "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, a distinct JAX_PROCESS_ID), or raise the timeout")


def exit_lost(prog: str, cause: str, *, verbose: bool = False) -> NoReturn:
  """Print the one line and leave now: no atexit (jax.distributed.shutdown's barrier cannot complete without the
  lost process), no wait for background saves that need it."""
  if verbose:
    traceback.print_exc()
  try:
    import logging  # pylint: disable=g-import-not-at-top
    for handler in logging.getLogger().handlers:
      handler.flush()
    sys.stdout.flush()
  except Exception:  # pylint: disable=broad-except  (leaving anyway)
    pass
  print(message(prog, cause), file=sys.stderr, flush=True)
  os._exit(EXIT_PEER_LOST)


# ------------------------------------------------------------------------------------------ the supervisor


def _die_with_supervisor(supervisor: int) -> None:
  """The child ends when its supervisor does (SIGKILL to the supervisor is SIGKILL to the process of the job)."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
  except (OSError, AttributeError):
    def watch():
      import time  # pylint: disable=g-import-not-at-top
      while os.getppid() == supervisor:
        time.sleep(0.5)
      os._exit(128 + signal.SIGKILL)
    threading.Thread(target=watch, daemon=True).start()
  if os.getppid() != supervisor:  # it died before the death signal was armed
    os._exit(128 + signal.SIGKILL)


class _Relay:
  """The child's stderr, relayed line by line; the distributed runtime's native records are held back (dropped when
  the job ends in a lost peer, relayed otherwise), and everything from a native fatal line on is dropped."""

  def __init__(self, prog: str):
    self.prog = prog
    self.held: list[bytes] = []
    self.holding = False
    self.fatal: list[str] = []  # the fatal record and the lines after it (the status it names)
    self.fatal_done = False  # the stack dump after the fatal status has begun
    self.reported = False  # the child printed its own peer-loss line
    self.pending = b""

  def _line(self, raw: bytes) -> None:
    line = raw.decode("utf-8", "replace")
    if self.fatal:
      if "Check failure stack trace" in line:  # the native stack dump begins: the status it names is complete
        self.fatal_done = True
      if len(self.fatal) < 6 and not self.fatal_done:
        self.fatal.append(line.strip())
      return
    if _FATAL.search(line):
      self.fatal.append(line.strip())
      return
    record = _NATIVE_RECORD.match(line)
    if record:
      self.holding = bool(_RUNTIME_SOURCES.search(record.group(1))) and not line.startswith("I")
    elif line.startswith((self.prog, "Traceback")) or re.match(r"\d{4}-\d\d-\d\d ", line):
      self.holding = False
    if line.startswith(f"{self.prog}: error: lost ") or line.startswith(f"{self.prog}: error: the "):
      self.reported = True
    if self.holding:
      self.held.append(raw)
    else:
      sys.stderr.buffer.write(raw)
      sys.stderr.buffer.flush()

  def feed(self, chunk: bytes) -> None:
    *lines, self.pending = (self.pending + chunk).split(b"\n")
    for raw in lines:
      self._line(raw + b"\n")
    if b"\r" in self.pending and not self.fatal and not self.holding:  # a progress bar redrawing its line
      head, _, self.pending = self.pending.rpartition(b"\r")
      sys.stderr.buffer.write(head + b"\r")
      sys.stderr.buffer.flush()

  def close(self) -> None:
    if self.pending:
      self._line(self.pending)
      self.pending = b""


def supervise(prog: str, multi_process: bool) -> None:
  """For a multi-process `python -m tregjax.<command>`: run the command as a child and relay its output, so that a
  peer lost inside jax's native client still ends in one line and EXIT_PEER_LOST (see the module docstring). Returns
  at once in the child itself, in a single-process command, and where the command line is not known."""
  supervisor = os.environ.get(SUPERVISOR_ENV)
  if supervisor:
    _die_with_supervisor(int(supervisor))
    return
  argv = list(getattr(sys, "orig_argv", []))
  if not multi_process or len(argv) < 2 or not sys.executable:
    return
  fd, state_file = tempfile.mkstemp(prefix="tregjax-peer-state-", suffix=".json")
  os.close(fd)
  env = dict(os.environ, **{SUPERVISOR_ENV: str(os.getpid()), STATE_ENV: state_file})
  sys.stdout.flush()
  sys.stderr.flush()
  child = subprocess.Popen([sys.executable] + argv[1:], env=env, stderr=subprocess.PIPE)
  forward = lambda signum, frame: child.send_signal(signum)  # preemption (SIGTERM) and friends reach the job
  for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, forward)
  relay = _Relay(prog)
  while True:
    try:
      chunk = os.read(child.stderr.fileno(), 65536)
    except InterruptedError:
      continue
    if not chunk:
      break
    relay.feed(chunk)
  relay.close()
  rc = child.wait()
  try:
    with open(state_file, encoding="utf-8") as f:
      state = json.load(f)
  except (OSError, ValueError):
    state = {}
  finally:
    try:
      os.remove(state_file)
    except OSError:
      pass
  if relay.fatal or rc == EXIT_PEER_LOST:
    if not relay.reported:
      cause = " ".join(relay.fatal)
      cause = cause.split("absl::Status:", 1)[-1].strip() or cause
      line = message(prog, cause, state) if state.get("joined") else join_message(prog, state)
      print(line, file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)
  for raw in relay.held:
    sys.stderr.buffer.write(raw)
  sys.stderr.flush()
  if rc < 0:  # killed by a signal: end the same way, for the scheduler
    sys.stdout.flush()
    signal.signal(-rc, signal.SIG_DFL)
    os.kill(os.getpid(), -rc)
  os._exit(rc)
