"""Content hashes that tie a dataset or a scored cache to exactly the inputs it was made from."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

_CHUNK = 1 << 22


def hash_file(path: str, digest: Any = None) -> str:
  h = digest or hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def hash_path(path: str) -> str:
  """sha256 over a file, or over every file of a directory (sorted relative names + contents)."""
  h = hashlib.sha256()
  if os.path.isfile(path):
    hash_file(path, h)
    return h.hexdigest()
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} does not exist")
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      h.update(os.path.relpath(full, path).encode() + b"\0")
      hash_file(full, h)
  return h.hexdigest()


def hash_paths(paths: Iterable[str]) -> str:
  """Contents in order (not the names: a moved file is the same data)."""
  h = hashlib.sha256()
  for p in paths:
    h.update(hash_path(p).encode() + b"\0")
  return h.hexdigest()


def hash_json(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_hash(path: str) -> str:
  """Hash of the files that decide tokenization (not the weights that may share the directory)."""
  h = hashlib.sha256()
  names = sorted(n for n in os.listdir(path)
                 if n.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template", "vocab", "merges"))
                 or n.endswith((".model", ".jinja")))
  if not names:
    raise FileNotFoundError(f"{path} has no tokenizer files")
  for n in names:
    h.update(n.encode() + b"\0")
    hash_file(os.path.join(path, n), h)
  return h.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Write to a temporary name, fsync, then rename: readers see the old file or the whole new one."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_json(path: str, value: Any) -> None:
  atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())
