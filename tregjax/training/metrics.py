"""Metric sinks (TensorBoard event files + metrics.jsonl, process 0 only) and the FLOP count behind MFU."""

from __future__ import annotations

import json
import math
from typing import Any

import jax

from tregjax import storage

GiB = 2 ** 30

# Per device kind, matched as case-insensitive substrings of `device.device_kind` (first match wins: "TPU v6" matches
# "TPU v6 lite", "L40S" comes before "L4" which it contains): the dense bf16 peak FLOP/s per device (vendor datasheets;
# no sparsity), the one table behind MFU (the trainer's and the benches'), and the memory of one chip (HBM; GPUs in
# datasheet GB, TPUs in the GiB Cloud TPU's docs list), which `tregjax.compile` holds a compiled step against.
ACCELERATORS = (
    # device kind   bf16 FLOP/s  memory bytes per chip
    ("H200", 989e12, 141e9),
    ("H100", 989e12, 80e9),  # SXM; the PCIe part is 756e12
    ("A100", 312e12, 80e9),  # the 40 GB part too
    ("L40S", 362e12, 48e9),
    ("L4", 121e12, 24e9),
    ("TPU v6", 918e12, 32 * GiB),  # v6e (Trillium)
    ("TPU v5p", 459e12, 95 * GiB),
    ("TPU v5 lite", 197e12, 16 * GiB),  # v5e's device_kind
    ("TPU v5e", 197e12, 16 * GiB),
    ("TPU v5", 459e12, 95 * GiB),  # v5p's device_kind (after the "TPU v5 lite" rows it would also match)
    ("TPU v4", 275e12, 32 * GiB),
)


def _lookup(device_kind: str | None, column: int) -> float | None:
  kind = jax.devices()[0].device_kind if device_kind is None else device_kind
  for row in ACCELERATORS:
    if row[0].lower() in kind.lower():
      return row[column]
  return None


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
  """The bf16 peak of this device kind, or None when unknown (then MFU is not reported)."""
  return _lookup(device_kind, 1)


def chip_memory_bytes(device_kind: str | None = None) -> float | None:
  """The HBM of one chip of this device kind (`ACCELERATORS`), or None when unknown."""
  return _lookup(device_kind, 2)


def matmul_params(cfg: Any) -> int:
  """Parameters that take part in a matmul per token: attention and MLP projections of every layer + the unembedding.

  The embedding lookup is a gather (no FLOPs); norms and biases are negligible.
  """
  d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  attn = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d
  mlp = 3 * d * f
  head = d * (cfg.num_labels if cfg.num_labels else cfg.vocab_size)
  return cfg.num_layers * (attn + mlp) + head


def forward_flops_per_token(cfg: Any, seq_len: int) -> float:
  """Model FLOPs of one token's forward at sequence length `seq_len`:

    2 · N_matmul + 4 · L · n_heads · head_dim · T

  2 FLOPs per multiply-add of every matmul weight (`matmul_params`), plus the QKᵀ and AV matmuls over the full T×T
  score matrix (not halved for causality, as in PaLM/MaxText). The one count behind forward MFU (bench/forward.py)
  and, ×3, training MFU.
  """
  return 2.0 * matmul_params(cfg) + 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def train_flops_per_token(cfg: Any, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward), PaLM appendix B:

    6 · N_matmul + 12 · L · n_heads · head_dim · T  =  3 · forward_flops_per_token

  ×3 for forward + backward (activation and weight gradients). Recomputation under remat is not counted: this is
  MFU, not hardware FLOPs utilisation.
  """
  return 3.0 * forward_flops_per_token(cfg, seq_len)


class MetricsWriter:
  """Append scalars to `<workdir>/metrics.jsonl` and TensorBoard event files; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, jsonl: bool = True, enabled: bool | None = None,
               resume_step: int | None = None):
    """`resume_step`: the step the run restarts from (0 when fresh); lines of later steps, which a killed run wrote
    after its last checkpoint and the resumed run writes again, are dropped first, so readers see one trajectory."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.jsonl_path = storage.join(workdir, "metrics.jsonl")
    self.tensorboard_dir = storage.join(workdir, "tensorboard")
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    storage.makedirs(workdir)
    if jsonl and resume_step is not None:
      drop_after(self.jsonl_path, resume_step)
    if jsonl:
      self._jsonl = storage.TextLog(self.jsonl_path)
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      if storage.is_uri(self.tensorboard_dir):
        _register_uri_event_files()
      self._tb = SummaryWriter(self.tensorboard_dir)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {}
    for k, v in scalars.items():
      v = float(v)
      clean[k] = v if math.isfinite(v) else str(v)
      if self._tb is not None:
        self._tb.add_scalar(k, v, step)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
      self._jsonl.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def drop_after(path: str, step: int) -> int:
  """Rewrite metrics.jsonl (atomically) without the lines of steps > `step` and any torn last line (a kill mid-write);
  returns how many lines were dropped. A missing file is fine."""
  if not storage.exists(path):
    return 0
  lines = storage.read_text(path).splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if line.endswith("\n") and isinstance(record, dict) and int(record.get("step", 0)) <= step:
      keep.append(line)
  if len(keep) != len(lines):
    storage.write_text(path, "".join(keep))
  return len(lines) - len(keep)


def read_jsonl(path: str) -> list[dict]:
  """All records of a metrics.jsonl (for tests and tools)."""
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


class _UriEventFile:
  """A TensorBoard event file on object storage (which cannot append): the whole file is rewritten, atomically
  through `storage.write_bytes`, at each of tensorboardX's flushes (every flush_secs and at close)."""

  def __init__(self, path: str):
    self.path, self._data, self._written = path, bytearray(), -1

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    if len(self._data) != self._written:
      storage.write_bytes(self.path, bytes(self._data))
      self._written = len(self._data)

  def close(self) -> None:
    self.flush()


class _UriEventFiles:
  """tensorboardX's writer factory for every scheme `storage` serves (instead of its own boto3 / google-cloud-storage
  writers, which bring their own credentials lookup): one storage layer for every file a run writes."""

  def open(self, path: str) -> _UriEventFile:
    return _UriEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object storage has no directories to create


def _register_uri_event_files() -> None:
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  for scheme in storage.BACKENDS:
    record_writer.register_writer_factory(scheme, _UriEventFiles())
