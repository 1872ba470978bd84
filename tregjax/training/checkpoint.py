"""Orbax checkpoints of the whole run: TrainState, every process's data-iterator state, and run metadata.

Orbax writes each step into a temporary directory and renames it when complete (on object storage, which has no
rename, it writes a commit_success file last and lists only committed steps), so a process killed during a save
leaves the previous checkpoint as the latest usable one. The directory may be a storage URI (gs://...): Orbax and
tensorstore write it directly, never through a local path. Restoring takes the *current* TrainState's shardings as the
target, so a checkpoint written on one mesh / device count restores onto another.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from tregjax import parallel, storage

log = logging.getLogger("tregjax.checkpoint")


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit this run (another model shape, objective or process count)."""


def _encode(state: Any) -> Any:
  """A data-iterator state as JSON (grain iterators return dicts, or JSON bytes for DataLoader iterators)."""
  if isinstance(state, bytes):
    return {"__bytes__": base64.b64encode(state).decode("ascii")}
  return state


def _decode(state: Any) -> Any:
  if isinstance(state, dict) and set(state) == {"__bytes__"}:
    return base64.b64decode(state["__bytes__"])
  return state


def _gather_strings(text: str) -> list[str]:
  """Every process's string, on every process (each process's iterator state differs: its own shard)."""
  if jax.process_count() == 1:
    return [text]
  raw = np.frombuffer(text.encode("utf-8"), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [bytes(row[:n]).decode("utf-8") for row, n in zip(rows, lengths)]


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Parameter path -> shape of every array leaf (what a saved and a live state are compared by)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {parallel.path_str(p): tuple(leaf.shape) for p, leaf in flat if getattr(leaf, "shape", None) is not None}


# Largest chunk tensorstore writes (bytes as saved): a reader that wants part of an array (export: one layer of a
# stacked parameter, or a whole embedding decoded chunk by chunk into its cast) decodes at most this much of it at once.
CHUNK_BYTES = 16 * 2**20


def is_stacked(path: tuple) -> bool:
  """A leaf of the scanned decoder stack (every array under a `layers` key, leading axis = layer), in the params and
  in the optimizer moments alike."""
  return "layers" in path


def save_args(state: Any) -> Any:
  """Orbax SaveArgs of every leaf: a stacked leaf is chunked one layer per chunk (`shard_axes=(0,)`), and no chunk is
  larger than CHUNK_BYTES, so the export reads one layer at a time (`StreamedLeaf`), never a whole [L, ...] leaf.
  Only the storage layout changes: every value restores bitwise as before."""
  def one(path, leaf):
    shape = getattr(leaf, "shape", None)
    if not shape or not jax.numpy.issubdtype(leaf.dtype, jax.numpy.number):
      return ocp.SaveArgs()
    if int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize <= CHUNK_BYTES:
      return ocp.SaveArgs()  # one chunk: read whole, it is small
    per_layer = is_stacked(tuple(_key(k) for k in path)) and len(shape) > 1
    return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if per_layer else ())
  return jax.tree_util.tree_map_with_path(one, state)


class Checkpointer:
  """CheckpointManager with the run's items: `state` (arrays), `data` (iterator states), `meta` (JSON)."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    """`directory`: a local path or a storage URI (gs://...), which Orbax writes and restores directly."""
    self.directory = storage.resolve(directory, "checkpoint directory")
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    if jax.process_index() == 0:
      latest = self.latest_step()
      for step in self.unfinished_steps():
        log.warning("checkpoint: skipping step %d under %s: its save did not finish (a process killed while saving); "
                    "%s", step, self.directory, "no earlier step to resume from" if latest is None else
                    f"resuming from step {latest}, and step {step} is written again when reached")

  def unfinished_steps(self) -> list[int]:
    """Steps whose save began but never committed (Orbax never restores them): a local `N.orbax-checkpoint-tmp-*`
    directory, or on object storage a step directory without Orbax's commit_success.txt."""
    if not storage.exists(self.directory):
      return []
    committed = set(self.all_steps())
    out = set()
    for name in storage.listdir(self.directory):
      head = name.split(".", 1)[0]
      if head.isdigit() and int(head) not in committed and (name != head or storage.is_uri(self.directory)):
        out.add(int(head))
    return sorted(out)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, meta: dict, *, force: bool = False) -> bool:
    """Save (asynchronously) if `step` is due or `force`; every process must call this with the same step."""
    if not force and step % self.every:
      return False
    states = [json.loads(s) for s in _gather_strings(json.dumps(_encode(data_state)))]
    args = ocp.args.Composite(state=ocp.args.StandardSave(state, save_args=save_args(state)),
                              data=ocp.args.JsonSave({"process_states": states}),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=True)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def check_compatible(self, step: int, target_state: Any) -> None:
    """Raise CheckpointMismatchError naming the first array whose saved shape differs from this run's."""
    saved = self.manager.item_metadata(step).state
    saved_tree = saved.tree if hasattr(saved, "tree") else saved
    have = tree_shapes(saved_tree)
    want = tree_shapes(target_state)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    where = storage.join(self.directory, str(step))
    if missing or extra:
      raise CheckpointMismatchError(
          f"checkpoint {where} does not match this model: arrays missing from it {missing[:5]}, arrays this run "
          f"does not have {extra[:5]} (another model shape or objective? use a fresh --workdir)")
    for name, shape in want.items():
      if have[name] != shape:
        raise CheckpointMismatchError(
            f"checkpoint {where}: {name} has shape {list(have[name])} but this run's model needs {list(shape)} "
            "(a checkpoint from another model shape; use a fresh --workdir or the matching config)")

  def restore_params(self, step: int, target_state: Any, dtype: Any = None, *,
                     streamed: bool = False) -> tuple[Any, Any]:
    """(params, extra) of step `step` as host numpy arrays, nothing else: the optimizer moments are never read.

    Orbax's partial restore of the `state` item's `params` and `extra` subtrees; floating arrays are cast to `dtype`
    as tensorstore reads them (None: as saved), so a bf16 export of a float32 checkpoint never holds the moments
    (6x its bf16 bytes) and no device memory at all. `streamed` (export): each leaf of `params` is a `StreamedLeaf`
    that reads its array only when indexed, and at most one of them holds its array at a time: a writer that takes
    the tensors leaf by leaf needs one leaf's bytes (as read, plus its cast), not the whole model's; a stacked leaf
    saved one layer per chunk (`save_args`) is read one layer at a time (`x[i]`). Restoring every leaf at once
    instead decodes all of them in float32 together (bench/export_memory.py).
    """
    self.check_compatible(step, target_state)
    item = {"params": target_state.params, "extra": target_state.extra}
    directory = storage.join(self.directory, str(step), "state")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), item)
    if not streamed:
      out = _restore_host(directory, abstract, dtype)
      return out["params"], out["extra"]
    extra = abstract["extra"]
    if jax.tree.leaves(extra):
      extra = _restore_host(directory, {"extra": extra}, dtype)["extra"]
    slot = _OneLeaf()
    reader = _ArrayReader(directory, dtype)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract["params"])
    streamed_leaves = [StreamedLeaf(leaf.shape, _cast_dtype(leaf.dtype, dtype), slot, reader,
                                    ".".join(str(k) for k in ("params",) + tuple(_key(k) for k in path)))
                       for path, leaf in flat]
    return treedef.unflatten(streamed_leaves), extra

  def restore(self, step: int, target_state: Any) -> tuple[Any, Any, dict]:
    """(state placed like `target_state`, this process's data-iterator state, meta)."""
    self.check_compatible(step, target_state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target_state)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             data=ocp.args.JsonRestore(),
                                                             meta=ocp.args.JsonRestore()))
    states = out.data["process_states"]
    if len(states) != jax.process_count():
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} holds data-iterator states of {len(states)} processes, this run has "
          f"{jax.process_count()}; resume with the same number of processes")
    return out.state, _decode(states[jax.process_index()]), out.meta

  def reached_preemption(self, step: int) -> bool:
    """True on every process once jax's multi-host preemption notice (SIGTERM via the coordinator) has arrived."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _cast_dtype(saved: Any, dtype: Any) -> np.dtype:
  """The dtype a leaf is restored as: `dtype` for floating leaves (None: as saved), integers as saved."""
  cast = dtype is not None and jax.numpy.issubdtype(saved, jax.numpy.floating)
  return np.dtype(dtype) if cast else np.dtype(saved)


def _restore_host(directory: str, abstract: Any, dtype: Any) -> Any:
  """Orbax partial restore of the `abstract` subtree (ocp.PLACEHOLDER leaves are skipped) into host numpy arrays,
  floating leaves cast to `dtype` as tensorstore reads them."""
  def restore_arg(leaf):
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=_cast_dtype(leaf.dtype, dtype))
  return ocp.PyTreeCheckpointer().restore(
      storage.epath(directory), args=ocp.args.PyTreeRestore(item=abstract, restore_args=jax.tree.map(
          restore_arg, abstract), partial_restore=True))


def _key(k: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  raise TypeError(f"unexpected pytree key {k!r}")


class _ArrayReader:
  """The checkpoint's arrays opened through tensorstore directly (the OCDBT + zarr layout Orbax writes), with no
  chunk cache and one decode thread: a read holds the chunks it decodes, one at a time, and its result, nothing else.
  Floating arrays are cast to `dtype` as read (None: as saved)."""

  def __init__(self, directory: str, dtype: Any):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    meta = storage.read_json(storage.join(directory, "_METADATA"))
    self._ts, self._dtype = ts, dtype
    self._driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    if not meta.get("use_ocdbt", True):
      raise ValueError(f"{directory}: a checkpoint written without OCDBT; this export reads Orbax's OCDBT layout")
    base = directory if storage.is_uri(directory) else "file://" + os.path.abspath(storage.local(directory))
    self._base = base.rstrip("/") + "/"
    self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "cache_pool#ocdbt": {"total_bytes_limit": 0},
                                "data_copy_concurrency": {"limit": 1}})
    self.chunk_bytes: dict[str, int] = {}  # array name -> bytes of one chunk as saved
    self.noted = False  # the note on a checkpoint written before per-layer chunks was logged

  def open(self, name: str) -> Any:
    spec = {"driver": self._driver, "kvstore": {"driver": "ocdbt", "base": self._base, "path": name},
            "recheck_cached_data": False, "recheck_cached_metadata": False}
    array = self._ts.open(spec, context=self._context, read=True).result()
    chunk = array.chunk_layout.read_chunk.shape
    self.chunk_bytes[name] = int(np.prod(chunk)) * array.dtype.numpy_dtype.itemsize if chunk else 0
    if self._dtype is not None and np.issubdtype(array.dtype.numpy_dtype, np.floating):
      array = self._ts.cast(array, self._ts.dtype(np.dtype(self._dtype).name))
    return array


class _OneLeaf:
  """The one StreamedLeaf array held in memory (shared by a checkpoint's leaves): loading another drops it first."""

  def __init__(self):
    self.owner: Any = None
    self.array: np.ndarray | None = None

  def release(self) -> None:
    self.owner = self.array = None

  def get(self, owner: "StreamedLeaf") -> np.ndarray:
    if self.owner is not owner:
      self.release()  # free the previous leaf before reading the next
      self.array = owner.read()
      self.owner = owner
    return self.array


class StreamedLeaf:
  """A checkpoint array read from storage when indexed (`x[i]`, `np.asarray(x)`); `shape` and `dtype` (the dtype
  it is read as) are known without reading it. For export: see `Checkpointer.restore_params(streamed=True)`.

  `x[i]` (an integer: one layer of a stacked leaf) reads only that layer when the checkpoint stores the leaf one
  layer per chunk (`save_args`); a checkpoint written before that (one chunk per leaf) is read whole once, held
  until another leaf is read, and sliced."""

  def __init__(self, shape: tuple[int, ...], dtype: np.dtype, slot: _OneLeaf, reader: _ArrayReader, name: str):
    self.shape, self.dtype, self._slot, self._reader, self.name = tuple(shape), dtype, slot, reader, name
    self.ndim, self.size = len(self.shape), int(np.prod(self.shape, dtype=np.int64))
    self._array: Any = None

  def _store(self) -> Any:
    if self._array is None:
      self._array = self._reader.open(self.name)
      if tuple(self._array.shape) != self.shape:
        raise ValueError(f"checkpoint array {self.name} has shape {list(self._array.shape)}, expected "
                         f"{list(self.shape)}")
    return self._array

  def per_layer(self) -> bool:
    """True when one layer (`x[i]`) is a whole number of chunks: reading it decodes nothing of the other layers."""
    chunk = self._store().chunk_layout.read_chunk.shape
    return self.ndim > 1 and chunk is not None and chunk[0] == 1

  def read(self) -> np.ndarray:
    """The whole array (through `_OneLeaf`, which holds one at a time)."""
    store = self._store()
    if not self._reader.noted and self._reader.chunk_bytes[self.name] > CHUNK_BYTES:
      self._reader.noted = True
      log.info("export: %s is stored in chunks of %d MiB (a checkpoint written before chunks of at most %d MiB, one "
               "layer each): such leaves are read whole, so the export's peak memory grows by the largest of them",
               self.name, self._reader.chunk_bytes[self.name] >> 20, CHUNK_BYTES >> 20)
    return np.asarray(store.read().result())

  def __getitem__(self, index: Any) -> np.ndarray:
    if isinstance(index, (int, np.integer)) and self.per_layer():
      self._slot.release()  # only this layer is in memory
      return np.asarray(self._store()[int(index)].read().result())
    return self._slot.get(self)[index]

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    x = self._slot.get(self)
    return x if dtype is None else x.astype(dtype)

  def __repr__(self) -> str:
    return f"StreamedLeaf({self.name}, shape={self.shape}, dtype={self.dtype})"
