"""What every command-line entry point shares: readable logging without third-party noise."""

from __future__ import annotations

import logging

import ml_collections


def setup_logging(level: int = logging.INFO) -> None:
  """tregjax's own loggers at `level`; absl/orbax/TFDS chatter (per-save INFO lines, TFDS "Downloading and preparing"
  banners for local files) only at WARNING, and TFDS progress bars off (each command has its own tqdm bar)."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
  logging.getLogger("tregjax").setLevel(level)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's "custom data configuration" warnings for local data
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
  except ImportError:  # commands that never touch TFDS (e.g. on an accelerator image without it)
    pass


def model_path(config: ml_collections.ConfigDict, role: str) -> str:
  """`model.hf_path` (a local HF directory or .gguf file); `role` names the model in the error (reference, policy)."""
  model = config.get("model", None) or {}
  path = model.get("hf_path", "") or model.get("path", "")
  if not path:
    raise ValueError(f"set model.hf_path to the {role} model's local directory (config.json + *.safetensors) or .gguf")
  return path


def compute_dtype(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict) -> str:
  """A command section's own `dtype`, else `model.dtype`, else bfloat16."""
  return section.dtype or (config.get("model", None) or {}).get("dtype", "bfloat16") or "bfloat16"
