"""A SmolLM2 arithmetic experiment that can see its own ceiling (#28 item 4): a dense metric and an α sweep.

  python -m tregjax.train --config configs/credit_ceiling.py          (the sweep #28 asks for; an accelerator or hours)
  python -m tregjax.train --config configs/credit_ceiling.py:mini     (α 1 and 4: the oracle under both
                                                                       normalisations, then the confidence and the
                                                                       contrastive sources: what a shared 2-core CPU
                                                                       ran, docs/credit_scaling.md)
  python -m tregjax.train --config configs/credit_ceiling.py:tiny     (CI: every stage, a handful of problems)

Program "ceiling" (tregjax/tasks/credit_ceiling.py): SmolLM2-135M-Instruct's own samples on easy problems (level 1,
operands up to 20: most sample groups mix right and wrong answers, so most problems give a pair), DPO and DPO-REG with
the oracle's token rewards at each α of `ceiling.alphas` (up to 4, far past the paper's 0.1-0.5) under each regulariser
normalisation, then the confidence and the contrastive token rewards at each α under the normalisation the oracle
validated; every policy's probability of each correct equation result given
the reference's own greedy response prefix on held-out problems; settings chosen on the validation split (the first
`ceiling.val_prompts` held-out problems), compared with DPO on the rest. results.json and a table in the workdir.
"""

import ml_collections

from tregjax.tasks import arith
from tregjax.tasks import sections
from tregjax.training.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.program = "ceiling"
  c.ceiling = sections.default_ceiling_config()
  c.arith = sections.default_arith_config()
  # Easy problems: SmolLM2 answers about 1 in 4 one-step problems with operands up to 20, so 4 samples of a problem
  # are mixed (give a pair) about 2 times in 3; two-step problems it almost never solves.
  c.arith.levels, c.arith.max_operand = (1,), 20
  c.arith.train_prompts, c.arith.eval_prompts = 256, 300
  c.arith.num_samples, c.arith.temperature, c.arith.max_new_tokens = 4, 0.8, 96
  c.arith.sample_batch_size, c.arith.eval_batch_size = 64, 64
  c.ceiling.val_prompts = 100  # held-out problems 1-100 choose the settings; 101-300 are the test split
  c.ceiling.sources = ("oracle", "confidence", "contrastive")
  c.ceiling.alphas = (0.25, 0.5, 1.0, 2.0, 4.0)
  c.ceiling.normalizations = ("sum", "mean")
  # A mean arm trains at α · 64: the regulariser divided by the response length L weighs a response of L = 64 tokens
  # as the sum does at α (the :mini pairs' responses have 57 tokens on average, most at the 64-token budget).
  c.ceiling.mean_alpha_scale = 64.0
  c.seed = 0
  sections.smollm2_arith_training(c)  # smollm2_arith's trainer: float32, DPO β 0.1, 2 epochs at 1e-5
  c.checkpoint.every = 50
  c.logging.progress_bar = False
  # T-REG's contrastive prompts, written for this task (the "contrastive" source).
  c.score.better_instruction = arith.SYSTEM_CAREFUL
  c.score.worse_instruction = arith.SYSTEM_CARELESS
  if arg == "tiny":  # CI: every stage and artifact, a handful of problems and steps
    c.arith.train_prompts, c.arith.eval_prompts = 8, 8
    c.arith.num_samples, c.arith.max_new_tokens = 4, 48
    c.arith.sample_batch_size, c.arith.eval_batch_size = 32, 8
    c.ceiling.val_prompts = 4
    c.ceiling.sources, c.ceiling.alphas, c.ceiling.normalizations = ("oracle",), (4.0,), ("sum",)
    c.data.batch_size = 1
    c.data.max_length, c.data.buckets = 160, (160,)
    c.train.steps = 2
    c.train.log_every = 1
  elif arg == "mini":  # a shared 2-core CPU, about two hours: 8 arms and DPO at α 1 and 4
    # (the first :mini run, docs/credit_scaling.md, was the oracle alone under sum: --config.ceiling.sources
    # "('oracle',)" --config.ceiling.normalizations "('sum',)"; its stages are this run's first ones)
    c.arith.train_prompts, c.arith.eval_prompts = 64, 120
    c.arith.max_new_tokens = 64
    c.ceiling.val_prompts = 40
    c.ceiling.alphas = (1.0, 4.0)
    c.data.max_length, c.data.buckets = 160, (160,)
    # Two micro-batches of 4 per step of 8 pairs: the unrolled float32 step at 8 x 128 tokens held 5.9 GB of
    # temporaries (9.3 GB resident), over a shared machine's per-job share; the same update in about half of it.
    c.optimizer.grad_accum_steps = 2
    # The swept arms at 8 micro-batches of 1 (the same update): beside a 14 GB job the first sweep arm was killed for
    # memory at 2 micro-batches of 4 (6.7 GB resident) and at 4 of 2 (5.4 GB); DPO and the oracle's α 1 and 4 (sum),
    # cached, ran at 2.
    c.ceiling.arm_grad_accum_steps = 8
  elif arg:
    raise ValueError(f"configs/credit_ceiling.py: unknown argument {arg!r}; use tiny or mini (or nothing)")
  return c
