"""The embedded default: a synthetic world where token-level credit assignment can be measured, on one CPU.

  python -m tregjax.train --config configs/demo.py [--workdir runs/demo] [--config.experiment.arms="('dpo','dpo_reg')"]

The experiment runner (tregjax/experiments/runner.py) on the synthetic world (tregjax/synthetic/): write the world
(tokenizer with a chat template, SFT demonstrations, preference pairs with oracle error labels) -> SFT a tiny Llama
reference -> `tregjax.score` computes reference log-probs and T-REG's contrastive token rewards ("careful" vs "sloppy"
system prompts) -> train each arm from the reference -> token-credit AUC of every token-reward source -> every
policy's error mass and generated-error rates against the oracle -> results.json, plot.png, heatmap.html.
Hardware: 2-core CPU, a few minutes in all (README: measured time). Expected: DPO-REG lowers the error mass more
than DPO, because the reference's contrastive token rewards separate the tokens (see README for the measured table).
"""

import ml_collections

from tregjax.experiments import stages
from tregjax.synthetic import world
from tregjax.training.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.program = "experiment"  # tregjax.programs.PROGRAMS: the experiment runner, not the bare trainer
  c.demo = world.demo_section()
  c.experiment = stages.default_experiment_config()
  c.experiment.task = "synthetic"
  c.experiment.arms = ("dpo", "dpo_reg", "dpo_reg_static", "dpo_sft", "simpo", "simpo_reg", "tgdpo",
                       "dpo_reg_implicit", "dpo_reg_oracle", "dpo_reg_conf", "confpo", "tisdpo")
  c.experiment.credit_policies = ("dpo", "dpo_reg")
  c.experiment.reward_model_steps = 60
  c.experiment.reward_model_lr = 1e-3
  c.seed = 0
  c.model.preset = "tiny_llama"
  c.model.overrides = ml_collections.ConfigDict(dict(
      vocab_size=48, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
      max_position_embeddings=64))
  c.model.dtype = "float32"  # this CPU has no bfloat16 units; bf16 is the default elsewhere
  c.loss.loss = "dpo"
  c.loss.beta = 0.1
  c.loss.alpha = 0.5
  c.optimizer.lr = 5e-4
  c.optimizer.warmup_steps = 10
  c.optimizer.schedule = "cosine"
  c.optimizer.grad_clip = 1.0
  # Sample-limited on purpose (60 steps x 16 pairs): with thousands of pairs every arm solves this small world, and
  # the question is how efficiently each one assigns credit to the erroneous tokens.
  c.data.batch_size = 16
  c.data.eval_split = "validation"
  c.train.steps = 60
  c.train.log_every = 20
  c.train.logits_chunk_size = 32
  c.checkpoint.every = 50
  # The scoring pass: T-REG's contrastive prompts in this world's words, as a system message. Its buckets and chunk
  # size are data.buckets (the world's (32,), set by the task) and train.logits_chunk_size (tregjax.config_schema).
  c.score.better_instruction = world.CAREFUL
  c.score.worse_instruction = world.SLOPPY
  c.score.instruction_role = "system"
  c.score.batch_size = 128
  c.score.token_reward.beta = c.loss.beta
  c.checkpoint.keep = 1
  if arg == "runlocal":  # a seconds-long smoke run (tests, CI's fresh-venv check)
    c.demo.sft_examples, c.demo.sft_steps = 600, 30
    c.demo.train_pairs, c.demo.eval_pairs, c.demo.eval_prompts = 64, 32, 32
    c.experiment.arms = ("dpo", "dpo_reg", "dpo_reg_oracle")
    c.experiment.credit_policies = ("dpo",)
    c.experiment.reward_model_steps = 4
    c.experiment.heatmap_rows = 4
    c.train.steps = 4
    c.data.batch_size = 8
  return c
