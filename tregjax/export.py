"""python -m tregjax.export --workdir W --out DIR [--step N] [--dtype float32|bfloat16|float16]

A training checkpoint (latest, or --step) → a Hugging Face directory (config.json + safetensors + tokenizer +
the base model's generation_config.json) that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads
(AutoModelForSequenceClassification for reward models).

At scale: only the parameters are restored (never the two Adam moments), streamed on the host through tensorstore:
a stacked parameter is read one layer at a time (checkpoints store it one layer per chunk), any other whole, each cast
to the export dtype as read, when the safetensors writer reaches it; no accelerator memory. Peak RSS of the whole
process stays within 1.5x the bytes written on a 357 MiB export (tests/export_memory_test.py, bench/export_memory.py).
`--dtype` defaults to the run's compute dtype
(config.model.dtype). `--workdir` and `--out` may be storage URIs (gs://...); an --out URI is written through a local
staging directory, each file then moved into place atomically.
"""

from __future__ import annotations

from tregjax import cli  # first (standard library only): the command hooks below precede any third-party import

if __name__ == "__main__":  # the host allocator (may re-execute), one line for a missing package
  cli.install_command_hooks("python -m tregjax.export")

import contextlib
import json
import logging
import os

from absl import app
from absl import flags

from tregjax import config_schema, host_memory, models, storage, training
from tregjax.models import adapters


def _define_flags() -> None:
  """CLI flags, defined only when run as a program: importing `export` next to `tregjax.train` (which owns
  --workdir in that process) must not clash."""
  flags.DEFINE_string("workdir", None, "Run directory written by `python -m tregjax.train`.")
  flags.DEFINE_string("out", None, "Output Hugging Face directory (a local path or a storage URI, gs://...).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "Saved tensor dtype (default: the run's compute dtype, config.model.dtype).")
  flags.DEFINE_string("adapter_out", None, "LoRA runs: also write the adapters as a PEFT directory "
                      "(adapter_config.json + adapter_model.safetensors) for the base model.hf_path.")
  flags.mark_flags_as_required(["workdir", "out"])
  cli.define_verbose_flag()


def tokenizer_dir(config) -> str | None:
  """The run's tokenizer directory by the lookup every command uses (`config_schema.tokenizer_dir`: data.tokenizer,
  model.tokenizer_path, model.hf_path when a directory); None when the config names none, or names one that is gone
  (then the model is exported without it, with a warning naming it)."""
  path = config_schema.tokenizer_dir(config)
  if path and not os.path.isdir(path):
    logging.getLogger("tregjax.export").warning("the run's tokenizer %s is not a directory (any more); exporting the "
                                                "model without a tokenizer", path)
    return None
  return path or None


def export(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
           adapter_out: str | None = None) -> str:
  """Write the checkpoint's model (and the run's tokenizer, when it has one) to `out`; returns `out`.

  A LoRA run's model is written merged (W + (α/r)·A B); `adapter_out` also writes its adapters as a PEFT directory.
  `dtype` None: the run's compute dtype (config.model.dtype).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  storage.check_scheme(workdir, "--workdir")
  storage.check_scheme(out, "--out")
  config_path = storage.join(workdir, "config.json")
  if not storage.exists(config_path):
    raise FileNotFoundError(f"--workdir={workdir} is not a run directory of `python -m tregjax.train` (no "
                            f"{config_path}); pass the --workdir the trainer wrote")
  try:
    config = ml_collections.ConfigDict(storage.read_json(config_path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path}: not valid JSON ({e.msg} at line {e.lineno}); the run's config is damaged") from e
  dtype = dtype or config.model.get("dtype") or "float32"
  storage.check_writable(out, "--out")  # a missing or read-only bucket: one line, before the restore
  host_memory.map_large_blocks()  # each tensor's memory back to the kernel before the next is read
  model, step = training.load_model(workdir, step, config=config, params_only=True, dtype=jnp.dtype(dtype))
  tokenizer = None
  tok_dir = tokenizer_dir(config)
  if tok_dir is not None:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    models.check_tokenizer_vocab(tokenizer, model, where=f"export of {workdir} with the tokenizer {tok_dir}")
  with _local_dir(out) as local_out:
    models.save_pretrained(model, local_out, tokenizer=tokenizer, dtype=jnp.dtype(dtype))
    base = config.model.get("hf_path")
    if base and os.path.isfile(os.path.join(base, GENERATION_CONFIG)):  # sampling defaults and eos ids (vLLM reads)
      storage.copy_file(os.path.join(base, GENERATION_CONFIG), os.path.join(local_out, GENERATION_CONFIG))
  if adapter_out:
    with _local_dir(adapter_out) as local_adapter:
      adapters.save_adapter(model, local_adapter, base_model_name_or_path=config.model.hf_path)
  logging.getLogger("tregjax.export").info("exported step %d of %s to %s as %s%s", step, workdir, out, dtype,
                                           "" if tokenizer else " (no tokenizer in this run's config)")
  return out


GENERATION_CONFIG = "generation_config.json"


@contextlib.contextmanager
def _local_dir(out: str):
  """`out` itself when local; for a URI a local staging directory whose files are moved to `out` (each atomically,
  config.json last: a reader that finds it finds the weights) when the block ends without error."""
  if not storage.is_uri(out):
    yield out
    return
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  staging = tempfile.mkdtemp(prefix="tregjax-export-")
  try:
    yield staging
    names = sorted(os.listdir(staging), key=lambda n: n == "config.json")
    for name in names:
      storage.copy_file(os.path.join(staging, name), storage.join(out, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  f = flags.FLAGS
  cli.report_errors("tregjax.export", lambda: export(f.workdir, f.out, step=f.step, dtype=f.dtype,
                                                     adapter_out=f.adapter_out))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
