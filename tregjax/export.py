"""python -m tregjax.export --workdir W --out DIR [--step N] [--dtype float32|bfloat16]

A training checkpoint (latest, or --step) → a Hugging Face directory (config.json + safetensors + tokenizer) that
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads (AutoModelForSequenceClassification for reward models).
"""

from __future__ import annotations

import json
import logging
import os

from absl import app
from absl import flags


def _define_flags() -> None:
  """CLI flags, defined only when run as a program: importing `export` next to `tregjax.train` (which owns
  --workdir in that process) must not clash."""
  flags.DEFINE_string("workdir", None, "Run directory written by `python -m tregjax.train`.")
  flags.DEFINE_string("out", None, "Output Hugging Face directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Saved tensor dtype.")
  flags.DEFINE_string("adapter_out", None, "LoRA runs: also write the adapters as a PEFT directory "
                      "(adapter_config.json + adapter_model.safetensors) for the base model.hf_path.")
  flags.mark_flags_as_required(["workdir", "out"])
  from tregjax import cli  # pylint: disable=g-import-not-at-top
  cli.define_verbose_flag()


def tokenizer_dir(config) -> str | None:
  """The run's tokenizer directory by the lookup every command uses (`config_schema.tokenizer_dir`: data.tokenizer,
  model.tokenizer_path, model.hf_path when a directory); None when the config names none, or names one that is gone
  (then the model is exported without it, with a warning naming it)."""
  from tregjax import config_schema  # pylint: disable=g-import-not-at-top
  path = config_schema.tokenizer_dir(config)
  if path and not os.path.isdir(path):
    logging.getLogger("tregjax.export").warning("the run's tokenizer %s is not a directory (any more); exporting the "
                                                "model without a tokenizer", path)
    return None
  return path or None


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
           adapter_out: str | None = None) -> str:
  """Write the checkpoint's model (and the run's tokenizer, when it has one) to `out`; returns `out`.

  A LoRA run's model is written merged (W + (α/r)·A B); `adapter_out` also writes its adapters as a PEFT directory.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from tregjax import models, training  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"--workdir={workdir} is not a run directory of `python -m tregjax.train` (no "
                            f"{config_path}); pass the --workdir the trainer wrote")
  try:
    with open(config_path, encoding="utf-8") as f:
      config = ml_collections.ConfigDict(json.load(f))
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path}: not valid JSON ({e.msg} at line {e.lineno}); the run's config is damaged") from e
  model, step = training.load_model(workdir, step, config=config)
  tokenizer = None
  tok_dir = tokenizer_dir(config)
  if tok_dir is not None:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    models.check_tokenizer_vocab(tokenizer, model, where=f"export of {workdir} with the tokenizer {tok_dir}")
  models.save_pretrained(model, out, tokenizer=tokenizer, dtype=jnp.dtype(dtype))
  if adapter_out:
    from tregjax.models import adapters  # pylint: disable=g-import-not-at-top
    adapters.save_adapter(model, adapter_out, base_model_name_or_path=config.model.hf_path)
  logging.getLogger("tregjax.export").info("exported step %d of %s to %s%s", step, workdir, out,
                                           "" if tokenizer else " (no tokenizer in this run's config)")
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from tregjax import cli  # pylint: disable=g-import-not-at-top
  cli.setup_logging()
  f = flags.FLAGS
  cli.report_errors("tregjax.export", lambda: export(f.workdir, f.out, step=f.step, dtype=f.dtype,
                                                     adapter_out=f.adapter_out))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
