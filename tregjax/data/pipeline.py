"""grain pipeline: a tokenized or scored TFDS dataset -> `PreferenceBatch`es of numpy arrays.

Batching is planned on record indices, per epoch, from the records' lengths alone:
  * shuffle: a permutation seeded by (seed, epoch), so the same seed gives the same order on every host;
  * buckets: each pair goes to the smallest bucket length >= its longer row; a global batch holds pairs of ONE bucket,
    so jit sees at most `len(buckets)` shapes. With `fit_buckets` (the default) each bucket then shrinks to the
    longest row it actually holds, rounded up to a multiple of FIT_MULTIPLE: the ladder (64, 128, 256, 512) pads a
    split whose pairs run 130-170 tokens to 176, not 256 (same number of shapes, so no extra compiles);
  * packing (optional): pairs are first-fit packed into rows of the largest bucket (chosen and rejected rows hold the
    same pairs in the same segment order); rows are packed once per seed and shuffled per epoch;
  * sharding: every global batch (`global_batch_size` rows, same T on all hosts) is split into `process_count`
    contiguous slices; process p gets slice p. Shards are disjoint and, with drop_remainder=False, cover the data.
Because a batch is a pure function of (seed, epoch, batch index), the iterator state is one integer per worker and
restoring it continues exactly. Rows of a short final batch (drop_remainder=False) are all padding: their
`loss_mask` and `segment_ids` are zero, and consumers must weight them out.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from tregjax.data import tfds_builder
from tregjax.data.batch import PreferenceBatch, SequenceBatch, pack_sequences

_PER_TOKEN = {"chosen": ("ref_chosen_token_logps", "chosen_token_rewards"),
              "rejected": ("ref_rejected_token_logps", "rejected_token_rewards")}


FIT_MULTIPLE = 8  # a fitted bucket's length is a multiple of this (whole 8-lane f32 vectors on AVX2 and most TPUs)


def bucket_of(length: int, buckets: Sequence[int], *, extend: bool = False) -> int:
  """The smallest bucket >= `length`, whatever the order of `buckets`.

  A length past the largest bucket is an error by default (the trainer's batches: every shape is a bucket, so such
  a row means the buckets do not cover data.max_length); with `extend` it gets the next multiple of the largest
  bucket (the scoring pass and generation, whose rows may be longer, with shapes still bounded).
  """
  fits = [b for b in buckets if length <= b]
  if fits:
    return min(fits)
  top = max(buckets)
  if extend:
    return -(-length // top) * top
  raise ValueError(f"a row of {length} tokens exceeds the largest bucket {top}; add a bucket >= the "
                   f"dataset's max_length")


def fitted_buckets(longest: Sequence[int], buckets: Sequence[int], steps: int | None = None) -> dict[int, int]:
  """Bucket -> the longest of `longest` that lands in it, rounded up to FIT_MULTIPLE (never above the bucket).

  `steps`: round up to max(FIT_MULTIPLE, bucket // steps) instead, so that callers fitting many small groups
  separately (the scoring pass, shard by shard) see at most `steps` lengths per bucket, not one per group. Only
  buckets that hold a row appear; rows longer than the largest bucket are left out (the caller's rule applies).
  """
  fitted: dict[int, int] = {}
  top = max(buckets)
  for m in longest:
    if m <= top:
      b = bucket_of(int(m), buckets)
      quantum = max(FIT_MULTIPLE, b // steps) if steps else FIT_MULTIPLE
      fitted[b] = max(fitted.get(b, 0), min(b, -(-int(m) // quantum) * quantum))
  return fitted


def pack_rows(lengths: np.ndarray, capacity: int, order: np.ndarray, lookback: int = 64,
              max_segments: int | None = None) -> list[list[int]]:
  """First-fit packing of pairs into rows: a pair fits when both its chosen and its rejected row fit.

  Only the last `lookback` open rows are searched (linear time, near-optimal fill for shuffled lengths). A row
  holding `max_segments` pairs is full (the trainer's step has that many static segment slots).
  """
  rows: list[list[int]] = []
  room: list[list[int]] = []
  for i in order:
    c, r = int(lengths[i, 0]), int(lengths[i, 1])
    if max(c, r) > capacity:
      raise ValueError(f"record {i} ({max(c, r)} tokens) does not fit a packed row of {capacity}")
    for k in range(max(0, len(rows) - lookback), len(rows)):
      if room[k][0] >= c and room[k][1] >= r and (max_segments is None or len(rows[k]) < max_segments):
        rows[k].append(int(i))
        room[k][0] -= c
        room[k][1] -= r
        break
    else:
      rows.append([int(i)])
      room.append([capacity - c, capacity - r])
  return rows


class BatchPlan:
  """Which records form each process-local batch of each epoch (pure function of its arguments)."""

  def __init__(self, lengths: np.ndarray, *, global_batch_size: int, buckets: Sequence[int], seed: int, shuffle: bool,
               packing: bool, drop_remainder: bool, process_index: int, process_count: int,
               max_segments: int | None = None, fit_buckets: bool = False):
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
    self.lengths = np.asarray(lengths, np.int32).reshape(-1, 2)
    self.buckets = tuple(sorted(buckets))
    self.global_batch_size, self.seed, self.shuffle = global_batch_size, seed, shuffle
    self.packing, self.drop_remainder = packing, drop_remainder
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = global_batch_size // process_count
    n = len(self.lengths)
    if packing:
      order = np.random.default_rng([seed, 1]).permutation(n) if shuffle else np.arange(n)
      self.units = pack_rows(self.lengths, self.buckets[-1], order, max_segments=max_segments)
      self.unit_bucket = np.full(len(self.units), self.buckets[-1], np.int64)
    else:
      self.units = [[i] for i in range(n)]
      longest = self.lengths.max(axis=1) if n else np.zeros(0, np.int32)
      self.unit_bucket = np.array([bucket_of(int(m), self.buckets) for m in longest], np.int64)
      if fit_buckets and n:  # each bucket -> its longest row, rounded up (a pure function of the lengths)
        fitted = fitted_buckets(longest.tolist(), self.buckets)
        self.unit_bucket = np.array([fitted[b] for b in self.unit_bucket.tolist()], np.int64)
        self.buckets = tuple(sorted(set(fitted.values())))
    counts = [int(np.sum(self.unit_bucket == b)) for b in self.buckets]
    g = global_batch_size
    self.batches_per_epoch = sum(c // g if drop_remainder else -(-c // g) for c in counts)
    if self.batches_per_epoch == 0:
      raise ValueError(f"{n} records give no batch of {g} (buckets {self.buckets}, drop_remainder={drop_remainder})")

  @functools.lru_cache(maxsize=2)
  def epoch(self, epoch: int) -> list[tuple[int, list[int]]]:
    """Global batches of an epoch: (bucket length, unit indices; -1 = padding row)."""
    g = self.global_batch_size
    rng = np.random.default_rng([self.seed, 2, epoch])
    order = rng.permutation(len(self.units)) if self.shuffle else np.arange(len(self.units))
    batches = []
    for b in self.buckets:
      members = order[self.unit_bucket[order] == b].tolist()
      for start in range(0, len(members), g):
        chunk = members[start:start + g]
        if len(chunk) < g:
          if self.drop_remainder:
            continue
          chunk = chunk + [-1] * (g - len(chunk))
        batches.append((b, chunk))
    if self.shuffle:
      batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches

  def local(self, index: int) -> tuple[int, list[list[int]]]:
    """Process-local batch `index` (over all epochs): its T and, per row, the record indices it holds."""
    epoch, k = divmod(index, self.batches_per_epoch)
    length, units = self.epoch(epoch)[k]
    mine = units[self.process_index * self.local_batch_size:(self.process_index + 1) * self.local_batch_size]
    return length, [self.units[u] if u >= 0 else [] for u in mine]


class BatchLoader:
  """Turns a batch index into a PreferenceBatch; picklable (opens the data source lazily in each worker)."""

  def __init__(self, dataset_dir: str, split: str, plan: BatchPlan, scored: bool, pad_id: int):
    self.dataset_dir, self.split, self.plan, self.scored, self.pad_id = dataset_dir, split, plan, scored, pad_id
    self._source = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  @property
  def source(self):
    if self._source is None:
      self._source = tfds_builder.data_source(self.dataset_dir, self.split)
    return self._source

  def __call__(self, index: int, _: Any = None) -> PreferenceBatch:
    length, rows = self.plan.local(index)
    records = {i: self.source[i] for row in rows for i in row}
    return collate(rows, records, length, self.scored, self.pad_id)


def collate(rows: list[list[int]], records: dict[int, dict[str, Any]], length: int, scored: bool,
            pad_id: int = 0) -> PreferenceBatch:
  """Lay out rows of records (each row: record indices, packed back to back) into a PreferenceBatch [B, T]."""
  sides: dict[str, dict[str, list[np.ndarray]]] = {"chosen": {}, "rejected": {}}
  seq_logps = {"chosen": [], "rejected": []}
  for row in rows:
    for side in ("chosen", "rejected"):
      seqs, total = [], 0.0
      for i in row:
        ex = records[i]
        prompt = np.asarray(ex["prompt_ids"], np.int32)
        ids = np.concatenate([prompt, np.asarray(ex[f"{side}_ids"], np.int32)])
        per_token = {}
        if scored:
          for name in _PER_TOKEN[side]:
            per_token[name] = np.asarray(ex[name], np.float32)
          total += float(ex[f"ref_{side}_logps"])
        seqs.append((ids, len(prompt), per_token))
      fields, _ = pack_sequences(seqs, length, pad_id=pad_id)
      for name in ("tokens", "labels", "loss_mask", "segment_ids", "positions") + _PER_TOKEN[side]:
        value = fields.get(name, np.zeros(length, np.float32))
        sides[side].setdefault(name, []).append(value)
      seq_logps[side].append(total)

  def seq(side):
    s = sides[side]
    return SequenceBatch(tokens=np.stack(s["tokens"]), labels=np.stack(s["labels"]),
                         loss_mask=np.stack(s["loss_mask"]), segment_ids=np.stack(s["segment_ids"]),
                         positions=np.stack(s["positions"]))

  return PreferenceBatch(
      chosen=seq("chosen"), rejected=seq("rejected"),
      ref_chosen_logps=np.asarray(seq_logps["chosen"], np.float32),
      ref_rejected_logps=np.asarray(seq_logps["rejected"], np.float32),
      ref_chosen_token_logps=np.stack(sides["chosen"]["ref_chosen_token_logps"]),
      ref_rejected_token_logps=np.stack(sides["rejected"]["ref_rejected_token_logps"]),
      chosen_token_rewards=np.stack(sides["chosen"]["chosen_token_rewards"]),
      rejected_token_rewards=np.stack(sides["rejected"]["rejected_token_rewards"]))


class PreferenceIterator:
  """Iterator of process-local PreferenceBatches with a JSON-able, restorable state."""

  def __init__(self, dataset: grain.IterDataset, plan: BatchPlan, num_epochs: int | None):
    self._dataset = dataset
    self._iter = iter(dataset)
    self.plan = plan
    self.batches_per_epoch = plan.batches_per_epoch
    self.num_epochs = num_epochs

  def __iter__(self):
    return self

  def __len__(self) -> int:
    """Batches per epoch (the iterator itself runs for `num_epochs`, forever when None)."""
    return self.batches_per_epoch

  def __next__(self) -> PreferenceBatch:
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    """JSON-able state (the trainer saves it with Orbax, e.g. as `ocp.args.JsonSave`)."""
    return json.loads(json.dumps(self._iter.get_state()))

  def set_state(self, state: dict[str, Any]) -> None:
    self._iter.set_state(state)


def make_iterator(dataset: str | ml_collections.ConfigDict, split: str = "train", *,
                  global_batch_size: int | None = None, buckets: Sequence[int] | None = None, seed: int | None = None,
                  shuffle: bool | None = None, packing: bool | None = None, drop_remainder: bool | None = None,
                  num_epochs: int | None = None, process_index: int | None = None, process_count: int | None = None,
                  num_workers: int | None = None, prefetch: int = 2, objective: str = "",
                  max_segments: int | None = None, fit_buckets: bool | None = None) -> PreferenceIterator:
  """Batches of a dataset written by `build_dataset` (unscored: ref/reward fields are zeros) or `tregjax.score`.

  Args:
    dataset: a dataset directory (build_dataset's / score.run's return value, or the data_dir / cache_dir they
      wrote into), or the trainer's `config.data` section: then the directory is `cache_dir` for
      objective="preference" (which must be scored) and `dataset_dir or cache_dir` otherwise, and every
      argument left None comes from the section (batch_size, buckets, seed, shuffle, packing, drop_remainder,
      num_workers, max_segments).
    global_batch_size: pairs (packed: rows) per step over all processes; each process yields its 1/process_count.
    buckets: padded lengths T; a pair's rows must fit the largest. Packing packs into rows of the largest.
    fit_buckets: shrink each bucket to the longest row it holds (rounded up to FIT_MULTIPLE); unpacked batches only.
    num_epochs: None = forever.
    process_index, process_count: default to jax.process_index() / jax.process_count().
    num_workers: grain worker processes (0 = in this process, with a prefetch thread).
    max_segments: with packing, at most this many pairs per row (None = as many as fit).
  """
  if isinstance(dataset, ml_collections.ConfigDict):
    d = dataset
    dataset_dir = d.cache_dir if objective == "preference" else (d.get("dataset_dir", "") or d.cache_dir)
    if not dataset_dir:
      raise ValueError(f"config.data names no dataset for objective={objective!r} (set cache_dir or dataset_dir)")
    pick = lambda value, key, default: value if value is not None else d.get(key, default)  # noqa: E731
    global_batch_size = pick(global_batch_size, "batch_size", None)
    buckets, seed = pick(buckets, "buckets", (512, 1024, 2048)), pick(seed, "seed", 0)
    shuffle, packing = pick(shuffle, "shuffle", True), pick(packing, "packing", False)
    drop_remainder = pick(drop_remainder, "drop_remainder", True)
    num_workers = pick(num_workers, "num_workers", 0)
    max_segments = pick(max_segments, "max_segments", None)
    fit_buckets = pick(fit_buckets, "fit_buckets", False)
  else:
    dataset_dir = dataset
  if global_batch_size is None:
    raise ValueError("make_iterator needs global_batch_size")
  buckets = (512, 1024, 2048) if buckets is None else tuple(buckets)
  seed, shuffle = seed or 0, True if shuffle is None else shuffle
  packing, drop_remainder = bool(packing), True if drop_remainder is None else drop_remainder
  num_workers = num_workers or 0
  dataset_dir = tfds_builder.resolve(dataset_dir)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, {process_count})")
  meta = tfds_builder.read_metadata(dataset_dir)
  if objective == "preference" and meta.get("kind") != "scored":
    raise ValueError(f"objective=preference needs a scored cache (python -m tregjax.score); {dataset_dir} is "
                     f"{meta.get('kind')!r}")
  lengths = tfds_builder.lengths(dataset_dir, split)
  plan = BatchPlan(lengths, global_batch_size=global_batch_size, buckets=buckets, seed=seed, shuffle=shuffle,
                   packing=packing, drop_remainder=drop_remainder, process_index=process_index,
                   process_count=process_count, max_segments=max_segments, fit_buckets=bool(fit_buckets))
  loader = BatchLoader(dataset_dir, split, plan, scored=meta.get("kind") == "scored", pad_id=int(meta.get("pad_id", 0)))
  # Elements are within-epoch indices; the loader reads the global index (epoch * batches_per_epoch + k).
  ds = grain.MapDataset.range(plan.batches_per_epoch).repeat(num_epochs).map_with_index(loader)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if num_workers else 2, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app, use their defaults.
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return PreferenceIterator(iter_ds, plan, num_epochs)
