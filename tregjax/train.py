"""python -m tregjax.train --config configs/x.py [--config.key=value ...] --workdir DIR

Wiring only: flags → jax.distributed (when several processes) → `tregjax.training.run(config, workdir)`.
Rerunning with the same --workdir resumes from its latest checkpoint. SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import logging
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from tregjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/ "
                                "(default: runs/<config file name>).")
flags.mark_flags_as_required(["config"])
cli.define_verbose_flag()


def default_workdir() -> str:
  """runs/<config file stem>, so `python -m tregjax.train --config configs/demo.py` needs no other flag."""
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  return os.path.join("runs", os.path.splitext(os.path.basename(config_file))[0])


def distributed_env(env: dict[str, str] | None = None) -> dict | None:
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


def main(argv: list[str]) -> None:
  """Expected errors (config, stale cache, bad record, non-finite run) end in one line and their exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  cli.report_errors("tregjax.train", _train)


def _train() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = distributed_env()
  if kwargs is not None:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(**kwargs)
  workdir = _WORKDIR.value or default_workdir()
  if "experiment" in _CONFIG.value:  # stages -> arms -> evaluation -> report (configs/demo.py, smollm2_arith.py)
    from tregjax.experiments import runner  # pylint: disable=g-import-not-at-top
    runner.run(_CONFIG.value, workdir)
    return
  from tregjax import training  # pylint: disable=g-import-not-at-top
  summary = training.run(_CONFIG.value, workdir)
  logging.getLogger("tregjax.train").info("done: step %d (%s); metrics in %s", summary["step"], summary["stopped"],
                                          summary["metrics_file"])


if __name__ == "__main__":
  app.run(main)
