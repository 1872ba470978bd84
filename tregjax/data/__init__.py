"""Preference data: local sources -> tokenized TFDS (array_record) -> grain batches (`PreferenceBatch`).

Public API: `build_dataset(config) -> dataset dir`, `default_data_config()`, `pipeline.make_iterator(...)`,
`SequenceBatch` / `PreferenceBatch`, `DataError`.
"""

from tregjax.data.batch import PreferenceBatch, SequenceBatch
from tregjax.data.build import build_dataset, dataset_hash, default_data_config, iter_tokenized
from tregjax.data.sources import DataError

__all__ = ["PreferenceBatch", "SequenceBatch", "build_dataset", "dataset_hash", "default_data_config",
           "iter_tokenized", "DataError"]
