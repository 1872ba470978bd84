"""Raw preference records from local files: JSONL, parquet, and Hugging Face `datasets` saved with `save_to_disk`.

No hub access: every source is a local path. Each record comes with a location string ("file:line 7" or
"file:record 7") so that a bad record is reported where a person can find it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class DataError(ValueError):
  """A bad input record; the message names the file, the line/record and the field."""

  def __init__(self, where: str, field: str | None, problem: str, kind: str):
    self.where, self.field, self.problem, self.kind = where, field, problem, kind
    field_text = f" field {field!r}:" if field else ""
    super().__init__(f"{where}:{field_text} {problem}")


@dataclasses.dataclass(frozen=True)
class RawRecord:
  where: str  # "path:line N" (JSONL, 1-based) or "path:record N" (columnar, 0-based)
  value: dict[str, Any] | None  # None when the record itself could not be read (see `error`)
  error: DataError | None = None


def detect_format(path: str) -> str:
  """'jsonl' | 'parquet' | 'hf_disk' from the path (a directory is a `save_to_disk` dataset)."""
  if os.path.isdir(path):
    return "hf_disk"
  lower = path.lower()
  if lower.endswith((".jsonl", ".json", ".jsonl.txt", ".ndjson")):
    return "jsonl"
  if lower.endswith((".parquet", ".pq")):
    return "parquet"
  raise ValueError(f"{path}: cannot tell the format from the name; set data.format to jsonl, parquet or hf_disk")


def _read_jsonl(path: str) -> Iterator[RawRecord]:
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:line {lineno}"
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield RawRecord(where, None, DataError(where, None, f"non-UTF-8 bytes at byte {e.start} of the line "
                                               f"({raw[e.start:e.start + 4]!r})", "non_utf8"))
        continue
      if not text.strip():
        continue
      try:
        value = json.loads(text)
      except json.JSONDecodeError as e:
        yield RawRecord(where, None, DataError(where, None, f"malformed JSON ({e.msg} at column {e.colno})",
                                               "malformed_json"))
        continue
      if not isinstance(value, dict):
        yield RawRecord(where, None, DataError(where, None, f"expected a JSON object, got {type(value).__name__}",
                                               "malformed_json"))
        continue
      yield RawRecord(where, value)


def _arrow_records(path: str, batches: Iterator[pa.RecordBatch]) -> Iterator[RawRecord]:
  index = 0
  for batch in batches:
    for value in batch.to_pylist():
      yield RawRecord(f"{path}:record {index}", value)
      index += 1


def _hf_disk_files(path: str) -> list[str]:
  """The arrow files of a `Dataset.save_to_disk` directory, in order (from its state.json)."""
  state_path = os.path.join(path, "state.json")
  if not os.path.exists(state_path):
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
      with open(os.path.join(path, "dataset_dict.json")) as f:
        splits = json.load(f).get("splits", [])
      raise ValueError(f"{path} is a DatasetDict; point data files at one split directory, one of "
                       f"{[os.path.join(path, s) for s in splits]}")
    raise ValueError(f"{path}: not a `save_to_disk` dataset directory (no state.json)")
  with open(state_path) as f:
    state = json.load(f)
  files = [os.path.join(path, entry["filename"]) for entry in state.get("_data_files", [])]
  if not files:
    raise ValueError(f"{state_path}: lists no _data_files")
  return files


def _read_hf_disk(path: str) -> Iterator[RawRecord]:
  index = 0
  for arrow_path in _hf_disk_files(path):
    with pa.memory_map(arrow_path, "r") as source:
      try:
        reader = pa.ipc.open_stream(source)
      except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
      else:
        batches = iter(reader)
      for batch in batches:
        for value in batch.to_pylist():
          yield RawRecord(f"{path}:record {index}", value)
          index += 1


def read_records(path: str, fmt: str = "auto") -> Iterator[RawRecord]:
  """Every record of one local file or `save_to_disk` directory, in file order."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file {path} does not exist")
  fmt = detect_format(path) if fmt == "auto" else fmt
  if fmt == "jsonl":
    return _read_jsonl(path)
  if fmt == "parquet":
    return _arrow_records(path, pq.ParquetFile(path).iter_batches(batch_size=1024))
  if fmt == "hf_disk":
    return _read_hf_disk(path)
  raise ValueError(f"unknown data format {fmt!r}; expected auto, jsonl, parquet or hf_disk")


def read_all(paths: Sequence[str], fmt: str = "auto") -> Iterator[RawRecord]:
  for path in paths:
    yield from read_records(path, fmt)
