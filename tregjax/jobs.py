"""Resumable sharded jobs: the one shape of `tregjax.score` and `tregjax.generate`.

A job writes into one directory: `work/` holds one file per work shard, written atomically (tmp + rename) and stamped
with the digest of every input, and a completion marker (a JSON file holding that digest) is written last, by the
assembly step. So a rerun skips the shards it finds with its digest and resumes an interrupted job with byte-identical
output; a damaged or foreign shard is redone; a marker of another digest is refused (StaleCacheError), never
overwritten. On N processes shard n of the job's enumeration is process n % N's, decided before anything is read, so
every process agrees on the split whatever the others have finished; process 0 assembles between two barriers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from tregjax import errors, peers, storage
from tregjax.data import hashing

log = logging.getLogger("tregjax.jobs")

T = TypeVar("T")
Key = tuple[str, int]  # a work shard: (name prefix, index) -> work/{prefix}-{index:05d}.{ext}


@dataclasses.dataclass(frozen=True)
class ShardFormat:
  """How a work shard is stored: its payload with the job's digest as bytes, and back (None: of another digest)."""
  ext: str
  dumps: Callable[[Any, str], bytes]
  loads: Callable[[str, str], Any]


def canonical_json(value: Any) -> str:
  """One line of JSON with sorted keys: the same value is always the same bytes (resumed output is identical)."""
  return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _dump_arrays(arrays: dict[str, Any], digest: str) -> bytes:
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  return save(arrays, metadata={"hash": digest})


def _load_arrays(path: str, digest: str) -> dict[str, Any] | None:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(path, framework="numpy") as f:
    if (f.metadata() or {}).get("hash") != digest:
      return None
    return {k: f.get_tensor(k) for k in f.keys()}


def _dump_json(value: dict[str, Any], digest: str) -> bytes:
  return canonical_json(dict(value, hash=digest)).encode("utf-8")


def _load_json(path: str, digest: str) -> dict[str, Any] | None:
  with open(path, encoding="utf-8") as f:
    shard = json.load(f)
  return shard if isinstance(shard, dict) and shard.get("hash") == digest else None


ARRAYS = ShardFormat("safetensors", _dump_arrays, _load_arrays)  # flat numpy arrays; the digest in the metadata
JSON = ShardFormat("json", _dump_json, _load_json)  # a JSON object; the digest as its "hash" key


def item_ranges(count: int, shard_size: int) -> list[range]:
  """The items of each work shard: consecutive runs of `shard_size` (the last one shorter)."""
  return [range(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def progress(total: int, enabled: bool, unit: str, desc: str):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class Job:
  """One job's directory and inputs. `what`/`dir_key` only word the refusal of a directory of other inputs."""
  name: str  # the command ("tregjax.score"): names the barriers
  out_dir: str
  components: dict[str, str]  # a hash per input; the job's digest is their hash
  marker: str  # the completion marker's file name (JSON with "hash"), written last by the assembly
  fmt: ShardFormat
  what: str  # what the directory holds ("a scored cache")
  dir_key: str  # the config key naming the directory ("data.cache_dir")

  @functools.cached_property
  def digest(self) -> str:
    return hashing.hash_json(self.components)

  def path(self, key: Key) -> str:
    return os.path.join(self.out_dir, "work", f"{key[0]}-{key[1]:05d}.{self.fmt.ext}")

  def done(self) -> bool:
    """True when the job is complete with this digest; refuses a directory completed from other inputs."""
    path = os.path.join(self.out_dir, self.marker)
    if not os.path.exists(path):
      return False
    with open(path) as f:
      found = json.load(f).get("hash")
    if found != self.digest:
      raise errors.StaleCacheError(f"{self.out_dir} already holds {self.what} of other inputs (hash {str(found)[:16]}, "
                                   f"this config {self.digest[:16]}); choose another {self.dir_key} or delete it")
    log.info("%s in %s is complete and current", self.what, self.out_dir)
    return True

  def start(self) -> None:
    """Create work/ and drop writes interrupted before their rename (process 0 only: not another's live write)."""
    work = os.path.join(self.out_dir, "work")
    os.makedirs(work, exist_ok=True)
    import jax  # pylint: disable=g-import-not-at-top
    for name in os.listdir(work) if jax.process_index() == 0 else ():
      if storage.is_temporary(name):
        os.remove(os.path.join(work, name))
    barrier(f"{self.name} start")

  def read(self, key: Key) -> Any:
    """The shard, or None when it is absent, damaged or of another digest (then it is redone)."""
    path = self.path(key)
    if not os.path.exists(path):
      return None
    try:
      return self.fmt.loads(path, self.digest)
    except Exception as e:  # pylint: disable=broad-except  (a damaged file is redone, not fatal)
      log.warning("work shard %s is unreadable (%s); it will be redone", path, e)
      return None

  def write(self, key: Key, payload: Any) -> None:
    storage.write_bytes(self.path(key), self.fmt.dumps(payload, self.digest))

  def mine(self, keys: Sequence[Key]) -> list[Key]:
    """This process's unfinished shards: key n is process n % N's, whether or not another has finished it."""
    import jax  # pylint: disable=g-import-not-at-top
    pid, count = jax.process_index(), jax.process_count()
    for prefix in dict.fromkeys(k[0] for k in keys):  # a lost peer's one line counts the complete ones
      peers.keep_shards(self.out_dir, self.digest, self.fmt.ext, prefix, sum(k[0] == prefix for k in keys))
    return [key for n, key in enumerate(keys) if n % count == pid and self.read(key) is None]

  def shards(self, keys: Sequence[Key]) -> Iterator[Any]:
    """Every shard, in order, for the assembly (all must exist by then)."""
    for key in keys:
      shard = self.read(key)
      if shard is None:
        raise RuntimeError(f"work shard {self.path(key)} is missing at assembly")
      yield shard

  def finish(self, assemble: Callable[[], None]) -> None:
    """Once every process has written its shards, process 0 runs `assemble` (which writes the marker last)."""
    import jax  # pylint: disable=g-import-not-at-top
    barrier(f"{self.name} shards")
    if jax.process_index() == 0:
      assemble()
    barrier(f"{self.name} assembled")


def barrier(name: str) -> None:
  """Wait until every process of the job reaches the barrier `name`; nothing for a single process."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def process_zero_first(name: str, build: Callable[[], T]) -> T:
  """`build()` on process 0, then on the others once it is done: for a build into shared storage that is reused when
  already there (the others reuse it rather than race to write the same directory). One process: just `build()`."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    out = build()
    barrier(name)
    return out
  barrier(name)
  return build()
