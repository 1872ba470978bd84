"""What a config can run (`PROGRAMS`) and the tasks the experiment runner can run (`TASKS`), each by "module:name"
string, imported only when chosen (a task pulls in its world, tokenizers and plots; the runner its report).

The trainer's config code and the experiment runner import no program and no task: a new one is an entry here and
its own module. Standard library only (every config file's validation reads these tables).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class ProgramEntry:
  """What `python -m tregjax.train` runs for a config naming it: `entry(config, workdir)`, and the top-level sections
  it reads beyond the trainer's own (a section of another program is an error, so a config cannot half-select a
  program). Not the trainer's built `trainer.Program` (its jitted steps), which the "train" entry makes."""
  entry: str  # "module:function"
  sections: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TaskEntry:
  """A task of the experiment runner (`experiments.stages.Task`): its class, made as `cls(config)`, and the config
  section holding its own keys (its `section`)."""
  cls: str  # "module:Class"
  section: str


# config.experiment.task -> its TaskEntry.
TASKS: dict[str, TaskEntry] = {
    "synthetic": TaskEntry("tregjax.synthetic.demo:SyntheticTask", "demo"),  # configs/demo.py
    "arith": TaskEntry("tregjax.tasks.arith_experiment:ArithTask", "arith"),  # configs/smollm2_arith.py
}

# config.program -> its ProgramEntry: the one table of what a config can run.
PROGRAMS: dict[str, ProgramEntry] = {
    "train": ProgramEntry("tregjax.training.trainer:run"),  # the trainer on config.data (scored cache, SFT/RM data)
    # stages -> arms -> evaluation -> report; a task's own section is its TaskEntry's.
    "experiment": ProgramEntry("tregjax.experiments.runner:run",
                               ("experiment", *dict.fromkeys(t.section for t in TASKS.values()))),
    # token credit across model sizes (configs/credit_scaling.py): the arithmetic task's stages per model, no training
    "credit": ProgramEntry("tregjax.tasks.credit:run", ("credit", "arith")),
    # a SmolLM2 arithmetic experiment that can see its own ceiling (configs/credit_ceiling.py): dense metric, α sweep
    "ceiling": ProgramEntry("tregjax.tasks.credit_ceiling:run", ("ceiling", "arith")),
}


def load(spec: str, key: str) -> Any:
  """The object a "pkg.module:name" string names; `key` (the config key that holds it) names a malformed one."""
  module, _, name = spec.partition(":")
  if not module or not name:
    raise ValueError(f"{key}={spec!r}: expected 'pkg.module:name'")
  return getattr(importlib.import_module(module), name)


__all__ = ["ProgramEntry", "TaskEntry", "TASKS", "PROGRAMS", "load"]
