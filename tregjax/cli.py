"""What every command-line entry point shares: readable logging without third-party noise."""

from __future__ import annotations

import logging


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
