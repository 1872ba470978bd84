"""The config sections of the arithmetic tasks (`arith`, `credit`, `ceiling`) with their defaults, and the trainer
settings the SmolLM2 arithmetic experiments share: what a config file sets.

Light on purpose (ml_collections only): configs/smollm2_arith.py and configs/credit_scaling.py import this module, not
the tasks (tasks/arith_experiment.py, tasks/credit.py), which import the sampler, the trainer and the data builder.
"""

from __future__ import annotations

import ml_collections


def default_arith_config() -> ml_collections.ConfigDict:
  """The `arith` section: problems, sampling and evaluation sizes (configs/smollm2_arith.py sets them)."""
  return ml_collections.ConfigDict(dict(
      model="",  # a .gguf file or HF directory; "" -> the SmolLM2-135M-Instruct asset (tregjax.assets)
      # Levels 1-2 with operands up to 20: SmolLM2-135M answers ~25% of one-step and ~3% of two-step problems of
      # this size (4% overall at levels 1-3 with operands up to 60, where almost no sample group is mixed and so
      # almost no problem yields a pair).
      train_prompts=192, eval_prompts=500, seed=0, levels=(1, 2), max_operand=20,
      num_samples=5, temperature=0.8, top_p=1.0, max_new_tokens=96,
      sample_batch_size=64, eval_batch_size=64))


def default_credit_config() -> ml_collections.ConfigDict:
  """The `credit` section (configs/credit_scaling.py sets it)."""
  return ml_collections.ConfigDict(dict(
      models=("smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"),  # tregjax.assets names, or .gguf paths
      greedy_batch_size=32,
      # Per-model response budget (new tokens) where a model needs more than `arith.max_new_tokens`: ((name, n), ...).
      # Qwen2.5-Coder explains at length; a response cut by the budget has no final answer for the oracle to grade.
      max_new_tokens=(),
  ))


def default_ceiling_config() -> ml_collections.ConfigDict:
  """The `ceiling` section (configs/credit_ceiling.py; tasks/credit_ceiling.py runs it)."""
  return ml_collections.ConfigDict(dict(
      val_prompts=100,  # the first held-out problems: the validation split (settings are chosen there); rest: test
      sources=("oracle", "confidence", "contrastive"),  # keys of credit_ceiling.SOURCE_ARMS; "oracle" is the ceiling
      alphas=(0.25, 1.0, 4.0),  # T-REG's α (the paper searched 0.1-0.5)
      # loss.reg_normalization of the oracle's sweep: "sum" (T-REG's) and/or "mean"; the other sources sweep their α
      # at the normalisation the oracle validated.
      normalizations=("sum",),
      # "mean" divides the regulariser by the response length L, so a mean arm uses α · mean_alpha_scale: about the
      # pairs' mean response length in tokens, so that α reaches as far under either normalisation.
      mean_alpha_scale=64.0,
      # Micro-batches per step of the swept DPO-REG arms (0: optimizer.grad_accum_steps, as DPO). Memory only: each
      # example weighs the same, so the mean over equal micro-batches is the full batch's update (float rounding aside).
      arm_grad_accum_steps=0,
      batch_size=8,  # sequences per forward pass of the dense metric
      bucket=64,  # the dense metric's sequence lengths are padded to a multiple of this (one compile per length)
      greedy=False,  # also greedy accuracy of every trained policy (a generation pass each: costly on a CPU)
  ))


__all__ = ["default_arith_config", "default_credit_config", "default_ceiling_config"]


def smollm2_arith_training(c: ml_collections.ConfigDict) -> None:
  """The trainer settings of SmolLM2-135M on arithmetic (configs/smollm2_arith.py, configs/credit_ceiling.py), set on
  `c` in place: float32 unrolled layers, DPO at β 0.1, two epochs at 1e-5 over a few dozen pairs of 192 tokens."""
  c.model.dtype = "float32"  # this CPU has no bfloat16 units
  # The unrolled layer loop was the faster CPU step before 0138a17; since then the two loops step equally fast on this
  # shape (bench/RESULTS.md train_step_smollm2_loops; scan compiles 2.3x faster). Kept so the cached arms reproduce.
  c.model.scan_layers = False
  c.loss.loss = "dpo"
  c.loss.beta = 0.1
  # ~50 pairs come out of smollm2_arith's default size (most sample groups all fail or all succeed): two epochs at
  # 1e-5 so that the policies move at all in ~14 steps.
  c.optimizer.lr = 1e-5
  c.optimizer.warmup_ratio = 0.1
  c.optimizer.schedule = "cosine"
  c.optimizer.grad_clip = 1.0
  c.data.batch_size = 8
  c.data.max_prompt_length = 96
  c.data.max_length = 192
  c.data.buckets = (128, 192)
  c.data.eval_split = ""
  c.train.steps = -1  # data.epochs passes over the pairs
  c.data.epochs = 2
  c.train.log_every = 5
  c.train.logits_chunk_size = 128
  c.checkpoint.keep = 1
  c.score.instruction_role = "system"  # score.buckets, score.chunk_size: data.buckets, train.logits_chunk_size
  c.score.token_reward.beta = c.loss.beta
