"""Console scripts (pyproject's [project.scripts]): `tregjax-train ...` is `python -m tregjax.train ...`.

Each runs its command module as `__main__` after the hooks `python -m tregjax.X` installs (tregjax/__init__.py): the
host allocator setting, no torch banner, and a missing package (an install without the [train] extra) as one line.
"""

from __future__ import annotations

import runpy
import sys


def _run(command: str) -> None:
  from tregjax import cli  # pylint: disable=g-import-not-at-top  (console-script entry point)
  cli.install_command_hooks(f"tregjax-{command}")
  sys.argv[0] = f"tregjax-{command}"
  runpy.run_module(f"tregjax.{command}", run_name="__main__", alter_sys=True)


def train() -> None:
  _run("train")


def score() -> None:
  _run("score")


def generate() -> None:
  _run("generate")


def export() -> None:
  _run("export")


def assets() -> None:
  _run("assets")
