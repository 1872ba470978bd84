"""TFDS builders that write preference datasets as array_record (no TensorFlow needed, read back with grain).

Two datasets share one layout: `tokenized_preferences` (ids from `tregjax.data.build_dataset`) and
`scored_preferences` (the same ids plus reference log-probs and token rewards from `tregjax.score`). Per-token arrays
are stored in response coordinates (one value per response token, EOS included); the pipeline places them on the
label-aligned [B, T] layout. Examples keep generation order (shuffling is the reader's job, by seed).

Each builder takes its split generators and metadata as constructor arguments; the builder config name is a content
hash, so a changed input or config lands in a new directory instead of silently reusing an old one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

from tregjax import storage

Example = dict[str, Any]
SplitGenerators = dict[str, Callable[[], Iterator[Example]]]

_IDS = tfds.features.Tensor(shape=(None,), dtype=np.int32)
_FLOATS = tfds.features.Tensor(shape=(None,), dtype=np.float32)

TOKENIZED_FEATURES = dict(
    prompt_ids=_IDS,  # template-rendered prompt, generation prompt included (possibly left-truncated)
    chosen_ids=_IDS,  # response ids + end-of-turn (possibly right-truncated)
    rejected_ids=_IDS,
    prompt_messages=tfds.features.Text(),  # JSON list of chat messages (full, untruncated): contexts are re-rendered
    example_id=tfds.features.Text(),  # "file:line N" or the record's id field
)
SCORED_FEATURES = dict(
    TOKENIZED_FEATURES,
    ref_chosen_logps=tfds.features.Scalar(dtype=np.float32),
    ref_rejected_logps=tfds.features.Scalar(dtype=np.float32),
    ref_chosen_token_logps=_FLOATS,  # one per chosen response token
    ref_rejected_token_logps=_FLOATS,
    chosen_token_rewards=_FLOATS,
    rejected_token_rewards=_FLOATS,
    token_reward_source=tfds.features.Text(),
)


class _PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared body: features from `FEATURES`, splits and metadata from the constructor."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial layout: ids + (scored) response-coordinate per-token arrays."}
  FEATURES: dict[str, Any] = {}

  def __init__(self, *, split_generators: SplitGenerators | None = None, metadata: dict[str, Any] | None = None,
               **kwargs):
    self._split_gens = split_generators or {}
    self._metadata = tfds.core.MetadataDict(metadata or {})
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(self.FEATURES), disable_shuffling=True,
                                 metadata=self._metadata)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(gen) for name, gen in self._split_gens.items()}

  def _generate_examples(self, gen):
    for index, example in enumerate(gen()):
      yield index, example


class TokenizedPreferences(_PreferenceBuilder):
  """Tokenized preference pairs (prompt ids, chosen/rejected response ids)."""
  FEATURES = TOKENIZED_FEATURES


class ScoredPreferences(_PreferenceBuilder):
  """Tokenized preference pairs with the reference model's log-probs and per-token rewards (the scored cache)."""
  FEATURES = SCORED_FEATURES


BUILDERS = {"tokenized": TokenizedPreferences, "scored": ScoredPreferences}


def write(kind: str, data_dir: str, config_name: str, split_generators: SplitGenerators,
          metadata: dict[str, Any]) -> str:
  """Generate (or reuse, when this exact config was already written) a dataset; returns its version directory.

  `metadata` (JSON-able) may be mutated by the generators (e.g. counts) and is saved after generation; a
  `lengths-<split>.npy` sidecar (int32 [N, 2]: chosen and rejected row lengths) is written for the length bucketing.
  """
  cls = BUILDERS[kind]
  lengths: dict[str, list[tuple[int, int]]] = {}

  def recording(split, gen):
    def wrapped():
      rows = lengths.setdefault(split, [])
      rows.clear()
      for example in gen():
        p = len(example["prompt_ids"])
        rows.append((p + len(example["chosen_ids"]), p + len(example["rejected_ids"])))
        yield example
    return wrapped

  gens = {split: recording(split, gen) for split, gen in split_generators.items()}
  builder_config = tfds.core.BuilderConfig(name=config_name, version=cls.VERSION)
  builder = cls(data_dir=data_dir, config=builder_config, split_generators=gens, metadata=metadata)
  out_dir = os.fspath(builder.data_path)
  if not builder.is_prepared():
    # TFDS prints a "Downloading and preparing dataset" banner to stdout; nothing is downloaded here, so it goes to
    # the debug log instead of misleading the user.
    banner = io.StringIO()
    with _deterministic_serialization(), contextlib.redirect_stdout(banner):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(), download_dir=os.path.join(
          data_dir, ".downloads"))
    if banner.getvalue().strip():
      logging.getLogger(__name__).debug("tfds: %s", banner.getvalue().strip())
    for split, rows in lengths.items():
      buf = _npy_bytes(np.asarray(rows, np.int32).reshape(-1, 2))
      storage.write_bytes(os.path.join(out_dir, f"lengths-{split}.npy"), buf)
  storage.write_json(os.path.join(data_dir, POINTER), dict(path=os.path.relpath(out_dir, data_dir),
                                                                   kind=kind, hash=metadata.get("hash", "")))
  return out_dir


POINTER = "tregjax_dataset.json"  # at a data_dir's root: the dataset most recently written there


def resolve(path: str) -> str:
  """A dataset version directory from itself or from the data_dir it was written into (via its pointer file)."""
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  pointer = os.path.join(path, POINTER)
  if os.path.exists(pointer):
    with open(pointer) as f:
      return os.path.join(path, json.load(f)["path"])
  raise FileNotFoundError(f"{path} holds no tregjax dataset (no dataset_info.json or {POINTER}); build it with "
                          f"tregjax.data.build_dataset or python -m tregjax.score")


class _DeterministicSerializer(example_serializer.ExampleSerializer):
  """Serializes the tf.train.Example feature map in sorted key order.

  Protobuf leaves map order unspecified and it varies between processes, so without this a resumed scoring run
  would write the same records with different bytes.
  """

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)


@contextlib.contextmanager
def _deterministic_serialization():
  """TFDS's split builder constructs `example_serializer.ExampleSerializer` itself; swap it while we write."""
  original = example_serializer.ExampleSerializer
  example_serializer.ExampleSerializer = _DeterministicSerializer
  try:
    yield
  finally:
    example_serializer.ExampleSerializer = original


def _npy_bytes(array: np.ndarray) -> bytes:
  import io
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()


def read_metadata(dataset_dir: str) -> dict[str, Any]:
  dataset_dir = resolve(dataset_dir)
  path = os.path.join(dataset_dir, "metadata.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{dataset_dir} is not a tregjax dataset directory (no metadata.json)")
  with open(path) as f:
    return json.load(f)


def data_source(dataset_dir: str, split: str):
  """A random-access source (len, __getitem__ -> dict of numpy arrays) over one split of a written dataset."""
  builder = tfds.builder_from_directory(resolve(dataset_dir))
  if split not in builder.info.splits:
    raise ValueError(f"{dataset_dir} has no split {split!r}; it has {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


def lengths(dataset_dir: str, split: str, source=None) -> np.ndarray:
  """int32 [N, 2] chosen/rejected row lengths (prompt + response), from the sidecar or by reading the records."""
  dataset_dir = resolve(dataset_dir)
  path = os.path.join(dataset_dir, f"lengths-{split}.npy")
  if os.path.exists(path):
    return np.load(path)
  source = data_source(dataset_dir, split) if source is None else source
  out = np.zeros((len(source), 2), np.int32)
  for i in range(len(source)):
    ex = source[i]
    out[i] = (len(ex["prompt_ids"]) + len(ex["chosen_ids"]), len(ex["prompt_ids"]) + len(ex["rejected_ids"]))
  return out
