"""Preference data: local sources -> tokenized TFDS (array_record) -> grain batches (`PreferenceBatch`).

Public API: `build_dataset(config) -> dataset dir`, `default_data_config()`, `pipeline.make_iterator(...)`,
`SequenceBatch` / `PreferenceBatch`, `DataError`.

Names and submodules are imported when first used (as the `tregjax` package's are): `tregjax.data.hashing` or
`tregjax.data.schema` alone pulls in neither the builder's TFDS nor transformers, so a light module (the experiment
stages, a job's digest) can import them at its top.
"""

import importlib

# Public name -> the submodule defining it.
_HOME = {"PreferenceBatch": "batch", "SequenceBatch": "batch", "build_dataset": "build", "dataset_hash": "build",
         "default_data_config": "build", "iter_tokenized": "build", "DataError": "sources"}

__all__ = ["PreferenceBatch", "SequenceBatch", "build_dataset", "dataset_hash", "default_data_config",
           "iter_tokenized", "DataError"]


def __getattr__(name: str):
  if name in _HOME:
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
  try:
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
