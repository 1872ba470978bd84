"""The safetensors format, torch-free: dtype table, header reader, one checked tensor reader, streaming writers.

A file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (offsets
relative to the end of the header), then the raw little-endian tensor bytes. Every reader of the project (HF
checkpoints in `hf_io`, PEFT adapters in `adapters`) goes through `entries` and `read`, which check each tensor's
byte range against its shape and dtype and refuse a truncated file by name. Writers go through `tregjax.storage`'s atomic
write, so files are readable by others (0644), as `transformers` makes them: an export is meant to be shared.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from tregjax import storage

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20


def read_header(path: str) -> tuple[dict[str, Any], int]:
  """(the JSON header, the file offset where tensor data starts)."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(raw, "little")
    if n > MAX_HEADER_BYTES:
      raise ValueError(f"{path}: safetensors header of {n} bytes is implausible; file corrupt?")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: corrupt safetensors header: {e}") from e
  if not isinstance(header, dict):
    raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
  return header, 8 + n


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of a safetensors file: where its bytes lie and what they hold."""
  file: str
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute file offsets
  end: int


def entries(path: str) -> dict[str, Entry]:
  """Every tensor of the file at `path` by name; an unsupported dtype or a malformed entry is an error naming it."""
  header, offset = read_header(path)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype_name, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from e
    if dtype_name not in DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
    out[name] = Entry(path, name, DTYPES[dtype_name], shape, offset + int(start), offset + int(end))
  return out


def read(entry: Entry) -> np.ndarray:
  """One tensor, checked: its byte range must match its shape and dtype, and the file must hold all of it.

  A plain read into a fresh buffer (no mmap pages left behind in RSS)."""
  size = math.prod(entry.shape) * entry.dtype.itemsize
  if entry.end - entry.start != size:
    raise ValueError(f"{entry.file}: tensor {entry.name!r} byte range {entry.end - entry.start} does not match "
                     f"shape {entry.shape} {entry.dtype}")
  out = np.empty(entry.shape, entry.dtype)
  with open(entry.file, "rb") as f:
    f.seek(entry.start)
    if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != size:
      raise ValueError(f"{entry.file}: truncated while reading tensor {entry.name!r}")
  return out


# ------------------------------------------------------------------ writing

# One tensor to write: (name, shape, dtype, thunk -> the array), the thunk called when its bytes are due, so a
# writer holds one tensor on the host at a time.
Item = tuple[str, Sequence[int], np.dtype, Callable[[], np.ndarray]]


def write(path: str, items: Sequence[Item], metadata: dict[str, str] | None = None) -> None:
  """Stream tensors into one safetensors file (header first, then data, one tensor on the host at a time),
  atomically."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, shape, dt, _ in items:
    size = math.prod(shape) * dt.itemsize
    header[name] = {"dtype": NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with storage.atomic_file(path) as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name, shape, dt, thunk in items:
      x = np.ascontiguousarray(thunk())
      if x.shape != tuple(shape) or x.dtype != dt:
        raise AssertionError(f"{name}: produced {x.shape} {x.dtype}, planned {tuple(shape)} {dt}")
      f.write(memoryview(x.reshape(-1).view(np.uint8)))
      del x  # written: not held while the next tensor is produced


def write_json(path: str, obj: Any) -> None:
  """A JSON file next to the tensors (config.json, adapter_config.json, the shard index), atomically."""
  storage.write_text(path, json.dumps(obj, indent=2))


__all__ = ["DTYPES", "NAMES", "Entry", "Item", "read_header", "entries", "read", "write",
           "write_json"]
