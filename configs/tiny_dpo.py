"""Tiny DPO-REG (T-REG regularizer) run on CPU: a 2-layer random Llama on a small scored cache.

  python -m tregjax.train --config configs/tiny_dpo.py --config.data.cache_dir=CACHE --workdir /tmp/tiny_dpo

Wall time: about a minute on 2 CPU cores (mostly compilation). Used by tests/configs_test.py; the cache comes from
`python -m tregjax.score` on any tiny dataset.
"""

from tregjax.training import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, loss="dpo", regularizer="treg", steps=20)
  c = config_lib.base_config()
  c.objective = "preference"
  config_lib.shrink_for_cpu(c)  # 2-layer random Llama, rows of 64/128 tokens, batch 8
  c.loss.loss = args.loss
  c.loss.regularizer = args.regularizer
  c.loss.beta = 0.1
  c.loss.alpha = 0.25
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_ratio = 0.1
  c.train.steps = args.steps
  c.checkpoint.every = 10
  return c
