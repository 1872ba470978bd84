"""T-REG on a real model: SmolLM2-135M-Instruct on arithmetic word problems, with token-level ground truth.

  python -m tregjax.train --config configs/smollm2_arith.py            (default: CPU-sized, README states its time)
  python -m tregjax.train --config configs/smollm2_arith.py:tiny       (CI smoke: every stage's artifact, minutes)
  python -m tregjax.train --config configs/smollm2_arith.py:large      (an accelerator: more problems, more steps)

The experiment runner (tregjax/experiments/runner.py) with the arithmetic task (tregjax/tasks/arith_experiment.py):
problems -> on-policy samples from SmolLM2 (5 per problem, the oracle's final-answer reward, best/worst pairs) ->
the scoring pass (reference log-probs; contrastive token rewards under a careful-tutor vs careless-helper system
prompt) -> every arm trained from SmolLM2 on the same pairs and steps -> token-credit AUC of every token-reward source
against the oracle's equation truth -> greedy accuracy of every policy on held-out problems -> results.json,
plot.png, heatmap.html in the workdir (default runs/smollm2_arith). Stages are cached: a rerun resumes.
Seeds: `--config.seed=N` (training and sampling) and `--config.arith.seed=N` (the problems).
"""

import ml_collections

from tregjax.experiments import stages
from tregjax.tasks import arith
from tregjax.tasks import sections
from tregjax.training.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.program = "experiment"  # tregjax.programs.PROGRAMS: the experiment runner, not the bare trainer
  c.arith = sections.default_arith_config()
  c.experiment = stages.default_experiment_config()
  c.experiment.task = "arith"
  # On 2 CPU cores an arm costs ~6 min (12 steps of 8 pairs x 192 tokens) and a greedy evaluation of 500 problems ~4
  # min, so the default runs the six arms that answer the question (DPO vs DPO-REG, the oracle-r̂ ceiling, SimPO vs
  # SimPO-REG, TGDPO) within the 75-minute budget. The paper's ablations are one flag away:
  #   --config.experiment.arms="('dpo','dpo_reg','dpo_sft','dpo_reg_static','dpo_reg_implicit')"
  # and so are the prompt-free token signals (the reference's confidence as r̂, ConfPO, TIS-DPO):
  #   --config.experiment.arms="('dpo','dpo_reg','dpo_reg_conf','confpo','tisdpo')"
  # (every stage is cached, so adding arms to a finished workdir trains only the new ones).
  c.experiment.arms = ("dpo", "dpo_reg", "simpo", "simpo_reg", "tgdpo", "dpo_reg_oracle")
  c.experiment.credit_policies = ("dpo",)
  # R3HF's scorer, a Bradley-Terry reward model from SmolLM2 on the same pairs, costs another ~7 min of training:
  # off by default (--config.experiment.reward_model_steps=20 adds it; :large has it).
  c.experiment.reward_model_steps = 0
  c.experiment.reward_model_lr = 1e-5
  c.seed = 0
  sections.smollm2_arith_training(c)  # float32 unrolled SmolLM2, DPO β 0.1, 2 epochs at 1e-5 (shared with the ceiling)
  c.loss.alpha = 0.25  # the paper searched 0.1 / 0.25 / 0.5 (bench/experiment_seeds.py sweeps them)
  c.checkpoint.every = 10
  c.logging.progress_bar = True
  # T-REG's contrastive prompts, written for this task (a system message replaces SmolLM2's default one).
  c.score.better_instruction = arith.SYSTEM_CAREFUL
  c.score.worse_instruction = arith.SYSTEM_CARELESS
  if arg == "tiny":  # CI smoke: every stage and artifact, a handful of problems and steps
    c.arith.train_prompts, c.arith.eval_prompts, c.arith.levels = 16, 8, (1,)
    c.arith.num_samples, c.arith.max_new_tokens = 4, 64
    c.arith.sample_batch_size, c.arith.eval_batch_size = 64, 8
    c.experiment.arms = ("dpo", "dpo_reg", "dpo_reg_oracle")
    c.experiment.heatmap_rows = 4
    c.data.batch_size = 1  # a handful of pairs: every one of them makes a batch
    c.train.steps = 2
    c.train.log_every = 1
  elif arg == "large":  # an accelerator: bfloat16, more problems, longer answers, 3 seeds via --config.seed
    c.experiment.arms = ("dpo", "dpo_reg", "simpo", "simpo_reg", "tgdpo", "dpo_sft", "dpo_reg_static",
                         "dpo_reg_implicit", "dpo_reg_oracle", "dpo_reg_conf", "confpo", "tisdpo")
    c.experiment.credit_policies = ("dpo", "dpo_reg")
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.arith.train_prompts, c.arith.eval_prompts = 4000, 1000
    c.arith.max_new_tokens = 160
    c.data.max_length, c.data.buckets = 256, (128, 192, 256)
    c.arith.sample_batch_size, c.arith.eval_batch_size = 512, 512
    c.experiment.reward_model_steps = 200
    c.data.batch_size = 32
    c.data.epochs = 2
  elif arg:
    raise ValueError(f"configs/smollm2_arith.py: unknown argument {arg!r}; use tiny or large (or nothing)")
  return c
