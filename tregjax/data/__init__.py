"""Preference data: local sources -> tokenized TFDS (array_record) -> grain batches (`PreferenceBatch`).

Public API: `build_dataset(config) -> dataset dir`, `default_data_config()`, `pipeline.make_iterator(...)`,
`SequenceBatch` / `PreferenceBatch`, `DataError`.

Names and submodules are imported when first used (as the `tregjax` package's are): `tregjax.data.hashing` or
`tregjax.data.schema` alone pulls in neither the builder's TFDS nor transformers, so a light module (the experiment
stages, a job's digest) can import them at its top.
"""

from tregjax import lazy

__all__ = ["PreferenceBatch", "SequenceBatch", "build_dataset", "dataset_hash", "default_data_config",
           "iter_tokenized", "DataError"]
__getattr__ = lazy.package_getattr(__name__, {
    "PreferenceBatch": "batch", "SequenceBatch": "batch", "build_dataset": "build", "dataset_hash": "build",
    "default_data_config": "build", "iter_tokenized": "build", "DataError": "sources"})
