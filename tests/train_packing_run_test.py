"""A training run on packed batches follows the run on the same pairs laid out one per row (same pairs per step),
with gradient accumulation over micro-batches holding unequal numbers of pairs; too many segments stop the run.

Tolerance: losses rtol 1e-4 and parameters atol 2e-6 after 3 AdamW steps (float32; attention over rows of another
length sums in another order). optimizer.eps = 1e-4 keeps float32 noise in near-zero gradients from becoming ±lr
sign updates in Adam's first step.
"""

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
    self.pairs = tp._pairs(8 * STEPS, seed=11)
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
      return tp._collate([[base + i for i in g] for g in tp.GROUPS], self.pairs, tp.PACKED_T)
    return tp._collate([[base + i] for i in range(8)], self.pairs, tp.UNPACKED_T)

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


def _run(tmp_path, packed, **kw):
  return training.run(_config(packed, **kw), str(tmp_path / f"packed{packed}"),
                      data_factory=lambda c, split, pi, pc: Steps(packed))


def test_packed_run_follows_the_unpacked_trajectory_with_accumulation(tmp_path):
  padded, packed = _run(tmp_path, False), _run(tmp_path, True)
  a = tc.metrics_by_step(padded["workdir"])
  b = tc.metrics_by_step(packed["workdir"])
  assert [b[s]["data/loss_weight"] for s in range(1, STEPS + 1)] == [8.0] * STEPS  # pairs, not rows
  for key in ("loss/total", "loss/regularizer", "weight/mean", "rewards/margin", "optim/grad_norm"):
    np.testing.assert_allclose([b[s][key] for s in range(1, STEPS + 1)], [a[s][key] for s in range(1, STEPS + 1)],
                               rtol=1e-4, err_msg=key)
  import jax  # pylint: disable=g-import-not-at-top
  want = jax.tree_util.tree_flatten_with_path(jax.device_get(padded["state"].params))[0]
  got = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(packed["state"].params))[0])
  for path, w in want:
    np.testing.assert_allclose(got[path], w, rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_packed_batch_over_the_static_max_segments_stops_the_run(tmp_path):
  with pytest.raises(ValueError, match=r"training batch of step 1: row 0 holds 3 packed pairs .* max_segments=2"):
    _run(tmp_path, True, max_segments=2)
