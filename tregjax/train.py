"""python -m tregjax.train --config configs/x.py [--config.key=value ...] --workdir DIR

Wiring only: flags → `cli.init_distributed()` (when several processes) → the whole config validated → the program
`config.program` names in `tregjax.training.config.PROGRAMS` ("train": the trainer; "experiment": the experiment
runner), run as `entry(config, workdir)`. Rerunning with the same --workdir resumes from its latest checkpoint.
SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import importlib
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


def main(argv: list[str]) -> None:
  """Expected errors (config, stale cache, bad record, non-finite run) end in one line and their exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  cli.report_errors("tregjax.train", _train)


def _train() -> None:
  cli.init_distributed(config=_CONFIG.value)
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  config_lib.validate(config, check_data=False)  # the whole config (sections, keys, mesh) before anything is built
  program = config_lib.PROGRAMS[config.program]
  module, _, function = program.entry.partition(":")
  workdir = _WORKDIR.value or default_workdir()
  getattr(importlib.import_module(module), function)(config, workdir)
  logging.getLogger("tregjax.train").info("done: program %r; outputs in %s", config.program, workdir)


if __name__ == "__main__":
  app.run(main)
