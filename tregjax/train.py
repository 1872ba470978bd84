"""python -m tregjax.train --config configs/x.py [--config.key=value ...] --workdir DIR

Wiring only: flags → `cli.init_distributed()` (when several processes) → the whole config validated → the program
`config.program` names in `tregjax.programs.PROGRAMS` ("train": the trainer; "experiment": the experiment
runner), run as `entry(config, workdir)`. Rerunning with the same --workdir resumes from its latest checkpoint.
SIGTERM saves a checkpoint and exits 0. `--compile_only --topology v5e:16x16` trains nothing: it compiles the training
step and scoring forward for that TPU topology on this host (`tregjax.compile`, docs/compile.md).

For the trainer, the data is a stage of the same command (`prepare_data`): a config that names data.train_files is
tokenized and, for objective=preference, scored into data.cache_dir by the scoring pass (`tregjax.score.run`, the
resumable job the experiment runner's scoring stages call): it runs when the cache is missing, resumes a half-written
one, returns at once when it is finished and current. A cache made from other inputs (edited data, other prompts or
model) is moved aside to `<data.cache_dir>.h<its hash>` with a line naming what changed, never overwritten (it may
hold hours of scoring), and these inputs are scored; a cache of these inputs set aside earlier is moved back instead
of rescored (`scored_cache.set_aside`). A cache that train is pointed at without data.train_files is checked, and
refused in one line when it was made from other inputs. So
`python -m tregjax.train --config configs/my_data.py` goes from JSONL to a trained run; `python -m tregjax.score
--config configs/my_data.py` is the same scoring pass as its own job (clusters that schedule it apart).
"""

from __future__ import annotations

import logging
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from tregjax import cli, jobs, programs, storage  # standard library only: --help without jax
from tregjax.training import config as config_lib  # ml_collections, no jax

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
    # command entry: --help without jax:
    from tregjax import compile as compile_lib  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.topology:
      raise app.UsageError("--compile_only needs --topology (e.g. v5e:16x16)")
    compile_lib.main(argv, prog="tregjax.train")
    return
  cli.report_errors("tregjax.train", _train)


def _train() -> None:
  cli.init_distributed(config=_CONFIG.value)
  config = _CONFIG.value
  # The whole config (sections, keys, mesh vs devices; for the trainer also input paths and splits) before anything
  # is built: each problem is one line now, not a crash at the first evaluation.
  config_lib.validate(config, check_data=config.program == "train")
  workdir = _WORKDIR.value or default_workdir()
  storage.check_writable(workdir, "--workdir")  # a gs:// bucket that is missing or read-only: one line, before work
  if config.program == "train":
    prepare_data(config)
  programs.load(programs.PROGRAMS[config.program].entry, "config.program")(config, workdir)
  logging.getLogger("tregjax.train").info("done: program %r; outputs in %s", config.program, workdir)


def prepare_data(config) -> None:
  """The data stages the trainer reads, when the config names the source files: the tokenizer checked against the
  model's vocabulary first (one line, before minutes of tokenizing), then the tokenized dataset (sft, reward_model)
  or the scored cache (preference: `tregjax.score.run`, cached by the hash of its inputs). A config without
  data.train_files trains on what data.cache_dir / data.dataset_dir already hold."""
  if not config.data.train_files:
    return
  # command entry: --help without jax:
  from tregjax.data import build as data_build  # pylint: disable=g-import-not-at-top
  from tregjax.training import model_init  # pylint: disable=g-import-not-at-top  (command entry: --help without jax)
  data_build.check_vocab(config, model_init.model_config(config), "tregjax.train")
  log = logging.getLogger("tregjax.train")
  if config.objective == "preference":
    from tregjax import score  # pylint: disable=g-import-not-at-top  (command entry: --help without jax)
    from tregjax.data import scored_cache  # pylint: disable=g-import-not-at-top  (command entry: --help without jax)
    # A cache of other inputs (edited data, prompts, model) is moved aside, not refused nor overwritten; one of
    # these inputs set aside earlier comes back. Then the pass scores what is missing (nothing when current).
    jobs.process_zero_first("tregjax.train scored cache", lambda: scored_cache.set_aside(config, log))
    log.info("scored cache: %s", score.run(config))
  else:
    log.info("tokenized dataset: %s", jobs.process_zero_first("tregjax.train dataset",
                                                             lambda: data_build.build_dataset(config)))


def _define_compile_flags() -> None:
  from tregjax import compile as compile_lib  # pylint: disable=g-import-not-at-top  (standard library + cli at import)
  compile_lib.define_flags(with_config=False)


_define_compile_flags()

if __name__ == "__main__":
  app.run(main)
