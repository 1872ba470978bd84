"""The trainer: `run(config, workdir)` and its configuration (`base_config`, `validate`).

Submodules: config (keys, defaults, validation), optimizer (AdamW + schedule + decay mask), step (loss functions per
objective and the jitted step), partition (what trains: LoRA, train.freeze), checkpoint (Orbax), metrics
(JSONL/TensorBoard, MFU), hooks (the loop's side jobs: metrics, progress, checkpoints, evaluation), trainer (`build`:
the program; `run`: the loop).
"""

import importlib

# Imported on first use, so that `from tregjax.training import config` (every config file) pulls in no jax, orbax or
# data code: name -> the submodule that defines it.
_EXPORTS = {"base_config": "config", "validate": "config", "NonFiniteError": "hooks",
            "load_model": "trainer", "run": "trainer"}

__all__ = ["NonFiniteError", "base_config", "load_model", "run", "validate"]


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  try:
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
