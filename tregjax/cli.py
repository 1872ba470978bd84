"""What every command-line entry point shares: readable logging without third-party noise, joining the other
processes of a multi-host job (`init_distributed`), and a one-line error (not a traceback) on an expected error.

This module imports only the standard library, so that
`install_command_hooks` can run before any third-party import of a command.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from tregjax import host_memory, peers  # standard library only
from tregjax.peers import EXIT_PEER_LOST  # 9: a lost or never-joined peer

if TYPE_CHECKING:
  import ml_collections

T = TypeVar("T")


# Exit statuses of tregjax's commands, one per kind of expected error, so that a script can tell them apart
# (docs/bad_input.md lists the inputs behind each). 1 stays absl's usage error (unknown flag, missing --config).
EXIT_BAD_INPUT = 2  # a bad path, file or value (ValueError, FileNotFoundError)
EXIT_MISSING_PACKAGE = 3  # the environment lacks a runtime package
EXIT_CONFIG = 4  # a config key that cannot run (ConfigError)
EXIT_BAD_RECORD = 5  # a bad data record (DataError), or too many skipped ones
EXIT_STALE = 6  # outputs of other inputs are in the way (StaleCacheError, CheckpointMismatchError)
EXIT_NON_FINITE = 7  # a run or a scored value went non-finite (NonFiniteError)
EXIT_DOES_NOT_FIT = 8  # tregjax.compile: a compiled program needs more memory than the chip has (DoesNotFitError)

# Expected errors by class name (tregjax.errors and the modules that define the others; this module imports no
# tregjax module) -> exit status; the most specific base wins.
EXPECTED_ERRORS: dict[str, int] = {
    "ConfigError": EXIT_CONFIG,
    "DataError": EXIT_BAD_RECORD,
    "StaleCacheError": EXIT_STALE,
    "CheckpointMismatchError": EXIT_STALE,
    "NonFiniteError": EXIT_NON_FINITE,
    "NonFiniteScoreError": EXIT_NON_FINITE,
    "DoesNotFitError": EXIT_DOES_NOT_FIT,
    "MissingLibtpuError": EXIT_MISSING_PACKAGE,
    "PeerLostError": EXIT_PEER_LOST,
    "AssetError": EXIT_BAD_INPUT,
    "MissingBackendError": EXIT_MISSING_PACKAGE,  # a storage URI scheme without its package (tregjax.storage)
    "FileNotFoundError": EXIT_BAD_INPUT,
    "PermissionError": EXIT_BAD_INPUT,
    "NotADirectoryError": EXIT_BAD_INPUT,
    "IsADirectoryError": EXIT_BAD_INPUT,
    "ValueError": EXIT_BAD_INPUT,
}

# Import name -> distribution name (the name requirements.txt lists) where the two differ. tests/requirements_test.py
# derives tregjax's third-party imports from the source and checks each one's distribution is in requirements.txt.
DISTRIBUTIONS: dict[str, str] = {
    "absl": "absl-py",
    "orbax": "orbax-checkpoint",
    "tensorflow_datasets": "tensorflow-datasets",
    "yaml": "pyyaml",
    "google": "protobuf",
}


def distribution_of(import_name: str) -> str:
  """The pip distribution that provides top-level module `import_name`."""
  top = import_name.split(".")[0]
  return DISTRIBUTIONS.get(top, top)


def missing_package(error: ImportError) -> str | None:
  """The distribution an ImportError says is missing: `error.name` for a failed import, else the package a library
  names in its own message (transformers: "apply_chat_template requires jinja2 to be installed")."""
  if error.name:
    name = error.name
  else:
    found = re.search(r"requires (?:the )?([A-Za-z0-9_.\-]+)(?: library)? to be installed", str(error))
    if not found:
      return None
    name = found.group(1)
  if name.split(".")[0] == "tregjax":  # a bug in tregjax itself, not the environment: keep the traceback
    return None
  return distribution_of(name)


def missing_package_message(prog: str, error: ImportError) -> str:
  """One line: which package to install, and that requirements.txt provides it."""
  return (f"{prog}: error: the Python package {missing_package(error)!r} is not installed; "
          "`pip install -r requirements.txt` (in the tregjax checkout) or `pip install 'tregjax[train]'` installs it")


class _DropTorchBanner(logging.Filter):
  """transformers announces at import that PyTorch is missing; tregjax never uses torch, so for its own commands the
  line is noise. Only that record is dropped: every other transformers warning still shows."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


def install_command_hooks(prog: str) -> None:
  """For tregjax's own commands, called from the first lines of each command module when it runs as `__main__`
  (importing tregjax or a command module installs nothing): drop the torch banner, and turn an ImportError that
  escapes the command (even one raised by a module-level import, before `main` runs) into one line and
  EXIT_MISSING_PACKAGE; and the host allocator setting (`host_memory`: XLA:CPU's per-step temporaries fault in 2 MiB,
  not 4 KiB, at a time; this may re-execute the process once, which is why it comes first). A second call (a console
  script, then the module it runs) does nothing: the first one's `prog` names the command."""
  if getattr(sys.excepthook, "tregjax_command", None):
    return
  try:
    host_memory.apply_for_command()
  except ValueError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  # Several processes: the command runs as the child of a supervisor that turns a peer lost inside jax's native client
  # (an abort with a native stack dump) into one line and EXIT_PEER_LOST (tregjax.peers).
  peers.supervise(prog.removeprefix("python -m "), distributed_env() is not None)
  transformers_logger = logging.getLogger("transformers")
  if not any(isinstance(f, _DropTorchBanner) for f in transformers_logger.filters):
    transformers_logger.addFilter(_DropTorchBanner())
  previous = sys.excepthook

  def exit_if_lost(error: BaseException | None) -> None:
    cause = peers.loss_cause(error) if isinstance(error, Exception) else None
    if cause is not None:
      peers.exit_lost(prog.removeprefix("python -m "), cause)

  def hook(kind, error, tb):
    exit_if_lost(error)
    if not isinstance(error, ImportError) or missing_package(error) is None:
      previous(kind, error, tb)
      return
    print(missing_package_message(prog, error), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_MISSING_PACKAGE)  # an excepthook cannot raise SystemExit; the process is ending anyway

  hook.tregjax_command = prog
  sys.excepthook = hook
  # A background thread can meet a lost peer first: Orbax's async-save thread runs the save's barrier and logs its
  # failure with the traceback (logging.error(exc_info=True)) before the main thread sees it. Same one line, first.
  previous_thread_hook = threading.excepthook

  def thread_hook(args):
    exit_if_lost(args.exc_value)
    previous_thread_hook(args)

  def logged_loss(record: logging.LogRecord) -> bool:
    exit_if_lost(record.exc_info[1] if record.exc_info else None)
    return True

  threading.excepthook = thread_hook
  logging.getLogger("absl").addFilter(logged_loss)


def exit_status(error: BaseException) -> int | None:
  """The exit status of an expected error (see EXPECTED_ERRORS), None for a bug (which keeps its traceback)."""
  for cls in type(error).__mro__:
    if cls.__name__ in EXPECTED_ERRORS:
      return EXPECTED_ERRORS[cls.__name__]
  return None


def one_line(error: BaseException) -> str:
  """The error's message on one line (a multi-line message would read as several errors)."""
  text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
  return text or type(error).__name__


def define_verbose_flag() -> None:
  """`--verbose`: print the traceback of an expected error too (the one-line message is always printed)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "On an expected error (bad input, config, stale cache, non-finite run), also "
                      "print the Python traceback.")


def _verbose() -> bool:
  try:
    from absl import flags  # pylint: disable=g-import-not-at-top
    return "verbose" in flags.FLAGS and flags.FLAGS.is_parsed() and bool(flags.FLAGS.verbose)
  except ImportError:
    return False


def report_errors(prog: str, body: Callable[[], T], *, verbose: bool | None = None) -> T:
  """Run a command's body; an expected error becomes ONE line `prog: error: ...` on stderr and its distinct exit
  status (EXPECTED_ERRORS); the traceback only with `--verbose`. Anything else (a bug) propagates with its traceback.

  SystemExit is raised in the normal way (not os._exit), so open files are flushed and closed on the way out; except
  for a lost peer (`tregjax.peers`): one line, EXIT_PEER_LOST and os._exit, since jax.distributed's shutdown at exit
  would wait on a barrier the lost process can never reach.
  """
  try:
    return body()
  except Exception as e:  # pylint: disable=broad-except
    cause = peers.loss_cause(e)
    if cause is not None:  # another process is gone: one line and leave now, past the barriers that wait for it
      peers.exit_lost(prog, cause, verbose=_verbose() if verbose is None else verbose)
    status = exit_status(e)
    if status is None:
      raise
    if _verbose() if verbose is None else verbose:
      traceback.print_exc()
    sys.stdout.flush()
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(status) from None


def distributed_env(env: Mapping[str, str] | None = None) -> dict | None:
  """kwargs for jax.distributed.initialize when this process is one of several, else None.

  Explicit: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (launch/local_multiprocess.sh). SLURM
  (srun with more than one task) and multi-host TPU VMs are detected by jax itself: initialize() with no arguments.
  """
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": int(env["JAX_NUM_PROCESSES"]),
            "process_id": int(env.get("JAX_PROCESS_ID", "0"))}
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
    return {}
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return {}
  return None


def init_distributed(env: Mapping[str, str] | None = None, config: ml_collections.ConfigDict | None = None) -> None:
  """Join the other processes of this job when there are several (`distributed_env`); nothing for one process.

  Every command's main calls it before anything touches a device: without it each process of an N-host job believes
  it is process 0 of 1, does all the work and writes the outputs at the same time as the others. On CPU the
  cross-process collectives go over gloo. The join, heartbeat and shutdown timeouts are `config.distributed`'s
  (config_schema.distributed_defaults). Calling it again in the same process does nothing.
  """
  kwargs = distributed_env(env)
  if kwargs is None:
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return
  from tregjax import config_schema  # pylint: disable=g-import-not-at-top  (ml_collections: not at cli import)
  d = config_schema.section(config if config is not None else {}, "distributed")
  kwargs.update(initialization_timeout=int(d.initialization_timeout_s),
                heartbeat_timeout_seconds=int(d.heartbeat_timeout_s),
                shutdown_timeout_seconds=int(d.shutdown_timeout_s))
  if (os.environ if env is None else env).get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  explicit = "num_processes" in kwargs
  peers.joining(kwargs.get("coordinator_address"), kwargs.get("num_processes"), kwargs.get("process_id"),
                int(d.initialization_timeout_s),
                coordinator_hint=None if explicit else peers.detected_coordinator(os.environ if env is None else env))
  jax.distributed.initialize(**kwargs)
  # The joined job: what the environment named, else (SLURM, TPU pods, where jax detects the job itself)
  # jax.process_count/process_index, and the address jax resolved (no public API says it: read defensively, so a
  # jax without that attribute keeps the hint).
  resolved = getattr(getattr(getattr(jax, "_src", None), "distributed", None), "global_state", None)
  peers.joined(kwargs.get("coordinator_address") or getattr(resolved, "coordinator_address", None),
               kwargs["num_processes"] if explicit else jax.process_count(),
               kwargs["process_id"] if explicit else jax.process_index())


def setup_logging(level: int = logging.INFO) -> None:
  """tregjax's own loggers at `level`; absl/orbax/TFDS chatter (per-save INFO lines, TFDS "Downloading and preparing"
  banners for local files) only at WARNING, and TFDS progress bars off (each command has its own tqdm bar)."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
  logging.getLogger("tregjax").setLevel(level)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's "custom data configuration" warnings for local data
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
  except ImportError:  # commands that never touch TFDS (e.g. on an accelerator image without it)
    pass
  host_memory.log_in_effect()  # what install_command_hooks applied, once per process


def compute_dtype(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict) -> str:
  """A command section's own `dtype`, else `model.dtype`, else bfloat16."""
  return section.dtype or (config.get("model", None) or {}).get("dtype", "bfloat16") or "bfloat16"


def job_main(prog: str, run: Callable[[ml_collections.ConfigDict], str]) -> None:
  """A job command's body (`tregjax.score`, `tregjax.generate`: `tregjax.jobs`): join the job's other processes (each
  does its shards, process 0 assembles), run, print the output directory; bad input ends in one line and its exit
  status."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  setup_logging()

  def body() -> str:
    init_distributed(config=flags.FLAGS.config)
    return run(flags.FLAGS.config)

  print(report_errors(prog, body))


def job_app_main(main_fn: Callable[[Sequence[str]], None]) -> None:
  """`python -m <job command>`: a required --config file, --verbose, then `main_fn`."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "config file (configs/*.py with get_config())", lock_config=True)
  flags.mark_flag_as_required("config")
  define_verbose_flag()
  app.run(main_fn)
