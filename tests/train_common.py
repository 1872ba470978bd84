"""Helpers for the trainer tests: a tiny config and a deterministic in-memory preference data source.

The data source stands in for the grain pipeline where a test needs batches it can re-derive independently (the
golden side of a comparison); it has the pipeline's interface: iterator of PreferenceBatch (this process's rows),
get_state()/set_state(), len(). Also runnable as a worker: `python tests/train_common.py WORKDIR [key=value ...]`
trains with it (the subprocess tests: fake devices, kills, SIGTERM, several processes).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

VOCAB = 128
NUM_PAIRS = 64


def tiny_config(**overrides):
  """A 2-layer Llama (width 32, vocab 128) DPO run on 16-token rows; `overrides` are dotted keys."""
  from tregjax.training import config as config_lib
  c = config_lib.base_config()
  c.model.preset = "tiny_llama"
  c.model.overrides = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                           num_kv_heads=1, head_dim=16, max_position_embeddings=64)
  c.model.dtype = "float32"  # CPU tests compare trajectories: keep compute in f32
  c.data.batch_size = 8
  c.data.buckets = (16,)
  c.data.max_prompt_length, c.data.max_length = 8, 16
  c.loss.beta = 0.1
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 1
  c.optimizer.weight_decay = 0.01
  c.train.steps = 5
  c.train.log_every = 1
  c.train.logits_chunk_size = 8
  c.checkpoint.every = 2
  c.checkpoint.keep = 10
  c.logging.progress_bar = False
  c.logging.tensorboard = False
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _sequence(rng: np.random.Generator, length: int, prompt_len: int, total: int) -> dict[str, np.ndarray]:
  ids = rng.integers(3, VOCAB, total).astype(np.int32)
  tokens = np.zeros(length, np.int32)
  tokens[:total] = ids
  labels = np.zeros(length, np.int32)
  labels[:total - 1] = ids[1:]
  mask = np.zeros(length, np.float32)
  mask[prompt_len - 1:total - 1] = 1.0
  seg = np.zeros(length, np.int32)
  seg[:total] = 1
  pos = np.zeros(length, np.int32)
  pos[:total] = np.arange(total)
  return dict(tokens=tokens, labels=labels, loss_mask=mask, segment_ids=seg, positions=pos)


def make_pairs(num_pairs: int = NUM_PAIRS, length: int = 16, seed: int = 1234) -> list[dict]:
  """Random preference pairs with padding, cached reference log-probs and token rewards (all numpy)."""
  rng = np.random.default_rng(seed)
  pairs = []
  for _ in range(num_pairs):
    prompt_len = int(rng.integers(2, 6))
    side = {}
    for name in ("chosen", "rejected"):
      total = int(rng.integers(prompt_len + 2, length + 1))
      side[name] = _sequence(rng, length, prompt_len, total)
    rec = {"chosen": side["chosen"], "rejected": side["rejected"]}
    for name in ("chosen", "rejected"):
      m = side[name]["loss_mask"]
      ref_tok = (-np.log(VOCAB) + 0.3 * rng.standard_normal(length)).astype(np.float32) * m
      rec[f"ref_{name}_token_logps"] = ref_tok
      rec[f"ref_{name}_logps"] = np.float32(ref_tok.sum())
      rec[f"{name}_token_rewards"] = (0.4 * rng.random(length) - 0.2).astype(np.float32) * m
    pairs.append(rec)
  return pairs


def collate(pairs: list[dict]):
  from tregjax.data.batch import PreferenceBatch, SequenceBatch
  seq = lambda name: SequenceBatch(**{k: np.stack([p[name][k] for p in pairs]) for k in pairs[0][name]})
  stack = lambda k: np.stack([p[k] for p in pairs])
  return PreferenceBatch(chosen=seq("chosen"), rejected=seq("rejected"), ref_chosen_logps=stack("ref_chosen_logps"),
                         ref_rejected_logps=stack("ref_rejected_logps"),
                         ref_chosen_token_logps=stack("ref_chosen_token_logps"),
                         ref_rejected_token_logps=stack("ref_rejected_token_logps"),
                         chosen_token_rewards=stack("chosen_token_rewards"),
                         rejected_token_rewards=stack("rejected_token_rewards"))


class ArrayData:
  """Epochs of seeded shuffles over `pairs`; global batch b = rows order[b·B:(b+1)·B], this process's contiguous slice.

  Mirrors what make_array_from_process_local_data expects: process p holds rows [p·B/P, (p+1)·B/P) of the global batch.
  """

  def __init__(self, pairs, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
               epochs: int | None = None):
    self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
    self.pi, self.pc, self.epochs = process_index, process_count, epochs
    self.per_epoch = len(pairs) // batch_size
    self.index = 0

  def __len__(self):
    return self.per_epoch

  def __iter__(self):
    return self

  def global_rows(self, index: int) -> np.ndarray:
    epoch, b = divmod(index, self.per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
    return order[b * self.batch_size:(b + 1) * self.batch_size]

  def __next__(self):
    if self.epochs is not None and self.index >= self.epochs * self.per_epoch:
      raise StopIteration
    rows = self.global_rows(self.index)
    local = len(rows) // self.pc
    rows = rows[self.pi * local:(self.pi + 1) * local]
    self.index += 1
    return collate([self.pairs[i] for i in rows])

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def array_data(config, split, process_index, process_count):
  """A `run(data_factory=...)` source: 64 training pairs, 16 eval pairs (one pass)."""
  if split == config.data.train_split:
    return ArrayData(make_pairs(), config.data.batch_size, config.data.seed, process_index, process_count)
  return ArrayData(make_pairs(16, seed=99), config.data.batch_size, 0, process_index, process_count, epochs=1)


def _parse(value: str):
  try:
    return json.loads(value)
  except json.JSONDecodeError:
    return value


def main(argv: list[str]) -> None:
  """Worker: `train_common.py WORKDIR [key=value ...] [max_steps=N] [nan_refs=1] [params_dir=DIR]`; prints the
  summary as JSON."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from tregjax import cli, peers
  peers.supervise("tregjax.train", cli.distributed_env() is not None)  # as `python -m tregjax.train` runs
  workdir, *pairs = argv
  overrides = dict(p.split("=", 1) for p in pairs)
  max_steps = overrides.pop("max_steps", None)
  nan_refs = overrides.pop("nan_refs", None)  # corrupt every cached reference log-prob (non-finite loss)
  params_dir = _parse(overrides.pop("params_dir", "null")) or workdir  # params_N.npz's local dir (gs:// workdirs)
  overrides = {k: _parse(v) for k, v in overrides.items()}
  for k in ("data.buckets",):
    if k in overrides:
      overrides[k] = tuple(overrides[k])
  config = tiny_config(**overrides)
  cli.init_distributed(config=config)  # one of several processes when started by launch/local_multiprocess.sh (gloo)
  from tregjax import training
  def data(config, split, pi, pc):
    source = array_data(config, split, pi, pc)
    if nan_refs:
      for pair in source.pairs:
        pair["ref_chosen_logps"] = np.float32(np.nan)
    return source

  train = lambda: training.run(config, workdir, data_factory=data,
                               max_steps=None if max_steps is None else int(max_steps))
  # Several processes: errors end as `python -m tregjax.train`'s do (a lost peer: one line, EXIT_PEER_LOST); one
  # process keeps the traceback that the single-process tests read.
  summary = cli.report_errors("tregjax.train", train) if cli.distributed_env() is not None else train()
  import jax
  params = jax.tree.map(np.asarray, jax.device_get(summary.state.params))
  if jax.process_index() == 0:
    os.makedirs(params_dir, exist_ok=True)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(params_dir, f"params_{summary.step}.npz"), **flat)
  keys = ("step", "start_step", "stopped", "final_metrics", "eval_metrics", "memory_analysis")
  print("SUMMARY " + json.dumps({k: getattr(summary, k) for k in keys}), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(sys.argv[1:])


_SHARED_CACHE: list[str] = []


def shared_cache_dir() -> str:
  """One persistent XLA compilation cache for every worker of this test session (removed at exit): the trainer
  tests run the same tiny step program in many subprocesses."""
  if not _SHARED_CACHE:
    import atexit
    import shutil
    import tempfile
    _SHARED_CACHE.append(tempfile.mkdtemp(prefix="tregjax-train-tests-xla-cache-"))
    atexit.register(shutil.rmtree, _SHARED_CACHE[0], True)
  return _SHARED_CACHE[0]


def synthetic_run(workdir: str, layers: int, width: int, vocab: int = 32000) -> int:
  """A run directory as `tregjax.train` leaves it (config.json + an Orbax checkpoint of step 1: float32 params and
  both Adam moments) for a random-init Llama of `layers` x `width` x `vocab`, compute dtype bfloat16, without
  training; returns its parameter count. For export benches and tests of a few hundred MB."""
  import jax  # pylint: disable=g-import-not-at-top
  from tregjax import parallel  # pylint: disable=g-import-not-at-top
  from tregjax.training import checkpoint as ckpt_lib, trainer  # pylint: disable=g-import-not-at-top
  c = tiny_config(**{"model.overrides.vocab_size": vocab, "model.overrides.hidden_size": width,
                     "model.overrides.intermediate_size": 4 * width, "model.overrides.num_layers": layers,
                     "model.overrides.num_heads": width // 64, "model.overrides.num_kv_heads": 4,
                     "model.overrides.head_dim": 64, "model.overrides.max_position_embeddings": 64,
                     "model.dtype": "bfloat16"})
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2))
  program = trainer.build(c, parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  # The TrainState's own structure, shapes and dtypes, filled on the host: params N(0, 0.02) from numpy, everything
  # else (the Adam moments, counters) zero as at init. jax's threefry init of 187M parameters takes 15 CPU seconds.
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    if getattr(path[0], "name", None) == "params" and np.issubdtype(leaf.dtype, np.floating):
      return jax.numpy.asarray(rng.standard_normal(leaf.shape, dtype=np.float32) * np.float32(0.02), leaf.dtype)
    return jax.numpy.zeros(leaf.shape, leaf.dtype)

  state = jax.tree_util.tree_map_with_path(fill, jax.eval_shape(program.init))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=1, async_save=False)
  ckpt.save(1, state, {}, {"step": 1}, force=True)
  ckpt.close()
  return sum(int(x.size) for x in jax.tree.leaves(state.params))


def worker_env(cache_dir: str | None = "", num_devices: int = 1) -> dict[str, str]:
  """Environment of a worker subprocess: CPU, N fake devices, a persistent compilation cache (default: the
  session's shared one; None: no cache)."""
  if cache_dir == "":
    cache_dir = shared_cache_dir()
  env = dict(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The two LLVM flags halve CPU compile time of the tiny step (numerics unchanged: same ops, less LLVM optimisation).
  flags = (f"--xla_force_host_platform_device_count={num_devices} --xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true")
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
             PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""))
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def worker_cmd(workdir: str, **overrides) -> list[str]:
  args = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
  return [sys.executable, os.path.abspath(__file__), workdir, *args]


def parse_summary(stdout: str) -> dict:
  lines = [l for l in stdout.splitlines() if l.startswith("SUMMARY ")]
  if not lines:
    raise AssertionError(f"worker printed no summary:\n{stdout[-3000:]}")
  return json.loads(lines[-1][len("SUMMARY "):])


def load_params(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def assert_params_bitwise_equal(path_a: str, path_b: str) -> None:
  """Two saved parameter files hold the same names and bit-identical arrays (runs that must agree exactly on CPU)."""
  a, b = load_params(path_a), load_params(path_b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def metrics_by_step(workdir: str) -> dict[int, dict]:
  """The last metrics.jsonl record of every step (a resumed run re-logs steps after its checkpoint)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if "loss/total" in rec:
        out[rec["step"]] = rec
  return out
