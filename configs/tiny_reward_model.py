"""Tiny Bradley-Terry reward model on CPU (sequence-classification head): the scorer behind R3HF token rewards.

  python -m tregjax.train --config configs/tiny_reward_model.py --config.data.dataset_dir=DATASET --workdir /tmp/rm
"""

from tregjax.training import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, steps=20)
  c = config_lib.base_config()
  c.objective = "reward_model"
  c.model.preset = "tiny_llama"
  c.model.dtype = "float32"
  c.data.batch_size = 8
  c.data.buckets = (64, 128)
  c.data.max_prompt_length = 64
  c.data.max_length = 128
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_ratio = 0.1
  c.train.steps = args.steps
  c.train.log_every = 1
  c.checkpoint.every = 10
  return c
