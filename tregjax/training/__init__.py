"""The trainer: `run(config, workdir)` and its configuration (`base_config`, `validate`).

Submodules: config (keys, defaults, validation), optimizer (AdamW + schedule + decay mask), step (loss functions per
objective and the jitted step), partition (what trains: LoRA, train.freeze), checkpoint (Orbax), metrics
(JSONL/TensorBoard, MFU), hooks (the loop's side jobs: metrics, progress, checkpoints, evaluation), trainer (`build`:
the program; `run`: the loop).
"""

from tregjax import lazy

# Imported on first use, so that `from tregjax.training import config` (every config file) pulls in no jax, orbax or
# data code: name -> the submodule that defines it.
__all__ = ["NonFiniteError", "base_config", "load_model", "run", "validate"]
__getattr__ = lazy.package_getattr(__name__, {"base_config": "config", "validate": "config", "NonFiniteError": "hooks",
                                              "load_model": "trainer", "run": "trainer"})
