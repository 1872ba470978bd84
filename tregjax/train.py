"""python -m tregjax.train --config configs/x.py [--config.key=value ...] --workdir DIR

Wiring only: flags → `cli.init_distributed()` (when several processes) → the whole config validated → the program
`config.program` names in `tregjax.programs.PROGRAMS` ("train": the trainer; "experiment": the experiment
runner), run as `entry(config, workdir)`. Rerunning with the same --workdir resumes from its latest checkpoint.
SIGTERM saves a checkpoint and exits 0. `--compile_only --topology v5e:16x16` trains nothing: it compiles the training
step and scoring forward for that TPU topology on this host (`tregjax.compile`, docs/compile.md).
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
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Do not train: AOT-compile the training step and the scoring "
                                  "forward for --topology (a TPU pod dress rehearsal on a CPU host; tregjax.compile).")
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
  if _COMPILE_ONLY.value:
    from tregjax import compile as compile_lib  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.topology:
      raise app.UsageError("--compile_only needs --topology (e.g. v5e:16x16)")
    compile_lib.main(argv, prog="tregjax.train")
    return
  cli.report_errors("tregjax.train", _train)


def _train() -> None:
  cli.init_distributed()
  from tregjax import programs  # pylint: disable=g-import-not-at-top
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  config_lib.validate(config, check_data=False)  # the whole config (sections, keys, mesh) before anything is built
  workdir = _WORKDIR.value or default_workdir()
  programs.load(programs.PROGRAMS[config.program].entry, "config.program")(config, workdir)
  logging.getLogger("tregjax.train").info("done: program %r; outputs in %s", config.program, workdir)


def _define_compile_flags() -> None:
  from tregjax import compile as compile_lib  # pylint: disable=g-import-not-at-top  (standard library + cli at import)
  compile_lib.define_flags(with_config=False)


_define_compile_flags()

if __name__ == "__main__":
  app.run(main)
