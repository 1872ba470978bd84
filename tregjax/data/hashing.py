"""Content hashes that tie a dataset or a scored cache to exactly the inputs it was made from."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from typing import Any

from tregjax import storage

_CHUNK = 1 << 22
# A file modified less than this many seconds before it is hashed is not memoised: a write within the same mtime tick
# (coarse on some filesystems) could change its content without changing (size, mtime).
_RACY_S = 2.0


def hash_file(path: str, digest: Any = None) -> str:
  h = digest or hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def cache_dir() -> str:
  """This host's cache of file hashes: $TREGJAX_CACHE_DIR, else $XDG_CACHE_HOME/tregjax, else ~/.cache/tregjax."""
  if os.environ.get("TREGJAX_CACHE_DIR"):
    return os.environ["TREGJAX_CACHE_DIR"]
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tregjax")


def file_sha256(path: str) -> str:
  """sha256 of a file's content (the same value as `hash_file(path)`), memoised per (path, size, mtime, inode) in
  `cache_dir()/file_hashes`: a restart reads the stat, not the bytes, of a file it has hashed before.

  A changed file changes its mtime (or size), so its hash is recomputed. The memo is best effort: an unwritable or
  corrupt one only costs a re-read.
  """
  real = os.path.realpath(path)
  st = os.stat(real)
  stamp = dict(path=real, size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)
  memo = os.path.join(cache_dir(), "file_hashes", hashlib.sha256(real.encode()).hexdigest() + ".json")
  try:
    with open(memo, encoding="utf-8") as f:
      saved = json.load(f)
    if isinstance(saved, dict) and {k: saved.get(k) for k in stamp} == stamp and isinstance(saved.get("sha256"), str):
      return saved["sha256"]
  except (OSError, ValueError):
    pass
  digest = hash_file(real)
  if time.time() - st.st_mtime_ns / 1e9 > _RACY_S and os.stat(real).st_mtime_ns == st.st_mtime_ns:
    try:
      storage.write_json(memo, dict(stamp, sha256=digest))
    except OSError:
      pass
  return digest


def hash_path(path: str) -> str:
  """sha256 over a file (memoised, `file_sha256`), or over every file of a directory (sorted relative names +
  contents). A model directory is hashed by `model_hash` instead: only what the loader reads."""
  h = hashlib.sha256()
  if os.path.isfile(path):
    return file_sha256(path)
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


def tokenizer_files(path: str) -> list[str]:
  """The file names in `path` that decide tokenization (not the weights that may share the directory)."""
  return sorted(n for n in os.listdir(path)
                if n.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template", "vocab", "merges"))
                or n.endswith((".model", ".jinja")))


def tokenizer_hash(path: str) -> str:
  """Hash of the files that decide tokenization (not the weights that may share the directory)."""
  h = hashlib.sha256()
  names = tokenizer_files(path)
  if not names:
    raise FileNotFoundError(f"{path} has no tokenizer files")
  for n in names:
    h.update(n.encode() + b"\0")
    hash_file(os.path.join(path, n), h)
  return h.hexdigest()


def model_files(path: str) -> list[str]:
  """What loading a model reads: a .gguf file itself; of an HF directory, config.json, the tokenizer files and the
  safetensors shards (those model.safetensors.index.json names, and the index). Never the rest of the directory (a
  Meta download's original/consolidated.00.pth, 16 GB the loader never opens)."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} does not exist")
  from tregjax.models import hf_io  # pylint: disable=g-import-not-at-top  (jax: only where a model is hashed)
  names = ["config.json", *tokenizer_files(path)]
  if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
    names.append("model.safetensors.index.json")
  names += [os.path.relpath(f, path) for f in hf_io.weight_files(path)]
  return [os.path.join(path, n) for n in sorted(set(names)) if os.path.exists(os.path.join(path, n))]


def model_hash(path: str) -> str:
  """The cache key of a model: sha256 of a .gguf file (as `hash_path`), or over (relative name, memoised sha256) of
  each file `model_files` lists, so a file the loader does not read neither costs a read nor changes the key."""
  if os.path.isfile(path):
    return file_sha256(path)
  h = hashlib.sha256()
  for f in model_files(path):
    h.update(os.path.relpath(f, path).encode() + b"\0" + file_sha256(f).encode() + b"\0")
  return h.hexdigest()
