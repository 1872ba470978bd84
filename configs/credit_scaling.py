"""Token credit across model sizes (#28): SmolLM2-135M, Qwen2.5-Coder-0.5B and -1.5B on the same arithmetic problems.

  python -m tregjax.train --config configs/credit_scaling.py          (default size: see docs/credit_scaling.md)
  python -m tregjax.train --config configs/credit_scaling.py:small    (SmolLM2 + 0.5B)
  python -m tregjax.train --config configs/credit_scaling.py:mini     (half of :small; CPU seconds per stage in
                                                                        docs/credit_scaling.md)
  python -m tregjax.train --config configs/credit_scaling.py:tiny     (CI: SmolLM2 only, a handful of problems)

Program "credit" (tregjax/tasks/credit.py): per model, its own samples on the shared problems, every sample scored by
the token-reward sources that need no training (T-REG contrastive with the task's careful/careless prompts and with
the paper's four-dimension prompts, the reference's confidence, the raw log-prob), ROC-AUC against the oracle's
token truth with bootstrap intervals, greedy accuracy with no / the better / the worse system prompt (the
self-teacher gap), results.json, a table and plot.png in the workdir (default runs/credit_scaling). Models are
`python -m tregjax.assets` names (fetched if absent) or .gguf paths: `--config.credit.models="('smollm2',)"`.
"""

import ml_collections

from tregjax.tasks import arith
from tregjax.tasks import sections
from tregjax.training.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.program = "credit"
  c.credit = sections.default_credit_config()
  c.arith = sections.default_arith_config()
  # One problem set for every model: levels 1-4 (4 = the harder level, #28) with operands up to 40, so that the
  # 1.5B still makes errors to measure while SmolLM2 still gets some problems right.
  c.arith.levels, c.arith.max_operand = (1, 2, 3, 4), 40
  c.arith.train_prompts, c.arith.eval_prompts = 96, 200  # sampled problems (token credit); held-out (greedy)
  c.arith.num_samples, c.arith.temperature, c.arith.max_new_tokens = 4, 0.8, 160
  c.arith.sample_batch_size, c.arith.eval_batch_size = 64, 32
  # Qwen2.5-Coder explains step by step in LaTeX: at 128 new tokens 43 of the 0.5B's 48 samples were cut before their
  # answer; a cut response has no final answer to grade (the oracle then labels only its complete equations).
  c.credit.max_new_tokens = (("qwen2.5-coder-0.5b", 320), ("qwen2.5-coder-1.5b", 320))
  c.credit.greedy_batch_size = 32
  c.seed = 0
  c.model.dtype = "float32"  # this CPU has no bfloat16 units
  c.data.max_prompt_length = 160  # the paper's system prompt + a level-4 question
  c.data.max_length = 352
  c.data.buckets = (192, 256, 352)
  c.data.eval_split = ""
  c.train.logits_chunk_size = 128
  c.logging.progress_bar = False
  # T-REG's contrastive prompts for the "contrastive" source and the better/worse greedy conditions: the task's own;
  # the paper's four-dimension prompts (config_schema's defaults) are the second contrastive source.
  c.score.better_instruction = arith.SYSTEM_CAREFUL
  c.score.worse_instruction = arith.SYSTEM_CARELESS
  c.score.instruction_role = "system"
  if arg == "tiny":  # CI: SmolLM2, every stage and artifact in about a minute
    c.credit.models = ("smollm2",)
    c.arith.levels, c.arith.max_operand = (1, 2), 20
    c.arith.train_prompts, c.arith.eval_prompts = 6, 6
    c.arith.num_samples, c.arith.max_new_tokens = 3, 48
    c.arith.sample_batch_size, c.arith.eval_batch_size, c.credit.greedy_batch_size = 16, 8, 8
    c.data.max_length, c.data.buckets = 224, (224,)
  elif arg == "small":  # a shared 2-core CPU: SmolLM2 and the 0.5B
    c.credit.models = ("smollm2", "qwen2.5-coder-0.5b")
    c.arith.train_prompts, c.arith.eval_prompts = 24, 40
    c.arith.max_new_tokens = 128
    c.data.max_length, c.data.buckets = 288, (224, 288)
  elif arg == "mini":  # half of :small
    c.credit.models = ("smollm2", "qwen2.5-coder-0.5b")
    c.arith.train_prompts, c.arith.eval_prompts = 12, 24
    c.arith.max_new_tokens = 128
    c.data.max_length, c.data.buckets = 288, (224, 288)
  elif arg:
    raise ValueError(f"configs/credit_scaling.py: unknown argument {arg!r}; use tiny, mini or small (or nothing)")
  return c
