"""Tiny SFT run on CPU (next-token loss on chosen responses): how a demo reference/policy init is made.

  python -m tregjax.train --config configs/tiny_sft.py --config.data.dataset_dir=DATASET --workdir /tmp/tiny_sft
"""

from tregjax.training import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, steps=20)
  c = config_lib.base_config()
  c.objective = "sft"
  config_lib.shrink_for_cpu(c)  # 2-layer random Llama, rows of 64/128 tokens, batch 8
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_ratio = 0.1
  c.train.steps = args.steps
  c.checkpoint.every = 10
  return c
