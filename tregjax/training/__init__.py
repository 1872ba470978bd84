"""The trainer: `run(config, workdir)` and its configuration (`base_config`, `validate`).

Submodules: config (keys, defaults, validation), optimizer (AdamW + schedule + decay mask), step (loss functions per
objective and the jitted step), partition (what trains: LoRA, train.freeze), checkpoint (Orbax), metrics
(JSONL/TensorBoard, MFU), hooks (the loop's side jobs: metrics, progress, checkpoints, evaluation), trainer (`build`:
the program; `run`: the loop).
"""

from tregjax.training.config import ConfigError, base_config, validate
from tregjax.training.trainer import NonFiniteError, load_model, run

__all__ = ["ConfigError", "NonFiniteError", "base_config", "load_model", "run", "validate"]
