"""A training run on packed batches follows the run on the same pairs laid out one per row (same pairs per step),
on a 4-device fsdp × tensor mesh with gradient accumulation over micro-batches holding unequal numbers of pairs;
too many segments stop the run.

Tolerance: losses rtol 1e-4 and parameters atol 2e-6 after 3 AdamW steps (float32; attention over rows of another
length sums in another order). optimizer.eps = 1e-4 keeps float32 noise in near-zero gradients from becoming ±lr
sign updates in Adam's first step.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import train_common as tc
import train_packing_test as tp
from tregjax import training

pytestmark = pytest.mark.filterwarnings("ignore")
STEPS = 3


class Steps:
  """Step s trains on pairs [8s, 8s + 8): one per row, or packed as tp.GROUPS (3 rows + a padding row)."""

  def __init__(self, packed: bool):
    self.pairs = tp.random_pairs(8 * STEPS, seed=11)
    self.packed, self.index = packed, 0

  def __len__(self):
    return STEPS

  def __iter__(self):
    return self

  def __next__(self):
    if self.index >= STEPS:
      raise StopIteration
    base = 8 * self.index
    self.index += 1
    if self.packed:
      return tp.collate_rows([[base + i for i in g] for g in tp.GROUPS], self.pairs, tp.PACKED_T)
    return tp.collate_rows([[base + i] for i in range(8)], self.pairs, tp.UNPACKED_T)

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def _config(packed: bool, max_segments: int = tp.MAX_SEGMENTS):
  return tc.tiny_config(**{
      "loss.loss": "dpo", "loss.regularizer": "treg", "loss.alpha": 0.5, "optimizer.eps": 1e-4,
      "optimizer.grad_accum_steps": 2, "optimizer.schedule": "constant", "train.steps": STEPS,
      "checkpoint.enabled": False, "data.buckets": (tp.PACKED_T,), "data.max_length": tp.PACKED_T,
      "data.packing": packed, "data.max_segments": max_segments, "data.batch_size": 4 if packed else 8})


def _run(workdir, packed, **kw):
  return training.run(_config(packed, **kw), workdir, data_factory=lambda c, split, pi, pc: Steps(packed))


def main(root: str) -> None:
  """Worker (4 fake devices): both runs on an fsdp=2 × tensor=2 mesh; metrics.jsonl + final params under root."""
  import jax  # pylint: disable=g-import-not-at-top
  for packed in (False, True):
    workdir = os.path.join(root, f"packed{packed}")
    config = _config(packed)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 2
    summary = training.run(config, workdir, data_factory=lambda c, split, pi, pc, p=packed: Steps(p))
    params = jax.tree.map(np.asarray, jax.device_get(summary.state.params))
    np.savez(os.path.join(workdir, "params.npz"),
             **{jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]})


def test_packed_run_follows_the_unpacked_trajectory_on_a_mesh_with_accumulation(tmp_path):
  """fsdp=2 × tensor=2 over 4 fake devices, 2 micro-batches per step: the packed micro-batches hold 6 and 2 pairs
  (rows {0, 2} and {1, 3}), so a mean of micro-batch means would differ from the pair mean."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=tc.worker_env(num_devices=4),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  a = tc.metrics_by_step(str(tmp_path / "packedFalse"))
  b = tc.metrics_by_step(str(tmp_path / "packedTrue"))
  assert [b[s]["data/loss_weight"] for s in range(1, STEPS + 1)] == [8.0] * STEPS  # pairs, not rows
  for key in ("loss/total", "loss/regularizer", "weight/mean", "rewards/margin", "optim/grad_norm"):
    np.testing.assert_allclose([b[s][key] for s in range(1, STEPS + 1)], [a[s][key] for s in range(1, STEPS + 1)],
                               rtol=1e-4, err_msg=key)
  want = tc.load_params(str(tmp_path / "packedFalse" / "params.npz"))
  got = tc.load_params(str(tmp_path / "packedTrue" / "params.npz"))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-6, err_msg=k)


def test_packed_batch_over_the_static_max_segments_stops_the_run(tmp_path):
  with pytest.raises(ValueError, match=r"training batch of step 1: row 0 holds 3 packed pairs .* max_segments=2"):
    _run(str(tmp_path / "run"), True, max_segments=2)


if __name__ == "__main__":
  main(sys.argv[1])
